"""Start and stop a real vLLM OpenAI server (CPU build) on a free loopback port.

Used by the test fixtures, ``tokenslice local`` and the benchmarks.  The server is
supervised by :mod:`tokenslice.procs` (own process group, parent-death signal), so
``stop()`` takes down vLLM and anything it spawned, and its log goes to a file in the
cache (tail it when a start fails).

Defaults suit a 2-core machine running several engines side by side: the model
runs inside the engine-core process (no extra worker process), one OpenMP
thread, a small KV cache, prefix caching on, eager mode (fast start).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenslice import procs
from tokenslice.engine import layout
from tokenslice.paths import cache_dir
from tokenslice.procs import ManagedProcess, free_port

DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_KV_CACHE_MIB = 256
"""KV cache per engine: 256 MiB = 131k tokens of the tiny model (2 KiB/token), plenty for tests, and
small enough that several engines fit in RAM (each engine is ~1.5 GiB RSS besides)."""
DEFAULT_START_TIMEOUT_S = 600.0
"""Generous: importing vLLM alone takes 30-100 s on 2 busy cores."""
DEFAULT_COMPILE = False
"""torch.compile makes 16-stream decode ~1.4-3x faster but adds ~60 s to *every* start on 2 cores
(vLLM 0.32's AOT compile cache fails to reload: "'function' object has no attribute
'finalize_loading'"), so tests run eager; the benchmark may opt in (docs/engine.md has numbers)."""
DEFAULT_BLOCK_SIZE = 32
"""KV block = prefix-cache granularity. vLLM-CPU defaults to 128, which would make every prompt
shorter than 128 tokens a cache miss. 32 is the smallest the CPU attention backend accepts."""


class EngineNotBuilt(RuntimeError):
    """The engine venv or the model is missing: run ``make engine``."""


class EngineStartError(RuntimeError):
    """vLLM exited or did not become healthy in time; the message carries the log tail."""


def check_built(model_dir: Path | None = None) -> Path:
    """Return the model dir, or raise EngineNotBuilt with the command that fixes it."""
    model = Path(model_dir) if model_dir else layout.default_model_dir()
    python = layout.engine_python()
    if not python.exists():
        raise EngineNotBuilt(f"vLLM engine venv missing ({python}); run `make engine` "
                             "(= `tokenslice engine setup`)")
    if not (model / "config.json").exists():
        raise EngineNotBuilt(f"model missing ({model}); run `make engine` (= `tokenslice engine setup`)")
    return model


def vllm_command(*, model_dir: Path, port: int, served_model_name: str = layout.MODEL_NAME,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                 torch_compile: bool = DEFAULT_COMPILE, kv_cache_mib: int = DEFAULT_KV_CACHE_MIB,
                 extra_args: Sequence[str] = ()) -> list[str]:
    return [
        str(layout.engine_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_model_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--distributed-executor-backend", "uni",
        "--dtype", "float32",
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--enable-prefix-caching",
        "--block-size", str(DEFAULT_BLOCK_SIZE),
        "--kv-cache-memory-bytes", str(kv_cache_mib * 2**20),
        "--seed", "0",
        "--disable-uvicorn-access-log",
        *(() if torch_compile else ("--enforce-eager",)),
        *extra_args,
    ]


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        # with "1" vLLM-CPU swaps the `uni` executor for `mp`: a third process for the model
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # don't pin to cores other engines use too
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "VLLM_CACHE_ROOT": str(cache_dir() / "vllm"),  # torch.compile cache beside the model
    })
    env.pop("VIRTUAL_ENV", None)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # whole GiB only, and it would override --kv-cache-memory-bytes
    return env


