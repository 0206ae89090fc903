"""Prometheus text exposition (vLLM's, the picker's, the sidecars' /metrics) read into plain numbers.

The one parser for measurement (the bench, the GPU runs, the tests) and the one list of the vLLM
metric names tokenslice reads. The picker's hot-path scraper parses by hand for speed but takes
its names from here, so a vLLM rename is fixed in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# vLLM's own prefix-cache counters (tokens): the source of the KV-affinity hit rate.
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_CONFIG = "vllm:cache_config_info"
# names older vLLM releases used for the same series
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
PREFIX_QUERIES_OLD = "vllm:gpu_prefix_cache_queries_total"
PREFIX_HITS_OLD = "vllm:gpu_prefix_cache_hits_total"
# engine-side numbers of the per-chunk breakdown
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
REQUEST_SUCCESS = "vllm:request_success_total"
QUEUE_TIME = "vllm:request_queue_time_seconds"
PREFILL_TIME = "vllm:request_prefill_time_seconds"
INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"
TIME_PER_OUTPUT_TOKEN = "vllm:time_per_output_token_seconds"  # older name of the inter-token latency
ITERATION_TOKENS = "vllm:iteration_tokens_total"
NUM_PREEMPTIONS = "vllm:num_preemptions_total"


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    return [Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: Iterable[Sample], name: str) -> float:
    """Sum of every sample called ``name`` (across label sets); 0 if absent."""
    return sum(s.value for s in samples if s.name == name)


def totals_matching(samples: Iterable[Sample], *fragments: str, suffix: str = "_total") -> dict[str, float]:
    """``{name: summed value}`` of counters whose name contains all ``fragments`` (e.g. 'preempt')."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name.endswith(suffix) and all(f in s.name for f in fragments):
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def flatten(samples: Iterable[Sample], by_label: str | None = None) -> dict[str, float]:
    """``name -> value`` summed over label sets (histogram buckets and ``_created`` left out); with
    ``by_label``, also ``name{value}`` for every sample carrying that label (e.g. per class)."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name.endswith(("_bucket", "_created")):
            continue
        out[s.name] = out.get(s.name, 0.0) + s.value
        if by_label and by_label in s.labels:
            key = f"{s.name}{{{s.labels[by_label]}}}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def histogram_quantile(samples: Iterable[Sample], name: str, q: float, **match: str) -> float | None:
    """The ``q`` quantile (0..1) of histogram ``name`` (buckets summed over the label sets matching ``match``),
    interpolated linearly inside the bucket as Prometheus does; None with no observations. The answer is
    only as fine as the buckets: a value in the first bucket is reported inside [0, its bound]."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name != f"{name}_bucket" or any(s.labels.get(k) != v for k, v in match.items()):
            continue
        bound = float(s.labels["le"])
        buckets[bound] = buckets.get(bound, 0.0) + s.value
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bound: say the bound, the most we know
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


def label(samples: Iterable[Sample], name: str, key: str) -> str | None:
    for s in samples:
        if s.name == name and key in s.labels:
            return s.labels[key]
    return None


async def scrape(session: aiohttp.ClientSession, url: str) -> list[Sample]:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return parse(await resp.text())


async def scrape_all(urls: Iterable[str]) -> list[list[Sample]]:
    """Scrape several endpoints at once; an unreachable one gives an empty list, not an exception."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def one(url: str) -> list[Sample]:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
                return await scrape(session, url)
            return []
        return list(await asyncio.gather(*(one(u) for u in urls)))
