"""The whole data plane on loopback, as one async context manager.

    async with LocalStack(LocalConfig(engines=2)) as stack:
        client = openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key="-")

Layers, so the benchmark can keep the (slow to start) engines while it swaps
what runs in front of them:

* :class:`EnginePool` -- N real vLLM engines (``tokenslice.engine.server``).
* :class:`DataPlane` -- over a list of engine URLs, one of
  ``tokenslice`` (sidecar per engine -> the gateway, Envoy as ``tokenslice.envoy`` builds it -> the picker),
  ``chunked`` (sidecars chunking straight into their own vLLM: no scheduler, baseline c),
  ``chunked-rr`` (sidecars whose chunks go through a plain round-robin Envoy: chunking without KV affinity),
  ``direct`` (nothing: the engines themselves, round-robin Envoy in front when there are several).
* :class:`LocalStack` -- both, for ``tokenslice local up`` and the end-to-end test.

Everything runs from one run directory in the cache (signing key, policy, Envoy
config, logs), removed on exit; every child is stopped by PID / process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from tokenslice.engine import cpus
from tokenslice.envoy import ExtProc, Static, start_envoy
from tokenslice.paths import cache_dir
from tokenslice.policy import SchedulingPolicySpec, load_policy
from tokenslice.procs import ManagedProcess, free_port, spawn, tokenslice_argv, wait_http

if TYPE_CHECKING:  # the engine venv is optional for the rest
    from tokenslice.engine.server import VLLMServer

EXAMPLE_POLICY = Path(__file__).with_name("policy.example.yaml")

Mode = Literal["tokenslice", "chunked", "chunked-rr", "direct"]
_PORT_TAKEN = ("address already in use", "failed to bind", "cannot bind")
"""How aiohttp and gRPC say that a port picked free was taken before they bound it."""
Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class LocalConfig(BaseModel):
    """What ``tokenslice local up`` runs."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    engines: int = Field(default=1, ge=1, le=16)
    model_dir: Path | None = Field(default=None, description="a local HF model dir; default the tiny model")
    policy_file: Path | None = Field(default=None, description="policy YAML; default the shipped example")
    policy: SchedulingPolicySpec | None = Field(default=None, description="a policy object (wins over the file)")
    chunk_size: int | None = Field(default=None, ge=1, description="overrides the policy's chunkSize")
    port: int | None = Field(default=None, description="Envoy listener port; default a free one")
    max_num_seqs: int | None = Field(default=None, ge=1,
                                     description="vLLM --max-num-seqs; default the policy's slotsPerEndpoint")
    vllm_args: list[str] = Field(default_factory=list)
    picker_args: list[str] = Field(default_factory=list, description="extra `tokenslice picker` flags")
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    mode: Mode = "tokenslice"
    engine_timeout_s: float = 900.0
    keep_run_dir: bool = False

    def resolved_policy(self) -> SchedulingPolicySpec:
        policy = self.policy or load_policy(self.policy_file or EXAMPLE_POLICY)
        if self.chunk_size is not None:
            policy = policy.model_copy(update={"chunk_size": self.chunk_size})
        return policy


class RunDir:
    """A private directory in the cache for one stack's key, configs and logs; deleted on close."""

    def __init__(self, keep: bool = False) -> None:
        base = cache_dir() / "local"
        base.mkdir(parents=True, exist_ok=True)
        self.path = Path(f"{base}/run-{os.getpid()}-{time.time_ns() % 10**9}")
        self.path.mkdir()
        (self.path / "logs").mkdir()
        self.keep = keep

    def log(self, name: str) -> Path:
        return self.path / "logs" / f"{name}.log"

    def close(self) -> None:
        """Delete the directory; a kept one (its logs and configs) still loses the signing key."""
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            (self.path / "signing.key").unlink(missing_ok=True)


# --- engines -----------------------------------------------------------------------------------------

@dataclass
class Engine:
    """One running vLLM with its name."""

    name: str
    server: VLLMServer

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def model(self) -> str:
        return self.server.model

    @property
    def pid(self) -> int:
        return self.server.pid


