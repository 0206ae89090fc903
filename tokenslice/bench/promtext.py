"""Read Prometheus text exposition (vLLM's and the gateway's /metrics) into plain numbers."""

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
CACHE_CONFIG = "vllm:cache_config_info"


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
