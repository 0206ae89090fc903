"""Per-system, per-chunk breakdown of a run, from the components' own metrics.

The runner scrapes every part of a system's data plane -- the sidecars
(``/tokenslice/metrics``), the picker and the engines (``/metrics``) -- once before its
trace and once more *before* tearing it down (:class:`Observation`), so the report can
say where a chunk's time went: chunk wall time, pause between chunks, the picker's
queue wait and decision time, vLLM's queue, prefill and inter-token latency, prefix
cache hits.  Written as ``chunk_breakdown.{json,md}`` beside ``results.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenslice import promtext

PICKER_PREFIXES = ("tokenslice_picker_", "tokenslice_gateway_")
"""The picker's metric prefix (the older name second, so runs from before the rename still read)."""


@dataclass
class Observation:
    """Totals scraped from one system's data plane: engines as the delta over the run, sidecars and the
    picker as totals (they start from zero with the data plane). Values are summed over label sets; the
    picker's also as ``name{class}``."""

    seconds: float = 0.0
    engine: dict[str, float] = field(default_factory=dict)
    sidecar: dict[str, float] = field(default_factory=dict)
    picker: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        # "engine_delta" and "gateway": the keys scripts/gpu/plot_runs.py reads from older runs too
        return {"seconds": self.seconds, "engine_delta": self.engine, "sidecar": self.sidecar,
                "gateway": self.picker}


def _mean(d: dict[str, float], name: str, scale: float = 1.0) -> float | None:
    n = d.get(f"{name}_count", 0.0)
    return d.get(f"{name}_sum", 0.0) / n * scale if n else None


def _picker(d: dict[str, float], suffix: str) -> str:
    """The picker's metric called ``suffix``, under whichever prefix this run's picker used."""
    for prefix in PICKER_PREFIXES:
        if any(k.startswith(prefix + suffix) for k in d):
            return prefix + suffix
    return PICKER_PREFIXES[0] + suffix


def _of_class(d: dict[str, float], klass: str) -> dict[str, float]:
    tag = "{" + klass + "}"
    return {k[: -len(tag)]: v for k, v in d.items() if k.endswith(tag)}


def breakdown(label: str, obs: Observation) -> dict[str, float | str | None]:
    """One row: what a chunk of this system cost, where (``None`` where a part did not run)."""
    e, s, g = obs.engine, obs.sidecar, obs.picker
    tokens_per_chunk = _mean(s, "tokenslice_sidecar_chunk_tokens")
    chunk_s = _mean(s, "tokenslice_sidecar_chunk_seconds")
    prompt = e.get(promtext.PROMPT_TOKENS, 0.0)
    hits = e.get(promtext.PREFIX_HITS, 0.0)
    steps = e.get(f"{promtext.ITERATION_TOKENS}_count", 0.0)
    wait = _picker(g, "queue_wait_seconds")
    return {
        "system": label,
        "seconds": round(obs.seconds, 1),
        "chunks": s.get("tokenslice_sidecar_chunks_total"),
        "tokens_per_chunk": tokens_per_chunk,
        "chunk_wall_ms": chunk_s * 1e3 if chunk_s is not None else None,
        "chunk_ms_per_token": chunk_s / tokens_per_chunk * 1e3 if chunk_s and tokens_per_chunk else None,
        "pause_ms": _mean(s, "tokenslice_sidecar_pause_seconds", 1e3),
        "pauses": s.get("tokenslice_sidecar_pause_seconds_count"),
        "gw_queue_wait_ms": _mean(g, wait, 1e3),
        "gw_queue_wait_interactive_ms": _mean(_of_class(g, "interactive"), wait, 1e3),
        "gw_queue_wait_batch_ms": _mean(_of_class(g, "batch"), wait, 1e3),
        "gw_decision_us": _mean(g, _picker(g, "decision_seconds"), 1e6),
        "gw_grant_to_end_ms": _mean(g, _picker(g, "chunk_seconds"), 1e3),
        "gw_preemptions": g.get(_picker(g, "preemptions_total")),
        "vllm_requests": e.get(promtext.REQUEST_SUCCESS),
        "vllm_prompt_tokens": prompt,
        "vllm_prompt_tokens_cached": hits,
        "vllm_prompt_tokens_computed": prompt - hits if prompt else None,
        "vllm_generation_tokens": e.get(promtext.GENERATION_TOKENS),
        "vllm_queue_ms": _mean(e, promtext.QUEUE_TIME, 1e3),
        "vllm_prefill_ms": _mean(e, promtext.PREFILL_TIME, 1e3),
        "vllm_itl_ms": _mean(e, promtext.INTER_TOKEN_LATENCY, 1e3) or _mean(e, promtext.TIME_PER_OUTPUT_TOKEN, 1e3),
        "vllm_steps": steps,
        "vllm_tokens_per_step": e.get(f"{promtext.ITERATION_TOKENS}_sum", 0.0) / steps if steps else None,
        "vllm_preemptions": e.get(promtext.NUM_PREEMPTIONS),
    }


COLUMNS = [
    ("system", "system", ""), ("chunks", "chunks", ".0f"), ("tokens_per_chunk", "tok/chunk", ".1f"),
    ("chunk_wall_ms", "chunk wall ms", ".0f"), ("chunk_ms_per_token", "ms/token in chunk", ".2f"),
    ("pause_ms", "pause ms (chunk k->k+1)", ".0f"), ("gw_queue_wait_batch_ms", "picker wait batch ms", ".0f"),
    ("gw_queue_wait_interactive_ms", "picker wait interactive ms", ".1f"),
    ("gw_decision_us", "picker decision us", ".0f"),
    ("vllm_requests", "vLLM requests", ".0f"), ("vllm_prompt_tokens_computed", "prefill tokens computed", ".0f"),
    ("vllm_prompt_tokens_cached", "prefill tokens cached", ".0f"), ("vllm_queue_ms", "vLLM queue ms", ".1f"),
    ("vllm_prefill_ms", "vLLM prefill ms", ".1f"), ("vllm_itl_ms", "vLLM ITL ms", ".2f"),
    ("vllm_tokens_per_step", "tokens/step", ".1f"),
]


def markdown(rows: list[dict[str, float | str | None]]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" if c[2] == "" else "---:" for c in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else (str(v) if not fmt else format(float(v), fmt)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