class EnginePool:
    """N real vLLM engines started concurrently (the tiny offline model unless ``model_dir`` is given)."""

    def __init__(self, count: int, *, run_dir: RunDir, model_dir: Path | None = None, max_num_seqs: int = 4,
                 scheduling_policy: str = "fcfs", vllm_args: list[str] | None = None,
                 timeout_s: float = 900.0, progress: Progress = _stderr, tag: str = "engine",
                 isolate_cpus: bool = False) -> None:
        self.count = count
        self.isolate_cpus = isolate_cpus
        """Each engine core on a core of its own, everything else (this process included) on the others, while the
        pool runs (:mod:`tokenslice.engine.cpus`); this process's own affinity is restored on stop."""
        self._own_cpus: frozenset[int] | None = None
        self.run_dir = run_dir
        self.model_dir = model_dir
        self.max_num_seqs = max_num_seqs
        self.scheduling_policy = scheduling_policy
        self.vllm_args = list(vllm_args or [])
        self.timeout_s = timeout_s
        self.progress = progress
        self.tag = tag
        self.engines: list[Engine] = []

    async def start(self) -> list[Engine]:
        from tokenslice.engine.server import start_vllm  # the engine venv is optional for the rest

        # uvicorn closes idle keep-alive connections after 5 s, aiohttp clients (the sidecars) keep them 15 s:
        # a reused connection that the server just closed fails as ServerDisconnectedError. Outlive them.
        os.environ.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "120")
        args = list(self.vllm_args)
        if self.scheduling_policy != "fcfs" and "--scheduling-policy" not in args:
            args += ["--scheduling-policy", self.scheduling_policy]
        started = time.monotonic()
        self.progress(f"starting {self.count} vLLM engine(s) (max-num-seqs {self.max_num_seqs}, "
                      f"scheduling {self.scheduling_policy}); logs in {self.run_dir.path / 'logs'}")

        async def one(i: int) -> Engine:
            name = f"{self.tag}-{i}"
            named = {"served_model_name": Path(self.model_dir).name} if self.model_dir else {}
            server = await start_vllm(model_dir=self.model_dir, max_num_seqs=self.max_num_seqs,
                                      extra_args=args, log_path=self.run_dir.log(name),
                                      timeout=self.timeout_s, **named)
            engine = Engine(name, server)
            self.progress(f"  {name} ready at {engine.url} after {time.monotonic() - started:.1f}s")
            return engine

        tasks = [asyncio.create_task(one(i)) for i in range(self.count)]
        ticker = asyncio.create_task(self._tick(tasks, started))
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            ticker.cancel()
        self.engines = [r for r in results if isinstance(r, Engine)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]
        if self.isolate_cpus:
            self.isolate()
        return self.engines

    def isolate(self) -> None:
        """Pin the running engines and this process (see ``isolate_cpus``); a no-op where the cores do not go round."""
        iso = cpus.plan(len(self.engines))
        if iso is None:
            self.progress(f"  cpus: not isolating ({len(cpus.available())} cpus for {len(self.engines)} engine(s))")
            return
        self._own_cpus = cpus.affinity(0)
        for engine, own in zip(self.engines, iso.engine_cpus):
            cores = cpus.engine_cores(engine.pid)
            for pid in [engine.pid, *cpus.descendants(engine.pid)]:
                cpus.pin(pid, own if pid in cores else iso.rest)
            if not cores:
                self.progress(f"  cpus: {engine.name} has no {cpus.ENGINE_CORE_NAME} process; left unpinned")
        cpus.pin(os.getpid(), iso.rest)  # and so every sidecar, picker and Envoy started from here
        self.progress(f"  cpus: {iso.describe()}")

    async def _tick(self, tasks: list[asyncio.Task[Engine]], started: float) -> None:
        while True:
            await asyncio.sleep(5)
            ready = sum(1 for t in tasks if t.done())
            self.progress(f"  ... {ready}/{len(tasks)} engine(s) ready, {time.monotonic() - started:.0f}s")

    async def stop(self) -> None:
        await asyncio.gather(*(e.server.stop() for e in self.engines), return_exceptions=True)
        self.engines = []
        if self._own_cpus is not None:
            cpus.pin(os.getpid(), self._own_cpus)
            self._own_cpus = None

    async def __aenter__(self) -> list[Engine]:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --- the data plane in front of the engines ----------------------------------------------------------

