"""The picker process: gRPC (ext_proc + health), the metrics endpoint, and the background sources.

``start_picker(...)`` runs it in-process (tests, benchmarks); ``tokenslice picker`` runs it as a
service (see ``tokenslice_picker.cli``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from tokenslice import contract
from tokenslice.identity import Identity
from tokenslice.policy import SchedulingPolicySpec
from tokenslice_picker.admission import Admission
from tokenslice_picker.cuts import CutSender
from tokenslice_picker.datastore.endpoints import Datastore
from tokenslice_picker.datastore.scraper import MetricsScraper
from tokenslice_picker.dispatcher import Dispatcher
from tokenslice_picker.extproc import SERVICE, ExtProcServicer
from tokenslice_picker.metrics import PickerMetrics
from tokenslice_picker.policy_source import PolicyFile
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.profile import default_profile
from tokenslice_picker.scheduling.residency import ResidencyAwareVictims, ResidencyTracker

log = logging.getLogger("tokenslice_picker.server")
DEFAULT_MAX_SLICE_TOKENS = 4096
"""Long slices by default (issue 12): one slice per request unless cut, so a slice end costs nothing while
nobody waits; the class's ``chunkSize`` is only the fairness quantum.  Measured: 95.7-97.5% of vLLM FCFS
throughput where slices of 32 tokens kept 37-77% (docs/picker.md).  Read it through ``PickerSettings``."""
DEFAULT_FAIR_SHARE_SLACK_QUANTA = 16.0
"""A fair-share cut waits until the victim's tenant is 16 quanta ahead (virtual cost): the H200 headline cut 39
times a second and kept 73% of FCFS throughput when any lead triggered one (docs/benchmarks.md)."""
# gRPC health service names, as the GIE endpoint picker answers them: alive once serving; ready (and the
# ext_proc service itself) once the pool's endpoints are known
LIVENESS = ("", "liveness")
READINESS = ("readiness", SERVICE)


class PickerSettings(BaseModel):
    """Everything the picker is configured with; ``tokenslice picker --help`` has a flag for each
    field except ``policy`` (in-process only) and ``signing_key`` (``--signing-key-file``)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    signing_key: bytes = Field(min_length=contract.MIN_KEY_BYTES, repr=False)
    endpoints: list[str] = Field(default_factory=list, description="Static pool (local mode): ip:port.")
    policy_path: Path | None = None
    policy: SchedulingPolicySpec | None = Field(default=None, description="In-process policy (no file).")
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, lt=65536)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, lt=65536, description="None: no metrics server.")
    policy_poll_s: float = Field(default=1.0, gt=0)
    scrape_interval_s: float = Field(default=1.0, ge=0, description="0 disables scraping /metrics.")
    prefill_tokens_per_second: float = Field(default=4000.0, gt=0, description="Migration cost model.")
    default_chunk_seconds: float = Field(default=1.0, gt=0, description="Chunk duration before any is observed.")
    idle_grace_s: float = Field(default=2.0, ge=0, description="A tenant is idle this long after its last chunk.")
    preemption: bool = Field(default=True, description="Cut a running chunk for a more important waiter.")
    cut_timeout_s: float = Field(default=2.0, gt=0, description="How long a cut may take to be acknowledged.")
    max_slice_tokens: int = Field(default=DEFAULT_MAX_SLICE_TOKENS, ge=0, description=(
        "Long slices (the default): admit requests with this slice (if above the class's chunk size, which "
        "stays the fairness quantum) and cut a running slice when a more important chunk or an owed tenant "
        "waits; 0 = per-slice mode, slices of the class's chunk size (the old behaviour, for comparison)."))
    fair_share_slack_quanta: float = Field(default=DEFAULT_FAIR_SHARE_SLACK_QUANTA, ge=0, description=(
        "A fair-share cut only when the running slice's tenant is ahead of the waiter's by this many of the "
        "class's quanta (virtual cost): hysteresis, so long slices are not cut at every crossing of two "
        "tenants' counters (each cut costs a continuation); 0 = cut as soon as the waiter's tenant is behind."))
    kv_residency: bool = Field(default=False, description=(
        "Residency-aware scheduling: model each engine's prefix-cache LRU, resume resident continuations "
        "first within a class, no fair-share cut that would overflow the cache (scheduling.residency)."))
    kv_capacity_tokens: int = Field(default=0, ge=0, description="Each engine's KV cache in tokens (0: scraped).")
    kv_offload_tokens: int = Field(default=0, ge=0, description=(
        "Each engine's CPU offload tier in tokens (vLLM --kv-offloading-size): resident but slower."))
    residency_bonus_tokens: float = Field(default=256.0, ge=0, description=(
        "How far (virtual tokens) a resident continuation may run ahead of its class's fair-share order."))
    load_weight: float = 1.0
    prefix_weight: float = 2.0
    kv_cache_weight: float = 0.5
    driver_weight: float = 0.5
    kube: bool = False
    pool: str | None = None
    namespace: str = "default"
    kubeconfig: Path | None = None
    policy_name: str | None = Field(default=None, description="Kubernetes mode: watch this SchedulingPolicy CR.")
    api_keys_file: Path | None = Field(default=None, description="YAML list of {tenant, key}: Bearer API keys.")
    identity_header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$",
                                        description="Tenant header set by an authenticating proxy.")
    trusted_proxies: list[str] = Field(default_factory=list, description="CIDRs identity_header is believed from.")
    trust_tenant_header: bool = Field(default=False, description="Believe the policy's tenantHeader (a client's "
                                      "word): loopback demos and benchmarks only.")


