"""scripts/gpu/bench-gpu.sh on a machine without a GPU: what can fail here without one.

The GPU itself is the one thing this machine lacks, so ``nvidia-smi`` and ``import vllm`` are stubbed
(a fake for a part this machine does not have); everything else -- the detached start, the next
call's fresh tree replacing the folder the run was started from, collecting the results -- is the
real script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "scripts/gpu/bench-gpu.sh"
TREE = ("scripts", "tokenslice", "sidecar", "gateway_ext", "operator", "pyproject.toml")


def _tree(dest: Path) -> Path:
    """A copy of the tree, as the lent machine gets one per call."""
    dest.mkdir(parents=True)
    for name in TREE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def _env(tmp: Path) -> dict[str, str]:
    stubs = tmp / "stubs"
    (stubs / "bin").mkdir(parents=True, exist_ok=True)
    (stubs / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'no GPU here (test stub)'\n")
    (stubs / "bin" / "nvidia-smi").chmod(0o755)
    (stubs / "py" / "vllm").mkdir(parents=True, exist_ok=True)
    (stubs / "py" / "vllm" / "__init__.py").write_text("")
    (stubs / "bin" / "python3").symlink_to(sys.executable) if not (stubs / "bin" / "python3").exists() else None
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "model.safetensors.index.json").write_text("{}")
    return {**os.environ, "PATH": f"{stubs / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(stubs / "py"),
            "RES": str(tmp / "res"), "OUT": str(tmp / "out"), "MODEL": str(model),
            "TOKENSLICE_CACHE": str(tmp / "cache"), "FOLLOW_S": "60"}


PROBE = """
import os, subprocess, sys, time
import tokenslice  # what `python -m tokenslice bench run` has imported when the next call comes
flag = os.environ["PROBE_FLAG"]
while not os.path.exists(flag):
    time.sleep(0.05)  # waiting for the test to replace the tree, with the test's own deadline
import tokenslice.bench.breakdown  # a lazy import after the tree was replaced
out = subprocess.run([sys.executable, "-S", "-m", "tokenslice", "bench", "list"], capture_output=True, text=True)
print("child:", out.returncode, out.stderr[-300:])
sys.exit(out.returncode)
"""


def test_a_detached_run_survives_the_next_call_replacing_its_folder(tmp_path: Path) -> None:
    env = _env(tmp_path)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env["PROBE_FLAG"] = str(tmp_path / "replaced")
    # run like `python -m tokenslice ...` on the GPU host: the working directory first on sys.path, the
    # dependencies in a plain folder on PYTHONPATH (-S: no .pth files, so no editable install of this
    # checkout to fall back on, as there is none on the host)
    env["PYTHONPATH"] += ":" + sysconfig.get_paths()["purelib"]
    env["BENCH_CMD"] = (f"{sys.executable} -S -c \"import os, sys; sys.path[0] = os.getcwd(); "
                        f"exec(open('{probe}').read())\"")
    first = _tree(tmp_path / "call-1")
    start = subprocess.run(["bash", SCRIPT, "start"], cwd=first, env={**env, "FOLLOW_S": "1"},
                           capture_output=True, text=True, timeout=120)
    assert start.returncode == 3, start.stdout + start.stderr  # still running after FOLLOW_S
    shutil.rmtree(first)  # the next device call: a fresh copy of the tree, the old one gone
    second = _tree(tmp_path / "call-2")
    (tmp_path / "replaced").write_text("")
    wait = subprocess.run(["bash", SCRIPT, "wait"], cwd=second, env=env, capture_output=True, text=True,
                          timeout=120)
    log = (tmp_path / "res" / "bench.log").read_text()
    assert wait.returncode == 0, wait.stdout + wait.stderr + log
    assert (tmp_path / "res" / "rc").read_text().strip() == "0", log


def test_collected_logs_never_carry_the_signing_key(tmp_path: Path) -> None:
    env = _env(tmp_path)
    run = tmp_path / "cache" / "local" / "run-1"
    (run / "logs").mkdir(parents=True)
    (run / "signing.key").write_text("secret")
    (run / "logs" / "picker.log").write_text("log line")
    (tmp_path / "res").mkdir()
    out = subprocess.run(["bash", SCRIPT, "collect"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "run-1/logs/picker.log" in names
    assert not [n for n in names if n.endswith(".key")], names


def test_staging_says_at_once_that_the_tiny_tokenizer_is_missing(tmp_path: Path) -> None:
    """stage-wheels.sh needs the tokenizer `make engine` builds: it must say so before minutes of downloads."""
    env = {**os.environ, "TOKENSLICE_CACHE": str(tmp_path / "empty-cache"), "PIP": "false"}
    env.pop("TINY", None)
    tree = _tree(tmp_path / "tree")
    out = subprocess.run(["bash", "scripts/gpu/stage-wheels.sh"], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "make engine" in out.stderr, out.stdout + out.stderr
    assert not (tree / ".whl").exists()  # nothing downloaded, nothing cut


def test_a_micro_benchmark_runs_in_place_of_the_scenario(tmp_path: Path) -> None:
    """BENCH_MICRO: `tokenslice bench micro ...` with this host's model and results folder (here its --help)."""
    env = {**_env(tmp_path), "BENCH_MICRO": "slices --help"}
    env["PYTHONPATH"] += ":" + sysconfig.get_paths()["purelib"]
    tree = _tree(tmp_path / "tree")
    out = subprocess.run(["bash", SCRIPT], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "out" / "bench.log").read_text()
    assert out.returncode == 0, out.stdout + out.stderr + log
    assert (f"running: python3 -m tokenslice bench micro slices --help --model {env['MODEL']} "
            f"--out {env['RES']} --keep-logs") in log
    assert "usage: tokenslice bench micro slices" in log and "--cut-interval" in log  # the part's own help ran
    assert (tmp_path / "res" / "rc").read_text().strip() == "0"