@dataclass
class DataPlane:
    """Sidecars (+ the picker + the gateway) in front of already running engines; see the module docstring."""

    engines: list[Engine]
    policy: SchedulingPolicySpec
    run_dir: RunDir
    mode: Mode = "tokenslice"
    port: int | None = None
    policy_path: Path | None = None
    """Hand the picker this file (keeps hot reload of the user's own file) instead of a written copy."""
    progress: Progress = _stderr
    log_level: str = "INFO"
    name: str = ""
    """Prefix of this data plane's log names (the benchmark runs several over one run directory)."""
    picker_args: list[str] = field(default_factory=list)
    """Extra ``tokenslice picker`` flags (e.g. ``--max-slice-tokens 0`` for per-slice mode, ``--no-preemption``);
    none: the picker's defaults (long slices, cut on demand)."""
    processes: list[ManagedProcess] = field(default_factory=list)
    sidecar_addresses: list[str] = field(default_factory=list)
    url: str = ""
    """Base URL of the OpenAI API (without /v1)."""
    picker_metrics_url: str | None = None

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    async def start(self, attempts: int = 3) -> DataPlane:
        """Start the parts; retried with fresh ports, since a port picked free can be taken before it is bound
        (other people's tests share this machine)."""
        for attempt in range(1, attempts + 1):
            try:
                await self._start()
                return self
            except (RuntimeError, TimeoutError, OSError) as exc:
                await self.stop()
                text = str(exc).lower()
                if attempt == attempts or not any(m in text for m in _PORT_TAKEN):
                    raise
                self.progress(f"{self.mode} data plane: a port was taken meanwhile, retrying ({attempt}/{attempts})")
            except BaseException:
                await self.stop()
                raise
        return self

    async def _start(self) -> None:
        engines = self.engines
        if self.mode == "direct":
            if len(engines) == 1:
                self.url = engines[0].url
            else:
                await self._envoy("envoy-rr", Static(tuple(e.address for e in engines)), self.port)
            return
        key_file = self.run_dir.path / "signing.key"
        if not key_file.exists():
            key_file.write_text(secrets.token_hex(32))
            key_file.chmod(0o600)
        ports = [free_port() for _ in engines]
        self.sidecar_addresses = [f"127.0.0.1:{p}" for p in ports]
        envoy_port = self.port or free_port()
        chunk_url = {"tokenslice": f"http://127.0.0.1:{envoy_port}", "chunked": None,
                     "chunked-rr": f"http://127.0.0.1:{envoy_port}"}[self.mode]
        default_class = self.policy.default_class or self.policy.lowest_class().name
        started = time.monotonic()
        for engine, port in zip(engines, ports):
            argv = tokenslice_argv("sidecar", "--host", "127.0.0.1", "--port", str(port), "--vllm-url", engine.url,
                                   "--chunk-size", str(self.policy.chunk_size),
                                   "--advertise", f"127.0.0.1:{port}", "--signing-key-file", str(key_file),
                                   "--default-tenant", self.policy.default_tenant,
                                   "--default-class", default_class, "--log-level", self.log_level)
            if chunk_url:
                argv += ["--chunk-url", chunk_url]
            self.processes.append(spawn(f"sidecar-{engine.name}", argv,
                                        self.run_dir.log(f"{self.name}sidecar-{engine.name}")))
        if self.mode == "tokenslice":
            policy_path = self.policy_path
            if policy_path is None:
                policy_path = self.run_dir.path / "policy.yaml"
                policy_path.write_text(yaml.safe_dump(
                    self.policy.model_dump(by_alias=True, exclude_none=True, mode="json"), sort_keys=False))
            grpc_port, metrics_port = free_port(), free_port()
            picker = spawn("picker", tokenslice_argv(
                "picker", "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-host", "127.0.0.1",
                "--metrics-port", str(metrics_port), "--log-level", self.log_level,
                "--policy", str(policy_path), "--endpoints", ",".join(self.sidecar_addresses),
                "--signing-key-file", str(key_file),
                # loopback only, one user: the bench and demos name tenants with the policy's header
                "--trust-tenant-header", *self.picker_args), self.run_dir.log(f"{self.name}picker"))
            self.processes.append(picker)
            self.picker_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            await self._envoy("envoy", ExtProc("127.0.0.1", grpc_port), envoy_port)
            await wait_http(f"http://127.0.0.1:{metrics_port}/healthz", 60, picker)
        elif self.mode == "chunked-rr" or len(engines) > 1:
            await self._envoy("envoy-rr", Static(tuple(self.sidecar_addresses)), envoy_port)
        else:
            self.url = f"http://{self.sidecar_addresses[0]}"
        for proc, address in zip(self.processes, self.sidecar_addresses):
            await wait_http(f"http://{address}/health", 60, proc)
        self.progress(f"{self.mode} data plane ready at {self.url} in {time.monotonic() - started:.1f}s "
                      f"(chunk size {self.policy.chunk_size})")

    async def _envoy(self, name: str, upstream: ExtProc | Static, port: int | None) -> None:
        """The gateway in front of this plane, with config and log in the run directory."""
        envoy = await start_envoy(upstream, workdir=self.run_dir.path / "logs", name=f"{self.name}{name}",
                                  listen_port=port)
        self.processes.append(envoy.proc)
        self.url = envoy.url

    async def stop(self) -> None:
        # front to back: the gateway and the picker first so nothing new reaches the sidecars
        for proc in reversed(self.processes):
            await proc.stop()
        self.processes = []

    async def __aenter__(self) -> DataPlane:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --- the whole thing ---------------------------------------------------------------------------------

