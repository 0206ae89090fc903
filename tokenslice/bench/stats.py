"""The numbers of a run: per-request latencies, percentiles, SLO attainment, throughput, Jain fairness.

Pure functions over the per-request records, so the arithmetic is unit-tested
against hand-computed values and independent of how the requests were sent.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tokenslice.fairness import jain_index

Status = Literal["ok", "cancelled", "timeout", "error"]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default).

    NaN for no values; +inf if the rank falls on an infinite value.
    """
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    frac = pos - lo
    if frac == 0:
        return data[lo]
    if math.isinf(data[hi]):
        return data[hi]
    return data[lo] + (data[hi] - data[lo]) * frac


@dataclass(slots=True)
class RequestResult:
    """What one request saw, times in seconds since the run's start."""

    index: int
    stream: str
    tenant: str
    priority_class: str
    scheduled: float
    sent: float = math.nan
    first_token: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    """Arrival time of every streamed event that carried tokens."""
    token_counts: list[int] = field(default_factory=list)
    """Tokens in each of those events (vLLM merges several into one event when the client lags)."""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    status: Status = "ok"
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.end is None or self.status != "ok" else self.end - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (the usual TPOT / inter-token latency)."""
        if self.first_token is None or self.end is None or self.status != "ok" or self.completion_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.completion_tokens - 1)

    @property
    def longest_pause(self) -> float | None:
        """Largest gap between consecutive tokens: how long the client saw the stream stall."""
        if len(self.token_times) < 2:
            return None
        return max(b - a for a, b in zip(self.token_times, self.token_times[1:]))

    def tokens_between(self, start: float, stop: float) -> float:
        """Output tokens delivered in [start, stop).

        Exact when the per-event counts are known; otherwise the usage count spread evenly over the events.
        """
        if not self.token_times:
            return 0.0
        if len(self.token_counts) == len(self.token_times):
            return float(sum(n for t, n in zip(self.token_times, self.token_counts) if start <= t < stop))
        per_event = (self.completion_tokens or len(self.token_times)) / len(self.token_times)
        return per_event * sum(1 for t in self.token_times if start <= t < stop)


def ttft_censored(r: RequestResult, cutoff: float) -> float | None:
    """TTFT, or for a request still waiting at ``cutoff`` a lower bound (cutoff - sent)."""
    if r.ttft is not None:
        return r.ttft
    if r.status in ("timeout", "cancelled") and not math.isnan(r.sent):
        return max(0.0, cutoff - r.sent)
    return None


@dataclass(slots=True)
class Dist:
    p50: float
    p90: float
    p99: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        return cls(percentile(values, 50), percentile(values, 90), percentile(values, 99),
                   max(values) if values else math.nan, len(values))


@dataclass(slots=True)
class GroupSummary:
    """Latency and SLO numbers of one stream (a tenant sending one class)."""

    name: str
    tenant: str
    priority_class: str
    requests: int
    completed: int
    censored: int
    ttft: Dist
    tpot: Dist
    e2e: Dist
    longest_pause: Dist
    output_tokens: int
    slo_attainment: float | None
    goodput_rps: float | None


def summarize_group(name: str, results: Sequence[RequestResult], cutoff: float, duration: float,
                    slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> GroupSummary:
    """Summary of one stream. Requests that never got a first token count with a censored TTFT (lower bound)."""
    ttfts = [t for r in results if (t := ttft_censored(r, cutoff)) is not None]
    censored = sum(1 for r in results if r.ttft is None and ttft_censored(r, cutoff) is not None)
    done = [r for r in results if r.status == "ok" and r.end is not None]
    slo = goodput = None
    if slo_ttft_s is not None or slo_tpot_s is not None:
        def meets(r: RequestResult) -> bool:
            if r.status != "ok" or r.ttft is None:
                return False
            if slo_ttft_s is not None and r.ttft > slo_ttft_s:
                return False
            tpot = r.tpot
            return slo_tpot_s is None or tpot is None or tpot <= slo_tpot_s
        met = sum(1 for r in results if meets(r))
        slo = met / len(results) if results else math.nan
        goodput = met / duration if duration > 0 else math.nan
    first = results[0] if results else None
    return GroupSummary(
        name=name,
        tenant=first.tenant if first else "",
        priority_class=first.priority_class if first else "",
        requests=len(results),
        completed=len(done),
        censored=censored,
        ttft=Dist.of(ttfts),
        tpot=Dist.of([t for r in done if (t := r.tpot) is not None]),
        e2e=Dist.of([e for r in done if (e := r.e2e) is not None]),
        longest_pause=Dist.of([p for r in results if (p := r.longest_pause) is not None]),
        output_tokens=sum(r.completion_tokens for r in results),
        slo_attainment=slo,
        goodput_rps=goodput,
    )


def throughput(results: Iterable[RequestResult], start: float, stop: float) -> float:
    """Output tokens per second delivered to clients in [start, stop)."""
    if stop <= start:
        return math.nan
    return sum(r.tokens_between(start, stop) for r in results) / (stop - start)


Interval = tuple[float, float]

STALL_S = 1.0
"""A gap between two tokens of one request longer than this is a pause: the request waited for a slot."""


@dataclass(slots=True)
class Backlogged:
    """The same share numbers restricted to the time in which every tenant of the class was backlogged.

    Weighted fair share (the VTC guarantee) promises weight-proportional service only among tenants that
    all want more than they get; a tenant that asks for less than its share is served what it asks and
    the rest goes to the others (weighted max-min fairness). Measured over the whole window, that reads
    as unfair; measured only while both wait, it is what the scheduler promised.
    """

    seconds: float
    """Length of the intervals in [start, stop) in which every tenant was backlogged (see ``backlogged``)."""
    service: dict[str, float]
    output_tokens: dict[str, float]
    jain: float
    max_share_error: float
    token_share_error: float


@dataclass(slots=True)
class Fairness:
    """Weighted service among the tenants of one class over [start, stop)."""

    priority_class: str
    service: dict[str, float]
    """Service in the policy's currency: input_cost * prompt tokens (charged when the request's first token
    arrives, i.e. when its prefill ran) + output_cost * output tokens delivered in the window."""
    weights: dict[str, float]
    jain: float
    """Jain index of service / weight, over the whole window."""
    max_share_error: float
    """max over tenants of |observed share / weighted share - 1| (0.05 = within 5%), of ``service``, over the
    whole window -- whether or not each tenant asked for its share (the old number)."""
    output_tokens: dict[str, float] = field(default_factory=dict)
    token_share_error: float = math.nan
    """The same error measured in output tokens only."""
    backlogged: Backlogged | None = None
    """The same, counted only while every tenant was backlogged: the fair-share measure."""


def share_error(service: dict[str, float], weights: dict[str, float]) -> float:
    total, wtotal = sum(service.values()), sum(weights[t] for t in service)
    if total <= 0:
        return math.nan
    return max(abs((service[t] / total) / (weights[t] / wtotal) - 1) for t in service)


def _merge(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(x: list[Interval], y: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    i = j = 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if b > a:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def waiting(r: RequestResult, stop: float, stall_s: float = STALL_S) -> list[Interval]:
    """When request ``r`` was waiting for service: from being sent to its first token (or, never served,
    to its end or ``stop``), and every gap between two of its tokens longer than ``stall_s`` (paused)."""
    if math.isnan(r.sent):
        return []
    first = r.first_token if r.first_token is not None else (r.end if r.end is not None else stop)
    out = [(r.sent, first)]
    out += [(a, b) for a, b in zip(r.token_times, r.token_times[1:]) if b - a > stall_s]
    return out


def backlogged(results: Iterable[RequestResult], tenant: str, priority_class: str, start: float, stop: float,
               stall_s: float = STALL_S) -> list[Interval]:
    """The intervals in [start, stop) in which ``tenant`` was backlogged in ``priority_class``.

    Backlogged = it had a request that was waiting for service: sent and not yet given its first token, or
    paused mid-answer (no token for longer than ``stall_s``). A tenant whose requests all stream is being
    served what it asked for, so it is not owed more -- even though it has unfinished requests.
    """
    spans = [w for r in results if r.tenant == tenant and r.priority_class == priority_class
             for w in waiting(r, stop, stall_s)]
    return _intersect(_merge(spans), [(start, stop)])


def _tokens_in(r: RequestResult, spans: list[Interval]) -> float:
    """Output tokens delivered at instants inside ``spans`` (closed intervals: a token that ends a wait counts)."""
    if not r.token_times or not spans:
        return 0.0
    counts = (r.token_counts if len(r.token_counts) == len(r.token_times)
              else [(r.completion_tokens or len(r.token_times)) / len(r.token_times)] * len(r.token_times))
    return float(sum(n for t, n in zip(r.token_times, counts) if _inside(t, spans)))


def _inside(t: float, spans: list[Interval]) -> bool:
    """``t`` in one of ``spans`` (sorted, disjoint, as ``_merge`` / ``_intersect`` return them)."""
    i = bisect.bisect_right(spans, (t, math.inf)) - 1
    return i >= 0 and spans[i][0] <= t <= spans[i][1]


def fairness(results: Iterable[RequestResult], priority_class: str, weights: dict[str, float],
             start: float, stop: float, input_cost: float = 0.0, output_cost: float = 1.0,
             stall_s: float = STALL_S) -> Fairness:
    """Jain index and share error of weight-normalised service per tenant of ``priority_class`` in [start, stop),
    over the whole window and (``backlogged``) only while every tenant of the class was backlogged.

    With the default costs, service is output tokens; pass the policy's ``fairness.input``/``output`` to
    measure in the currency the scheduler shares (a tenant that starts many requests pays for their prefill).
    """
    rows = [r for r in results if r.priority_class == priority_class]
    service: dict[str, float] = {}
    tokens: dict[str, float] = {}
    for r in rows:
        out = r.tokens_between(start, stop)
        prefill = r.prompt_tokens if r.first_token is not None and start <= r.first_token < stop else 0
        tokens[r.tenant] = tokens.get(r.tenant, 0.0) + out
        service[r.tenant] = service.get(r.tenant, 0.0) + output_cost * out + input_cost * prefill
    ws = {t: weights.get(t, 1.0) for t in service}
    both: list[Interval] = [(start, stop)] if service else []
    for t in service:
        both = _intersect(both, backlogged(rows, t, priority_class, start, stop, stall_s))
    b_service = {t: 0.0 for t in service}
    b_tokens = {t: 0.0 for t in service}
    for r in rows:
        out = _tokens_in(r, both)
        prefill = r.prompt_tokens if r.first_token is not None and _inside(r.first_token, both) else 0
        b_tokens[r.tenant] += out
        b_service[r.tenant] += output_cost * out + input_cost * prefill
    served = sum(b_service.values()) > 0
    back = Backlogged(sum(b - a for a, b in both), b_service, b_tokens,
                      jain_index(b_service[t] / ws[t] for t in b_service) if served else math.nan,
                      share_error(b_service, ws),
                      share_error(b_tokens, ws))
    return Fairness(priority_class, service, ws, jain_index(service[t] / ws[t] for t in service),
                    share_error(service, ws), tokens, share_error(tokens, ws), back)