class Picker:
    """A running picker. ``grpc_port`` is what Envoy's ext_proc cluster points at."""

    def __init__(self, settings: PickerSettings) -> None:
        self.settings = settings
        self.metrics = PickerMetrics()
        self.policy_file: PolicyFile | None = None
        if settings.policy is not None:
            policy = settings.policy
        elif settings.policy_path is not None:
            self.policy_file = PolicyFile(settings.policy_path, self.set_policy,
                                          lambda r: self.metrics.policy_reloads.labels(r).inc(),
                                          settings.policy_poll_s)
            policy = self.policy_file.load()
        else:
            policy = SchedulingPolicySpec()
        self.datastore = Datastore(settings.endpoints, default_chunk_s=settings.default_chunk_seconds)
        self.cuts = CutSender(settings.signing_key, settings.cut_timeout_s) if settings.preemption else None
        residency = ResidencyTracker(capacity_tokens=settings.kv_capacity_tokens,
                                     offload_tokens=settings.kv_offload_tokens,
                                     bonus_tokens=settings.residency_bonus_tokens) if settings.kv_residency else None
        profile = default_profile(load_weight=settings.load_weight, prefix_weight=settings.prefix_weight,
                                  kv_cache_weight=settings.kv_cache_weight, driver_weight=settings.driver_weight)
        if residency is not None and profile.victim_selector is not None:
            profile.victim_selector = ResidencyAwareVictims(profile.victim_selector, residency)
        self.dispatcher = Dispatcher(
            policy, self.datastore, self.metrics,
            cost_model=CostModel(settings.prefill_tokens_per_second),
            profile=profile, idle_grace_s=settings.idle_grace_s, cut=self.cuts.send if self.cuts else None,
            max_slice_tokens=settings.max_slice_tokens, fair_share_slack_quanta=settings.fair_share_slack_quanta,
            residency=residency)
        d = self.dispatcher
        self.admission = Admission(self.datastore, d.queues, d.ledger, d.limits, d.profile, d.cost_model,
                                   max_slice_tokens=settings.max_slice_tokens)
        self.metrics.attach(self.dispatcher)
        self.identity = Identity.configure(api_keys_file=settings.api_keys_file,
                                           trusted_header=settings.identity_header,
                                           trusted_proxies=settings.trusted_proxies,
                                           trust_tenant_header=settings.trust_tenant_header)
        interval = settings.scrape_interval_s
        self.scraper = MetricsScraper(self.datastore, interval) if interval else None
        self._grpc: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._kube: object | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self.grpc_port = 0
        self.metrics_port: int | None = None

    @property
    def policy(self) -> SchedulingPolicySpec:
        return self.dispatcher.policy

    def set_policy(self, policy: SchedulingPolicySpec) -> None:
        self.dispatcher.set_policy(policy)

    async def start(self) -> None:
        s = self.settings
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1_000_000),
                                          ("grpc.so_reuseport", 0)])
        ExtProcServicer(self.dispatcher, self.admission, s.signing_key, self.identity).add_to_server(server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.grpc_port = server.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        if not self.grpc_port:
            raise OSError(f"cannot bind gRPC on {s.grpc_host}:{s.grpc_port}")
        await server.start()
        self._grpc = server
        if s.metrics_port is not None:
            app = web.Application()
            app.router.add_get("/metrics", self._serve_metrics)
            app.router.add_get("/healthz", self._serve_health)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, s.metrics_host, s.metrics_port)
            await site.start()
            self._metrics_runner = runner
            self.metrics_port = runner.addresses[0][1]
        if self.policy_file:
            self.policy_file.start()
        if self.scraper:
            self.scraper.start()
        if s.kube:
            from tokenslice_picker.datastore.kube import KubeSources

            self._kube = KubeSources(s, self.datastore, self.set_policy,
                                     lambda r: self.metrics.policy_reloads.labels(r).inc())
            await self._kube.start()  # type: ignore[attr-defined]
        await self._set_health(LIVENESS, ready=True)
        if s.kube:  # ready once the pool's pods have been listed: before that every pick would be a 503
            self._ready_task = asyncio.create_task(self._ready_when_synced(), name="picker-readiness")
        else:
            await self._set_health(READINESS, ready=True)
        log.info("picker started", extra={"grpc_port": self.grpc_port, "metrics_port": self.metrics_port,
                                           "endpoints": self.datastore.addresses()})

    async def _set_health(self, names: tuple[str, ...], ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await self._health.set(name, status)  # type: ignore[union-attr]

    async def _ready_when_synced(self) -> None:
        await self._set_health(READINESS, ready=False)
        await self._kube.synced.wait()  # type: ignore[attr-defined]
        await self._set_health(READINESS, ready=True)
        log.info("picker ready", extra={"endpoints": self.datastore.addresses()})

    async def _serve_health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._ready_task:
            self._ready_task.cancel()
        if self._health:
            await self._health.enter_graceful_shutdown()
        for part in (self.policy_file, self.scraper, self._kube):
            if part is not None:
                await part.stop()  # type: ignore[attr-defined]
        if self._grpc:
            await self._grpc.stop(grace_s)
        await self.dispatcher.close()
        if self.cuts:
            await self.cuts.close()
        if self._metrics_runner:
            await self._metrics_runner.cleanup()

    async def serve_forever(self) -> None:
        assert self._grpc is not None
        await self._grpc.wait_for_termination()


async def start_picker(**settings: object) -> Picker:
    """Start a picker in this event loop: ``await start_picker(signing_key=..., endpoints=[...])``."""
    picker = Picker(PickerSettings(**settings))  # type: ignore[arg-type]
    try:
        await picker.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await picker.stop(0)
        raise
    return picker


__all__ = ["Picker", "PickerSettings", "start_picker"]