class LocalStack:
    """Engines + data plane + run directory; ``async with LocalStack(config) as stack``."""

    def __init__(self, config: LocalConfig | None = None, progress: Progress = _stderr) -> None:
        self.config = config or LocalConfig()
        self.progress = progress
        self.policy = self.config.resolved_policy()
        self.run_dir: RunDir | None = None
        self.pool: EnginePool | None = None
        self.plane: DataPlane | None = None

    @property
    def url(self) -> str:
        assert self.plane is not None, "stack not started"
        return self.plane.url

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def engines(self) -> list[Engine]:
        return self.pool.engines if self.pool else []

    @property
    def model(self) -> str:
        return self.engines[0].model

    def pids(self) -> list[int]:
        """Every process this stack started directly (engines, sidecars, picker, gateway)."""
        pids = [e.pid for e in self.engines]
        return pids + (self.plane.pids() if self.plane else [])

    async def start(self) -> LocalStack:
        cfg = self.config
        self.run_dir = RunDir(keep=cfg.keep_run_dir)
        try:
            self.pool = EnginePool(cfg.engines, run_dir=self.run_dir, model_dir=cfg.model_dir,
                                   max_num_seqs=cfg.max_num_seqs or self.policy.slots_per_endpoint,
                                   scheduling_policy=cfg.scheduling_policy, vllm_args=cfg.vllm_args,
                                   timeout_s=cfg.engine_timeout_s, progress=self.progress)
            await self.pool.start()
            keep_file = cfg.policy is None and cfg.chunk_size is None and cfg.policy_file is not None
            self.plane = DataPlane(self.pool.engines, self.policy, self.run_dir, mode=cfg.mode, port=cfg.port,
                                   policy_path=cfg.policy_file.resolve() if keep_file and cfg.policy_file
                                   else None, progress=self.progress, picker_args=cfg.picker_args)
            await self.plane.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.plane:
                await self.plane.stop()
        with contextlib.suppress(Exception):
            if self.pool:
                await self.pool.stop()
        if self.run_dir:
            self.run_dir.close()

    async def __aenter__(self) -> LocalStack:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.stop())
