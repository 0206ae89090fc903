"""PNG plots of a run (matplotlib, Agg): latency CDFs per system, p99 TTFT and throughput vs chunk size,
the batch tenants' service shares, and -- where the KV cache overflowed -- what pausing cost in context."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tokenslice.bench.report import SystemSummary, fairness_class, focus_stream, kv_results, ttft_p99  # noqa: E402
from tokenslice.bench.runner import SystemResult  # noqa: E402
from tokenslice.bench.scenario import SYSTEMS, Scenario  # noqa: E402
from tokenslice.bench.stats import ttft_censored  # noqa: E402

SWEPT = {"tokenslice": "tokenslice (long slices, quantum = chunk size)",
         "tokenslice-per-slice": "tokenslice per slice (slice = chunk size)"}
"""The systems drawn as lines over the chunk size sweep, and their legend."""


def _style(res: SystemResult, i: int, n: int) -> tuple[str, str]:
    """Baselines in their system's colour; tokenslice runs spread over a colormap, reserved-slot runs dash-dotted."""
    if res.plan.unloaded:
        return "black", ":"
    system = res.plan.system
    if system.color is not None:
        return system.color, system.linestyle
    return plt.get_cmap("viridis")(0.05 + 0.85 * i / max(1, n - 1)), "-." if res.plan.reserved else system.linestyle


def _baseline_style(kind: str) -> tuple[str, str]:
    system = SYSTEMS.get(kind)
    return (system.color, system.linestyle) if system and system.color else ("gray", "--")


def _cdf(ax: plt.Axes, values: list[float], **kw: object) -> None:
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", **kw)


def latency_cdfs(results: list[SystemResult], scenario: Scenario, path: Path) -> None:
    hi = focus_stream(scenario)
    batch = [s.name for s in scenario.streams if s.name != hi]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ts_index = 0
    n_ts = sum(1 for r in results if r.plan.kind == "tokenslice" and not r.plan.unloaded)
    for res in results:
        color, ls = _style(res, ts_index, n_ts)
        if res.plan.kind == "tokenslice" and not res.plan.unloaded:
            ts_index += 1
        rows = [r for r in res.results if r.stream == hi]
        ttft = [t for r in rows if (t := ttft_censored(r, res.cutoff)) is not None]
        _cdf(axes[0], ttft, color=color, linestyle=ls, label=res.plan.label, linewidth=1.8)
        _cdf(axes[1], [r.e2e for r in rows if r.e2e is not None], color=color, linestyle=ls,
             label=res.plan.label, linewidth=1.8)
        pauses = [p for r in res.results if r.stream in batch and (p := r.longest_pause) is not None]
        if not res.plan.unloaded:
            _cdf(axes[2], pauses, color=color, linestyle=ls, label=res.plan.label, linewidth=1.8)
    axes[0].set_title(f"time to first token: '{hi}' (censored = still waiting at cutoff)")
    axes[1].set_title(f"end-to-end latency: '{hi}'")
    axes[2].set_title(f"longest pause inside a stream: {', '.join(batch) or '-'}")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log scale)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(0, 1.02)
    axes[2].set_xlim(left=1e-3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{scenario.name}: latency CDFs per system (same arrival trace)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versus_chunk_size(summaries: list[SystemSummary], scenario: Scenario, path: Path) -> None:
    hi = focus_stream(scenario)
    sweep = sorted((s for s in summaries if s.kind in SWEPT and not s.unloaded and s.chunk_size),
                   key=lambda s: s.chunk_size or 0)
    if not sweep:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    xs = sorted({s.chunk_size for s in sweep if s.chunk_size})

    def p99(s: SystemSummary) -> float:
        g = s.groups.get(hi)
        return g.ttft.p99 if g else math.nan

    lines = sorted({(s.kind, s.reserved) for s in sweep})
    for (kind, r), color in zip(lines, ("tab:blue", "tab:purple", "tab:green", "tab:pink", "tab:cyan", "tab:olive")):
        line = [s for s in sweep if (s.kind, s.reserved) == (kind, r)]
        label = SWEPT[kind] + (f", {r} slot(s) reserved for non-preemptible" if r else "")
        style = "o-" if kind == "tokenslice" else "s-."
        ax1.plot([s.chunk_size for s in line], [p99(s) for s in line], style, color=color, linewidth=2, label=label)
        ax2.plot([s.chunk_size for s in line], [s.throughput_tps for s in line], style, color=color, linewidth=2,
                 label=label)
    for s in summaries:
        if s.kind in SWEPT and not s.unloaded:
            continue
        color, ls = ("black", ":") if s.unloaded else _baseline_style(s.kind)
        ax1.axhline(p99(s), color=color, linestyle=ls, label=s.label)
        if not s.unloaded:
            ax2.axhline(s.throughput_tps, color=color, linestyle=ls, label=s.label)
    ax1.set_yscale("log")
    ax1.set_title(f"p99 time to first token of '{hi}' under load")
    ax1.set_ylabel("seconds (log scale)")
    ax2.set_title("output throughput (all streams)")
    ax2.set_ylabel("tokens / second")
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("chunk size (long slices: the fairness quantum; per slice: tokens per slice)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{scenario.name}: tokenslice chunk size sweep vs the baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fairness_shares(summaries: list[SystemSummary], scenario: Scenario, path: Path) -> None:
    rows = [s for s in summaries if s.fairness and sum(s.fairness.service.values()) > 0]
    if not rows:
        return
    tenants = sorted(rows[0].fairness.service)  # type: ignore[union-attr]
    weights = rows[0].fairness.weights  # type: ignore[union-attr]
    pol = scenario.policy.fairness
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 1.3 * len(rows) + 5), 4.8), sharey=True)
    colors = plt.get_cmap("Set2")
    wsum = sum(weights[t] for t in tenants)
    for ax, attr, title in ((axes[0], "service", f"policy cost ({pol.input:g} x prompt + {pol.output:g} x output)"),
                            (axes[1], "output_tokens", "output tokens only")):
        bottom = [0.0] * len(rows)
        for j, t in enumerate(tenants):
            values = [getattr(s.fairness, attr) for s in rows]
            shares = [v.get(t, 0) / (sum(v.values()) or 1) for v in values]
            ax.bar([s.label for s in rows], shares, bottom=bottom, color=colors(j),
                   label=f"{t} (weight {weights[t]:g})")
            bottom = [b + x for b, x in zip(bottom, shares)]
        acc = 0.0
        for t in tenants[:-1]:
            acc += weights[t] / wsum
            ax.axhline(acc, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"share of {title}")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    axes[0].set_ylabel("share (dashed: weighted target)")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"'{fairness_class(scenario)}' tenants in the measurement window "
                 f"[{scenario.warmup_s:g}s, {scenario.window_s:g}s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True, slots=True)
