"""Prometheus metrics of the picker, in its own registry.

Hot-path counters are pre-bound children (a dict lookup per chunk); everything that is a *state*
(queue lengths, oldest wait, slots, Jain index) is read live at scrape time by a collector, so
the per-chunk path never updates a gauge.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway_ext.dispatcher import Dispatcher
    from gateway_ext.flowcontrol.chunk import Chunk

NS = "tokenslice_gateway"
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_wait = Histogram(f"{NS}_queue_wait_seconds", "Time a chunk waited for a slot.",
                                    ["class", "tenant"], buckets=_WAIT_BUCKETS, registry=r)
        self.dispatches = Counter(f"{NS}_dispatches_total", "Chunks granted a slot.",
                                  ["class", "tenant", "kind"], registry=r)
        self.preemptions = Counter(f"{NS}_preemptions_total",
                                   "Pauses: a request's next chunk had to wait for others.",
                                   ["class", "tenant"], registry=r)
        self.preemption_seconds = Histogram(f"{NS}_preemption_seconds", "Duration of pauses.",
                                            ["class"], buckets=_WAIT_BUCKETS, registry=r)
        self.migrations = Counter(f"{NS}_migrations_total",
                                  "Paused requests moved off their KV holder (prefix recomputed).", registry=r)
        self.sheds = Counter(f"{NS}_sheds_total", "Requests refused with 429.", ["reason", "tenant"], registry=r)
        self.rejections = Counter(f"{NS}_rejections_total", "Requests refused otherwise (403 forged, 503).",
                                  ["reason"], registry=r)
        self.tokens_served = Counter(f"{NS}_tokens_served_total", "Output tokens granted per tenant.",
                                     ["tenant"], registry=r)
        self.admissions = Counter(f"{NS}_admissions_total", "Client requests routed to a driver.",
                                  ["class", "tenant"], registry=r)
        self.decision_seconds = Histogram(f"{NS}_decision_seconds",
                                          "Picker time per message, queue wait excluded.",
                                          buckets=_FAST_BUCKETS, registry=r)
        self.chunk_seconds = Histogram(f"{NS}_chunk_seconds", "Grant to chunk end (ext_proc stream close).",
                                       buckets=_WAIT_BUCKETS, registry=r)
        self.policy_reloads = Counter(f"{NS}_policy_reloads_total", "Policy reloads.", ["result"], registry=r)
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def _bound(self, klass: str, tenant: str) -> tuple[Any, ...]:
        key = (klass, tenant)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = (
                self.queue_wait.labels(klass, tenant),
                self.dispatches.labels(klass, tenant, "first"),
                self.dispatches.labels(klass, tenant, "continuation"),
                self.preemptions.labels(klass, tenant),
                self.preemption_seconds.labels(klass),
                self.tokens_served.labels(tenant),
            )
        return c

    def on_dispatch(self, chunk: Chunk, klass: str, wait: float, migrated: bool) -> None:
        wait_h, first, cont, pre, pre_s, tokens = self._bound(klass, chunk.tenant)
        wait_h.observe(wait)
        (cont if chunk.index else first).inc()
        tokens.inc(chunk.slice)
        if chunk.index and chunk.waited:
            pre.inc()
            pre_s.observe(wait)
        if migrated:
            self.migrations.inc()

    def attach(self, dispatcher: Dispatcher) -> None:
        self.registry.register(_StateCollector(dispatcher))


class _StateCollector(Collector):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher

    def collect(self) -> Iterator[GaugeMetricFamily]:
        d = self.d
        now = time.monotonic()
        qlen = GaugeMetricFamily(f"{NS}_queue_length", "Chunks waiting.", labels=["class", "tenant"])
        for (k, t), n in d.queues.lengths().items():
            qlen.add_metric([k, t], n)
        yield qlen
        oldest = GaugeMetricFamily(f"{NS}_queue_oldest_wait_seconds", "Wait so far of the oldest queued chunk.",
                                   labels=["class", "tenant"])
        for (k, t), w in d.queues.oldest(now).items():
            oldest.add_metric([k, t], w)
        yield oldest
        slots = GaugeMetricFamily(f"{NS}_endpoint_slots_granted", "Chunk slots in use per endpoint.",
                                  labels=["endpoint"])
        mean = GaugeMetricFamily(f"{NS}_endpoint_mean_chunk_seconds", "EWMA chunk duration per endpoint.",
                                 labels=["endpoint"])
        for ep in d.datastore.endpoints():
            slots.add_metric([ep.address], ep.granted)
            mean.add_metric([ep.address], ep.mean_chunk_s)
        yield slots
        yield mean
        yield _gauge(f"{NS}_endpoints", "Pool members.", len(d.datastore))
        yield _gauge(f"{NS}_jain_fairness_index",
                     "Jain index of weight-normalised tokens served per tenant over the last minute.", d.jain())
        vtc = GaugeMetricFamily(f"{NS}_virtual_token_counter", "Fair-share counter per class and tenant.",
                                labels=["class", "tenant"])
        for (k, t), v in d.queues.counters.snapshot().items():
            vtc.add_metric([k, t], v)
        yield vtc
        openr = GaugeMetricFamily(f"{NS}_open_requests", "Client requests in flight per tenant.",
                                  labels=["tenant"])
        for t, n in d.limits.open_requests.items():
            openr.add_metric([t], n)
        yield openr


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


