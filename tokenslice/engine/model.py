"""Build (once) the tiny offline model into the cache, using the engine venv's python.

The recipe lives in ``build_model.py`` (run *inside* the engine venv, which has
torch/tokenizers/transformers); this module only decides whether to run it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tokenslice.engine import layout

BUILD_SCRIPT = Path(__file__).with_name("build_model.py")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
               "tokenizer.json", "tokenizer_config.json", "tokenslice_model.json")
STAMP = ".tokenslice-build.json"


def recipe_digest() -> str:
    """Hash of the build script: any change to the recipe rebuilds the model."""
    return hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:16]


def model_info(model_dir: Path | None = None) -> dict[str, object]:
    """What build_model.py recorded: ids of EOS and the stop trigger, vocab size, recipe."""
    path = (model_dir or layout.default_model_dir()) / "tokenslice_model.json"
    return json.loads(path.read_text())


def model_ready(model_dir: Path | None = None) -> bool:
    model = model_dir or layout.default_model_dir()
    try:
        stamp = json.loads((model / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == recipe_digest() and all((model / f).exists() for f in MODEL_FILES)


def files_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in MODEL_FILES:
        h.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return h.hexdigest()


def build_model(out: Path, python: Path | None = None) -> dict[str, object]:
    """Run the recipe into ``out`` (any dir) with the engine venv's python; returns its info."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(python or layout.engine_python()), str(BUILD_SCRIPT), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"model build failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_model(progress: Callable[[str], None] = print, *, force: bool = False) -> Path:
    """Build the tiny model into ``$CACHE/models/tiny-llama`` unless an up-to-date one is there."""
    model = layout.default_model_dir()
    if not force and model_ready(model):
        progress(f"model ready: {model}")
        return model
    progress(f"building tiny model -> {model} (tokenizer training + random weights, ~10 s)")
    started = time.monotonic()
    layout.models_dir().mkdir(parents=True, exist_ok=True)
    # build beside the target, then swap in, so a running vLLM never sees half a model
    with tempfile.TemporaryDirectory(dir=layout.models_dir(), prefix=".build-") as tmp:
        staging = Path(tmp) / layout.MODEL_NAME
        info = build_model(staging)
        (staging / STAMP).write_text(json.dumps({"recipe": recipe_digest(), "sha256": files_digest(staging)},
                                                indent=2) + "\n")
        if model.exists():
            old = Path(tmp) / "old"
            model.rename(old)
        staging.rename(model)
    progress(f"model built in {time.monotonic() - started:.1f} s: vocab {info['vocab_size']}, "
             f"{int(info['params']) / 1e6:.2f} M params (files sha256 {files_digest(model)[:12]})")
    return model