class KVBar:
    """One system's KV cost under overflow: what its continuations recomputed or loaded, and its focus p99."""

    label: str
    recomputed: float
    offloaded: float
    focus_p99: float | None


OVERFLOW_SHARE = 0.1
"""A run is drawn in ``kv_overflow.png`` once some system recomputed more than this share of its prefill
(or loaded anything from CPU offload): below it the prefix cache held the paused contexts."""


def kv_bars(results: list[SystemResult], summaries: list[SystemSummary], scenario: Scenario) -> list[KVBar]:
    """The loaded systems of a live run; [] when no system's KV cache overflowed."""
    hi = focus_stream(scenario)
    bars, pressed = [], False
    for s, kv in zip(summaries, kv_results(results)):
        if s.unloaded:
            continue
        bars.append(KVBar(s.label, kv.recomputed_tokens, kv.offloaded_tokens, ttft_p99(s, hi)))
        pressed |= kv.offloaded_tokens > 0 or kv.recomputed_tokens > OVERFLOW_SHARE * kv.prefill_tokens
    return bars if pressed else []


def kv_bars_from_json(doc: dict[str, Any]) -> list[KVBar]:
    """The same from a stored ``results.json`` (its ``kv`` block and the focus stream's TTFT p99)."""
    hi = focus_stream(Scenario.model_validate(doc["scenario"]))
    bars = []
    for system in doc["systems"]:
        summary, kv = system["summary"], system["kv"]
        if summary.get("unloaded"):
            continue
        p99 = summary["groups"].get(hi, {}).get("ttft", {}).get("p99")
        bars.append(KVBar(summary["label"], float(kv["recomputed_tokens"]), float(kv["offloaded_tokens"]), p99))
    return bars


def kv_overflow(runs: list[tuple[str, list[KVBar]]], path: Path) -> None:
    """Per run: continuation tokens recomputed vs loaded back from CPU offload, and the focus stream's p99."""
    runs = [(title, bars) for title, bars in runs if bars]
    if not runs:
        return
    width = max(10.0, 1.1 * max(len(b) for _, b in runs) + 4)
    fig, axes = plt.subplots(len(runs), 2, figsize=(width, 4.2 * len(runs)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]})
    for (title, bars), (left, right) in zip(runs, axes):
        xs = range(len(bars))
        labels = [b.label for b in bars]
        left.bar([x - 0.2 for x in xs], [b.recomputed for b in bars], 0.4, color="tab:red",
                 label="continuation tokens recomputed")
        left.bar([x + 0.2 for x in xs], [b.offloaded for b in bars], 0.4, color="tab:blue",
                 label="tokens loaded from CPU offload")
        for x, b in zip(xs, bars):
            left.annotate(f"{b.recomputed / 1000:.0f}k", (x - 0.2, b.recomputed), ha="center", va="bottom", fontsize=7)
        left.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        left.set_ylabel("tokens")
        left.set_title(f"{title}: what paused contexts cost")
        left.set_ylim(0, 1.3 * max(max(b.recomputed, b.offloaded) for b in bars) or 1.0)
        left.legend(fontsize=8, loc="upper center", ncol=2)
        left.grid(True, axis="y", alpha=0.3)
        right.bar(list(xs), [b.focus_p99 or 0.0 for b in bars], 0.6, color="tab:gray")
        right.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        right.set_ylabel("interactive TTFT p99 (s)")
        right.set_title("interactive p99")
        right.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: list[SystemResult], summaries: list[SystemSummary], scenario: Scenario,
              out_dir: Path) -> list[Path]:
    paths = [out_dir / "latency_cdf.png", out_dir / "chunk_size.png", out_dir / "fairness.png",
             out_dir / "kv_overflow.png"]
    latency_cdfs(results, scenario, paths[0])
    versus_chunk_size(summaries, scenario, paths[1])
    fairness_shares(summaries, scenario, paths[2])
    kv_overflow([(scenario.name, kv_bars(results, summaries, scenario))], paths[3])
    return [p for p in paths if p.exists()]
