"""Prometheus metrics of the picker, in its own registry.

The per-chunk path only touches :class:`FastHistogram` / :class:`FastCounter` -- plain integers in
lists and dicts, no locks (everything runs on one event loop) -- which a collector renders at scrape
time; measured, prometheus_client's locked children cost more than the rest of a decision.
Everything that is a *state* (queue lengths, oldest wait, slots, Jain index) is read live at
scrape time too.  Rare events (sheds, migrations, cuts, reloads) use ordinary prometheus_client counters.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tokenslice_picker.flowcontrol.chunk import Chunk

NS = "tokenslice_picker"
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class FastHistogram:
    """A labelled histogram for the event loop: ``observe`` is a bisect and two additions."""

    def __init__(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.doc, self.label_names = name, doc, list(labels)
        self.bounds = list(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}  # counts per bucket (+Inf last), then sum

    def child(self, *labels: str) -> list[float]:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        return s

    def observe(self, series: list[float], value: float) -> None:
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for labels, s in self.series.items():
            acc, buckets = 0, []
            for bound, n in zip([*map(str, self.bounds), "+Inf"], s[:-1], strict=True):
                acc += n
                buckets.append((bound, acc))
            fam.add_metric(list(labels), buckets, s[-1])
        return fam


class FastCounter:
    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.label_names = name, doc, list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0)

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name.removesuffix("_total"), self.doc, labels=self.label_names)
        for labels, v in self.values.items():
            fam.add_metric(list(labels), v)
        return fam


@dataclass(frozen=True, slots=True)
class EndpointState:
    address: str
    granted: int
    mean_chunk_s: float


@dataclass(frozen=True, slots=True)
class PickerSnapshot:
    """The picker's state as the scrape sees it (read live, at scrape time)."""

    queue_lengths: dict[tuple[str, str], int]
    queue_oldest: dict[tuple[str, str], float]
    endpoints: list[EndpointState]
    jain: float
    virtual_counters: dict[tuple[str, str], float]
    open_requests: dict[str, int]


class SnapshotSource(Protocol):
    def snapshot(self, now: float) -> PickerSnapshot: ...


class PickerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # hot path (rendered by the collector)
        self.queue_wait = FastHistogram(f"{NS}_queue_wait_seconds", "Time a chunk waited for a slot.",
                                        ["class", "tenant"], _WAIT_BUCKETS)
        self.dispatches = FastCounter(f"{NS}_dispatches_total", "Chunks granted a slot.", ["class", "tenant", "kind"])
        self.tokens_served = FastCounter(f"{NS}_tokens_served_total", "Output tokens granted per tenant.",
                                         ["tenant"])
        self.decision_seconds = FastHistogram(f"{NS}_decision_seconds",
                                              "Picker time per message, queue wait excluded.", [], _FAST_BUCKETS)
        self.chunk_seconds = FastHistogram(f"{NS}_chunk_seconds", "Grant to chunk end (ext_proc stream close).",
                                           [], _WAIT_BUCKETS)
        self.decision_series = self.decision_seconds.child()
        self.chunk_series = self.chunk_seconds.child()
        # rare events
        self.pauses = Counter(f"{NS}_pauses_total", "Pauses: a request's next chunk had to wait for others.",
                              ["class", "tenant"], registry=r)
        self.pause_seconds = Histogram(f"{NS}_pause_seconds", "Duration of pauses.",
                                       ["class"], buckets=_WAIT_BUCKETS, registry=r)
        self.preemptions = Counter(f"{NS}_preemptions_total",
                                   "Cuts sent: a running chunk revoked for a waiter (reason, the victim's class).",
                                   ["reason", "class"], registry=r)
        self.cut_failures = Counter(f"{NS}_cut_failures_total",
                                    "Cuts the worker did not act on (not_running, unreachable, http_<status>).",
                                    ["result"], registry=r)
        self.cut_to_free_seconds = Histogram(f"{NS}_cut_to_free_seconds",
                                             "Cut sent -> the victim's slot handed to its waiter.",
                                             buckets=_WAIT_BUCKETS, registry=r)
        self.cut_tokens = Counter(f"{NS}_cut_tokens_total",
                                  "Cost of cuts: tokens the cut chunks produced (kept) and the tokens their "
                                  "continuations recompute (past the last full KV block; an estimate).",
                                  ["kind"], registry=r)
        self.residency = Counter(f"{NS}_continuation_residency_total",
                                 "Continuation chunks granted, by where the picker estimated their KV was "
                                 "(resident / offloaded / evicted / unknown; --kv-residency only).",
                                 ["tier"], registry=r)
        self.migrations = Counter(f"{NS}_migrations_total",
                                  "Paused requests moved off their KV holder (prefix recomputed).", registry=r)
        self.sheds = Counter(f"{NS}_sheds_total", "Requests refused with 429.", ["reason", "tenant"], registry=r)
        self.rejections = Counter(f"{NS}_rejections_total", "Requests refused otherwise (403 forged, 503).",
                                  ["reason"], registry=r)
        self.admissions = Counter(f"{NS}_admissions_total", "Client requests routed to a driver.",
                                  ["class", "tenant"], registry=r)
        self.slices_capped = Counter(f"{NS}_slices_capped_total",
                                     "Chunks whose claimed slice exceeded their class's chunk size (accounted "
                                     "at the class's chunk size).", ["class"], registry=r)
        self.policy_reloads = Counter(f"{NS}_policy_reloads_total", "Policy reloads.", ["result"], registry=r)
        self._wait_series: dict[tuple[str, str], list[float]] = {}

    def on_dispatch(self, chunk: Chunk, wait: float, migrated: bool) -> None:
        pclass = chunk.priority_class
        key = (pclass, chunk.tenant)
        series = self._wait_series.get(key)
        if series is None:
            series = self._wait_series[key] = self.queue_wait.child(pclass, chunk.tenant)
        self.queue_wait.observe(series, wait)
        self.dispatches.inc((pclass, chunk.tenant, "continuation" if chunk.index else "first"))
        if chunk.waited and chunk.index:
            self.pauses.labels(pclass, chunk.tenant).inc()
            self.pause_seconds.labels(pclass).observe(wait)
        if migrated:
            self.migrations.inc()

    def attach(self, source: SnapshotSource) -> None:
        self.registry.register(_StateCollector(source, self))