@dataclass
class VLLMServer:
    """A running vLLM server, supervised by :mod:`tokenslice.procs`. ``url`` is the OpenAI base without ``/v1``."""

    port: int
    model: str
    model_dir: Path
    proc: ManagedProcess
    started_in_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """``host:port`` as endpoint pickers name it."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.proc.log_path

    @property
    def command(self) -> list[str]:
        return self.proc.argv

    def running(self) -> bool:
        return self.proc.running

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines)

    def stop_sync(self, timeout: float = 20.0) -> None:
        """SIGTERM vLLM's process group (API server, EngineCore, resource tracker), SIGKILL what is left."""
        self.proc.stop_sync(timeout)

    async def stop(self, timeout: float = 20.0) -> None:
        await self.proc.stop(timeout)


def spawn(*, model_dir: Path | str | None = None, port: int | None = None, extra_args: Sequence[str] = (),
          log_path: Path | str | None = None, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
          max_model_len: int = DEFAULT_MAX_MODEL_LEN, kv_cache_mib: int = DEFAULT_KV_CACHE_MIB,
          torch_compile: bool = DEFAULT_COMPILE,
          served_model_name: str = layout.MODEL_NAME) -> VLLMServer:
    """Launch vLLM (not yet healthy). Prefer :func:`start_vllm` / :func:`running_vllm`."""
    model = check_built(Path(model_dir) if model_dir else None)
    port = port or free_port()
    log = Path(log_path) if log_path else layout.logs_dir() / f"vllm-{port}.log"
    cmd = vllm_command(model_dir=model, port=port, served_model_name=served_model_name,
                       max_num_seqs=max_num_seqs, max_model_len=max_model_len, torch_compile=torch_compile,
                       kv_cache_mib=kv_cache_mib, extra_args=extra_args)
    proc = procs.spawn(f"vllm:{port}", cmd, log, env=vllm_env(), append_log=True)
    return VLLMServer(port=port, model=served_model_name, model_dir=model, proc=proc)


async def wait_healthy(server: VLLMServer, timeout: float = DEFAULT_START_TIMEOUT_S,
                       progress: Callable[[str], None] | None = None) -> VLLMServer:
    """Wait until ``/health`` answers 200; stop the server and raise if it dies or times out."""
    started = time.monotonic()
    try:
        await procs.wait_ready(server.proc, server.url + "/health", timeout, progress=progress, interval_s=0.25)
    except procs.NotReady as exc:
        await server.stop()
        raise EngineStartError(f"vLLM did not start: {exc}") from None
    server.started_in_s = time.monotonic() - started
    if progress:
        progress(f"vLLM ready on {server.url} in {server.started_in_s:.1f} s")
    return server


async def start_vllm(*, model_dir: Path | str | None = None, port: int | None = None,
                     extra_args: Sequence[str] = (), log_path: Path | str | None = None,
                     timeout: float = DEFAULT_START_TIMEOUT_S, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                     max_model_len: int = DEFAULT_MAX_MODEL_LEN, kv_cache_mib: int = DEFAULT_KV_CACHE_MIB,
                     torch_compile: bool = DEFAULT_COMPILE,
                     served_model_name: str = layout.MODEL_NAME,
                     progress: Callable[[str], None] | None = None) -> VLLMServer:
    """Start vLLM and wait until it serves; the caller owns it and must ``await server.stop()``.

    Without an explicit ``port`` a free one is picked; if another process grabs it before vLLM
    binds (the machine is shared), the start is retried on a new port.
    """
    for attempt in range(3):
        server = spawn(model_dir=model_dir, port=port, extra_args=extra_args, log_path=log_path,
                       max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_cache_mib=kv_cache_mib,
                       torch_compile=torch_compile, served_model_name=served_model_name)
        try:
            return await wait_healthy(server, timeout, progress)
        except EngineStartError as exc:
            await server.stop()
            if port is not None or attempt == 2 or "address already in use" not in str(exc).lower():
                raise
        except BaseException:
            await server.stop()
            raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def running_vllm(**kwargs: object) -> Iterator[VLLMServer]:
    """Sync form for scripts: ``with running_vllm() as server: ...`` (same arguments as start_vllm)."""
    server = asyncio.run(start_vllm(**kwargs))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop_sync()