def test_the_offload_backport_patches_vllm_0_26_only_when_asked(tmp_path: Path) -> None:
    """BACKPORT_PR52923=1 patches the installed offloading scheduler (0.26.0's text, as the wheel ships it);
    without it the file stays as installed, and a vLLM that is not 0.26.0 is refused, not half-patched."""
    sched = tmp_path / "stubs" / "py" / "vllm" / "distributed" / "kv_transfer" / "kv_connector" / "v1" / "offloading"
    sched.mkdir(parents=True)
    for pkg in (sched, *sched.parents):
        if pkg.name == "py":
            break
        (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(REPO / "scripts" / "gpu"))
    try:
        import backport_pr52923 as bp
    finally:
        sys.path.pop(0)
    original = ("class RequestOffloadState:\n    def storable_chunks(self, group_config, num_offloadable_tokens):\n"
                "        num_chunks = num_offloadable_tokens // group_config.tokens_per_chunk\n"
                "        is_decoding = num_offloadable_tokens > self.req.num_prompt_tokens\n" + bp.ORIGINAL)
    (sched / "scheduler.py").write_text(original)
    tree = _tree(tmp_path / "tree")
    env = {**_env(tmp_path), "BENCH_CMD": "true"}

    out = subprocess.run(["bash", SCRIPT], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (sched / "scheduler.py").read_text() == original

    out = subprocess.run(["bash", SCRIPT], cwd=tree, env={**env, "BACKPORT_PR52923": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backport PR #52923" in out.stdout and ": patched" in out.stdout
    patched = (sched / "scheduler.py").read_text()
    assert "num_keyed_chunks = len(group_state.offload_keys)" in patched
    # the cap it adds, run: 5 chunks by tokens, 3 with GPU blocks, 4 with keys -> 3
    namespace: dict[str, object] = {}
    exec(compile(patched, "scheduler.py", "exec"), namespace)
    group_config = type("G", (), {"tokens_per_chunk": 16, "is_eagle_group": False})()
    group_state = type("S", (), {"block_ids": [1] * 6, "offload_keys": ["k"] * 4})()
    state = namespace["RequestOffloadState"]()
    state.req = type("R", (), {"num_prompt_tokens": 40})()
    state.config = type("C", (), {"kv_group_configs": [group_config], "blocks_per_chunk": 2})()
    state.group_states = [group_state]
    assert state.storable_chunks(group_config, 80) == 3

    (sched / "scheduler.py").write_text("def storable_chunks(): return 0\n")  # some other vLLM
    assert bp.main([str(sched / "scheduler.py")]) == 1
