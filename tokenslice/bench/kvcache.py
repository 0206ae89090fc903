"""What pausing cost in KV: continuations that found their prefix, and the prefill tokens recomputed.

Read off vLLM's own counters, scraped from each engine before the system is torn down (the
runner's scrape hook), as deltas over one system's run:

* ``vllm:prompt_tokens_total`` minus ``vllm:prefix_cache_hits_total`` (and minus
  ``vllm:external_prefix_cache_hits_total``, tokens loaded back from vLLM's CPU offload) = prefill tokens computed;
  minus the first chunks' prompts (the client's prompts, which no system can have cached: every
  system's prompts are salted) = tokens *recomputed* by continuations;
* ``vllm:request_prefill_kv_computed_tokens`` (a histogram over every vLLM request = every chunk):
  a continuation whose KV was still cached computes at most one block (the last partial one), so
  chunks at or under the first bucket >= the block size, less the first chunks that small, are
  continuations that *found their prefix*.  Bucket-bounded and counting only chunks vLLM finished:
  an estimate, stated as such in the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenslice import promtext

KV_COMPUTED = "vllm:request_prefill_kv_computed_tokens"
_BUCKET = KV_COMPUTED + "_bucket"
_COUNT = KV_COMPUTED + "_count"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
"""Prompt tokens loaded through a KV connector instead of computed (vLLM's CPU offload: --kv-offloading-size)."""


def engine_kv_counters(scraped: Iterable[Iterable[promtext.Sample]]) -> dict[str, float]:
    """Totals over engines: prompt tokens, and the kv-computed histogram as ``kv_computed_le:<le>`` + count."""
    out: dict[str, float] = {"prompt_tokens": 0.0, "kv_computed_count": 0.0, "offload_hits": 0.0}
    for samples in scraped:
        for s in samples:
            if s.name == promtext.PROMPT_TOKENS:
                out["prompt_tokens"] += s.value
            elif s.name == EXTERNAL_HITS:
                out["offload_hits"] += s.value
            elif s.name == _COUNT:
                out["kv_computed_count"] += s.value
            elif s.name == _BUCKET and "le" in s.labels:
                key = f"kv_computed_le:{s.labels['le']}"
                out[key] = out.get(key, 0.0) + s.value
    return out


@dataclass(frozen=True, slots=True)
class KVCost:
    chunks: float
    """vLLM requests finished (every chunk, first chunks included)."""
    first_chunks: int
    continuations: float
    found_prefix: float | None
    """Continuations that computed at most ``threshold`` tokens (their KV was still cached); None: no histogram."""
    threshold: float | None
    prefill_tokens: float
    cached_tokens: float
    offloaded_tokens: float
    """Prompt tokens loaded back from vLLM's CPU offload (0 without it)."""
    recomputed_tokens: float
    """Prefill tokens computed for continuations (the context they had to rebuild)."""

    @property
    def found_rate(self) -> float | None:
        if self.found_prefix is None or self.continuations <= 0:
            return None
        return self.found_prefix / self.continuations


def kv_cost(counters: dict[str, float], prompt_tokens: Sequence[int], started: Sequence[bool],
            block_size: int) -> KVCost:
    """One system's KV cost from its engine-counter deltas and its requests (prompt size, whether they started)."""
    first_prompts = [p for p, s in zip(prompt_tokens, started) if s]
    prefill = counters.get("prompt_tokens", 0.0)
    cached = counters.get("prefix_cache_hits", 0.0)
    offloaded = counters.get("offload_hits", 0.0)
    chunks = counters.get("kv_computed_count", 0.0)
    buckets = sorted((float(k.split(":", 1)[1]), v) for k, v in counters.items() if k.startswith("kv_computed_le:"))
    threshold = next((le for le, _ in buckets if le >= block_size), None)
    found = None
    if threshold is not None:
        small = dict(buckets)[threshold] - sum(1 for p in first_prompts if p <= threshold)
        found = max(0.0, small)
    continuations = max(0.0, chunks - len(first_prompts))
    return KVCost(chunks=chunks, first_chunks=len(first_prompts), continuations=continuations,
                  found_prefix=min(found, continuations) if found is not None else None, threshold=threshold,
                  prefill_tokens=prefill, cached_tokens=cached, offloaded_tokens=offloaded,
                  recomputed_tokens=max(0.0, prefill - cached - offloaded - sum(first_prompts)))


def estimate(gateway_counters: dict[str, float]) -> str:
    """The picker's own belief about its continuation grants (``--kv-residency``): resident / offloaded / evicted."""
    tiers = [gateway_counters.get(f"residency:{t}") for t in ("resident", "offloaded", "evicted")]
    if all(t is None for t in tiers):
        return "-"
    return " / ".join(f"{t or 0:.0f}" for t in tiers)


def markdown(rows: Sequence[tuple[str, KVCost, float, float | None, str]], kv_tokens: int | None) -> str:
    """``rows``: (system, its KV cost, throughput tok/s, focus stream TTFT p99 s, the picker's estimate)."""
    if not rows:
        return ""
    lines = ["", "KV under pressure (vLLM's counters, deltas over each system's run"
             + (f"; KV cache {kv_tokens} tokens per engine" if kv_tokens else "") + "):", "",
             "| system | continuations | found their prefix | continuation tokens recomputed | per continuation "
             "| prefill tokens (cached / from CPU offload) | throughput tok/s | interactive TTFT p99 "
             "| picker's estimate: resident / offloaded / evicted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, k, tps, p99, est in rows:
        found = ("-" if k.found_rate is None else
                 f"{k.found_prefix:.0f} ({k.found_rate:.0%}, <= {k.threshold:g} computed)")
        per = f"{k.recomputed_tokens / k.continuations:.0f}" if k.continuations else "-"
        lines.append(f"| {label} | {k.continuations:.0f} | {found} | {k.recomputed_tokens:.0f} | {per} "
                     f"| {k.prefill_tokens:.0f} ({k.cached_tokens:.0f} / {k.offloaded_tokens:.0f}) | {tps:.0f} "
                     f"| {'-' if p99 is None else f'{p99:.3f}s'} | {est} |")
    return "\n".join(lines) + "\n"
