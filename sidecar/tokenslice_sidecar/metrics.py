"""The sidecar's own Prometheus metrics, on a per-app registry (no process-global state).

Served at ``contract.SIDECAR_METRICS_PATH``; ``/metrics`` on the same port is vLLM's.
The pause histogram is the preemption the scheduler applied: time from the last
token of chunk k to the first token of chunk k+1.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class SidecarMetrics:
    """All sidecar metrics of one app; cheap to create per test server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tokenslice_sidecar_requests", "Client requests by endpoint and mode.",
                                ["endpoint", "mode"], registry=r)
        self.passthrough = Counter("tokenslice_sidecar_passthrough",
                                   "Client requests run unchunked, by reason.", ["reason"], registry=r)
        self.chunks = Counter("tokenslice_sidecar_chunks", "Chunks issued by the driver.", registry=r)
        self.chunk_latency = Histogram("tokenslice_sidecar_chunk_seconds",
                                       "Chunk wall time, request sent to last token.",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.chunk_tokens = Histogram("tokenslice_sidecar_chunk_tokens", "Tokens produced per chunk.",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.pause = Histogram("tokenslice_sidecar_pause_seconds",
                               "Time from the end of chunk k to the first token of chunk k+1.",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.worker_chunks = Counter("tokenslice_sidecar_worker_chunks",
                                     "Chunks executed by the worker role.", registry=r)
        self.cuts = Counter("tokenslice_sidecar_cuts", "Running chunks this worker cut on the picker's order, "
                            "by reason.", ["reason"], registry=r)
        self.cut_tokens = Histogram("tokenslice_sidecar_cut_tokens", "Tokens a cut chunk had produced when cut.",
                                    buckets=_TOKEN_BUCKETS, registry=r)
        self.slices_cut = Counter("tokenslice_sidecar_slices_cut", "Driver chunks that ended before their slice "
                                  "was used up (cut by the picker) and were continued.", registry=r)
        self.failovers = Counter("tokenslice_sidecar_failovers", "Driver chunks that failed by a fault of the "
                                 "serving side and were resumed from the tokens already streamed, by fault.",
                                 ["fault"], registry=r)
        self.rejected = Counter("tokenslice_sidecar_rejected",
                                "Requests refused, by reason.", ["reason"], registry=r)
        self.errors = Counter("tokenslice_sidecar_errors", "Upstream/driver failures, by stage.",
                              ["stage"], registry=r)
        self.cancelled = Counter("tokenslice_sidecar_cancelled",
                                 "Client requests whose client went away mid-generation.", registry=r)
        self.inflight = Gauge("tokenslice_sidecar_inflight_upstream",
                              "Upstream chunk requests currently open (driver and worker).", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