class _StateCollector(Collector):
    def __init__(self, source: SnapshotSource, metrics: PickerMetrics) -> None:
        self.source = source
        self.m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        m = self.m
        for fast in (m.queue_wait, m.dispatches, m.tokens_served, m.decision_seconds, m.chunk_seconds):
            yield fast.family()
        snap = self.source.snapshot(time.monotonic())
        qlen = GaugeMetricFamily(f"{NS}_queue_length", "Chunks waiting.", labels=["class", "tenant"])
        for (k, t), n in snap.queue_lengths.items():
            qlen.add_metric([k, t], n)
        yield qlen
        oldest = GaugeMetricFamily(f"{NS}_queue_oldest_wait_seconds", "Wait so far of the oldest queued chunk.",
                                   labels=["class", "tenant"])
        for (k, t), w in snap.queue_oldest.items():
            oldest.add_metric([k, t], w)
        yield oldest
        slots = GaugeMetricFamily(f"{NS}_endpoint_slots_granted", "Chunk slots in use per endpoint.",
                                  labels=["endpoint"])
        mean = GaugeMetricFamily(f"{NS}_endpoint_mean_chunk_seconds", "EWMA chunk duration per endpoint.",
                                 labels=["endpoint"])
        for ep in snap.endpoints:
            slots.add_metric([ep.address], ep.granted)
            mean.add_metric([ep.address], ep.mean_chunk_s)
        yield slots
        yield mean
        yield _gauge(f"{NS}_endpoints", "Pool members.", len(snap.endpoints))
        yield _gauge(f"{NS}_jain_fairness_index",
                     "Jain index of weight-normalised tokens served per tenant over the last minute.", snap.jain)
        vtc = GaugeMetricFamily(f"{NS}_virtual_token_counter", "Fair-share counter per class and tenant.",
                                labels=["class", "tenant"])
        for (k, t), v in snap.virtual_counters.items():
            vtc.add_metric([k, t], v)
        yield vtc
        openr = GaugeMetricFamily(f"{NS}_open_requests", "Client requests in flight per tenant.",
                                  labels=["tenant"])
        for t, n in snap.open_requests.items():
            openr.add_metric([t], n)
        yield openr


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


