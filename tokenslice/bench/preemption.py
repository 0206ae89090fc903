"""What preemption cost in a run, from the picker's own metrics (revocable slices: signed cuts).

Per system: how many running chunks were cut and how often, how long from the cut to the
victim's slot being handed to its waiter, how long the waiter's class waited for a slot at
all, and the tokens the cut chunks' continuations recompute (the picker's estimate: context
past the last full KV block). The client side of the same story -- the waiter's first token --
is the focus stream's TTFT in the main table.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenslice import promtext

PREFIXES = ("tokenslice_picker_", "tokenslice_gateway_")


def _name(samples: list[promtext.Sample], suffix: str) -> str:
    for prefix in PREFIXES:
        if any(s.name.startswith(prefix + suffix) for s in samples):
            return prefix + suffix
    return PREFIXES[0] + suffix


def summarize(samples: Iterable[promtext.Sample], seconds: float, waiter_class: str | None) -> dict[str, float | None]:
    """Preemption numbers of one system's picker (its totals: the picker starts with the data plane)."""
    samples = list(samples)
    preemptions = promtext.total(samples, _name(samples, "preemptions_total"))
    cut_free = _name(samples, "cut_to_free_seconds")
    wait = _name(samples, "queue_wait_seconds")
    cls = {"class": waiter_class} if waiter_class else {}
    tokens = _name(samples, "cut_tokens_total")
    recomputed = sum(s.value for s in samples if s.name == tokens and s.labels.get("kind") == "recomputed")
    produced = sum(s.value for s in samples if s.name == tokens and s.labels.get("kind") == "produced")
    return {
        "preemptions": preemptions,
        "preemptions_per_s": preemptions / seconds if seconds > 0 else None,
        "cut_to_free_p50_s": promtext.histogram_quantile(samples, cut_free, 0.5),
        "cut_to_free_p99_s": promtext.histogram_quantile(samples, cut_free, 0.99),
        "waiter_queue_p50_s": promtext.histogram_quantile(samples, wait, 0.5, **cls),
        "waiter_queue_p99_s": promtext.histogram_quantile(samples, wait, 0.99, **cls),
        "recomputed_tokens_per_preemption": recomputed / preemptions if preemptions else None,
        "cut_chunk_tokens_per_preemption": produced / preemptions if preemptions else None,
        "cut_failures": promtext.total(samples, _name(samples, "cut_failures_total")),
    }
