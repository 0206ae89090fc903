"""From per-request results to the numbers people read: JSON, a Markdown table, the target check."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenslice.bench import kvcache
from tokenslice.bench.runner import ROUND_MARK, SystemResult, base_label
from tokenslice.bench.scenario import Scenario, Stream
from tokenslice.bench.stats import (
    STALL_S,
    Fairness,
    GroupSummary,
    RequestResult,
    fairness,
    percentile,
    share_error,
    summarize_group,
    throughput,
    ttft_censored,
)


@dataclass
class SystemSummary:
    label: str
    kind: str
    chunk_size: int | None
    unloaded: bool
    groups: dict[str, GroupSummary]
    reserved: int
    throughput_tps: float
    fairness: Fairness | None
    prefix_hit_rate: float | None
    """vLLM prefix-cache hits / queries over the run (all chunks, first chunks included)."""
    affinity_hit_rate: float | None
    """vLLM prefix-cache hits / reusable continuation-prefix tokens (the KV-affinity figure), lower end: the
    next chunk of every request cut off at a chunk boundary counted as reusable although it may still have
    been queued in the gateway (never reaching vLLM)."""
    affinity_hit_rate_high: float | None
    """Upper end: only chunks known to have run (capped at 100%); the target is judged on this one."""
    preemptions: float | None
    migrations: float | None
    queue_wait_ms: dict[str, float]
    """Mean time a chunk waited in the gateway for a slot, per class (ms)."""
    errors: int
    first_error: str | None


def focus_stream(scenario: Scenario) -> str:
    """The latency-critical stream the headline numbers are about."""
    if scenario.unloaded_stream:
        return scenario.unloaded_stream
    drained = [s.name for s in scenario.streams if s.drain]
    if drained:
        return drained[0]
    def priority(s: Stream) -> int:
        klass = scenario.policy.klass(s.priority_class)
        return klass.priority if klass else 0
    return max(scenario.streams, key=priority).name


def fairness_class(scenario: Scenario) -> str:
    """The lowest class among the streams: the backlogged batch tenants share it."""
    return min((s.priority_class for s in scenario.streams),
               key=lambda c: scenario.policy.klass(c).priority)  # type: ignore[union-attr]


def _counter(counters: dict[str, float], fragment: str) -> float | None:
    values = [v for k, v in counters.items() if fragment in k]
    return sum(values) if values else None


def summarize(result: SystemResult, scenario: Scenario) -> SystemSummary:
    plan = result.plan
    groups: dict[str, GroupSummary] = {}
    for stream in scenario.streams:
        rows = [r for r in result.results if r.stream == stream.name]
        if rows:
            groups[stream.name] = summarize_group(stream.name, rows, result.cutoff, scenario.window_s,
                                                  stream.slo_ttft_s, stream.slo_tpot_s)
    window = (scenario.warmup_s, scenario.window_s)
    fclass = fairness_class(scenario)
    weights = {t.name: t.weight for t in scenario.policy.tenants}
    tenants = {s.tenant for s in scenario.streams if s.priority_class == fclass}
    fair = None
    if not plan.unloaded and len(tenants) >= 2:
        fair = fairness(result.results, fclass, weights, *window, input_cost=scenario.policy.fairness.input,
                        output_cost=scenario.policy.fairness.output)
    queries = result.engine_counters.get("prefix_cache_queries", 0.0)
    hits = result.engine_counters.get("prefix_cache_hits", 0.0)
    errors = [r for r in result.results if r.status == "error"]
    return SystemSummary(
        label=plan.label, kind=plan.kind, chunk_size=plan.chunk_size, unloaded=plan.unloaded, groups=groups,
        reserved=plan.reserved,
        throughput_tps=throughput(result.results, *window), fairness=fair,
        prefix_hit_rate=hits / queries if queries else None,
        affinity_hit_rate=min(1.0, hits / max(result.reusable_tokens_max, result.reusable_tokens))
        if result.reusable_tokens else None,
        affinity_hit_rate_high=min(1.0, hits / result.reusable_tokens) if result.reusable_tokens else None,
        preemptions=_counter(result.gateway_counters, "preempt"),
        migrations=_counter(result.gateway_counters, "migrat"),
        queue_wait_ms={k.split(":", 1)[1]: 1000 * v / result.gateway_counters[k.replace("sum_", "count_", 1)]
                       for k, v in result.gateway_counters.items()
                       if k.startswith("sum_queue_wait:") and result.gateway_counters.get(
                           k.replace("sum_", "count_", 1))},
        errors=len(errors), first_error=errors[0].error if errors else None)


# --- the target check (the "Done means") ----------------------------------------------------

@dataclass
class Check:
    claim: str
    measured: str
    met: bool | None


def ttft_p99(s: SystemSummary | None, stream: str) -> float | None:
    """A system's p99 TTFT of ``stream``; None when it has no such stream or no first token."""
    if s is None or stream not in s.groups:
        return None
    v = s.groups[stream].ttft.p99
    return None if math.isnan(v) else v


def checks(summaries: list[SystemSummary], scenario: Scenario) -> list[Check]:
    """The targets on one run's systems (with ``rounds`` > 1: on round 1; :func:`pooled_markdown` pools them)."""
    hi = focus_stream(scenario)
    summaries = [s for s in summaries if ROUND_MARK not in s.label]
    by = {s.label: s for s in summaries}
    loaded = [s for s in summaries if s.kind == "tokenslice" and not s.unloaded]
    unloaded = next((s for s in summaries if s.unloaded), None)
    fcfs, prio = by.get("vllm-fcfs"), by.get("vllm-priority")
    out: list[Check] = []
    if not loaded:
        return out
    best = min(loaded, key=lambda s: ttft_p99(s, hi) if ttft_p99(s, hi) is not None else math.inf)
    bp = ttft_p99(best, hi)
    name = f"{best.label}"
    if bp is None:
        return out
    up = ttft_p99(unloaded, hi)
    if up:
        out.append(Check(f"{hi} p99 TTFT <= 2x unloaded ({name})", f"{bp:.3f}s vs 2x{up:.3f}s = "
                         f"{bp / up:.1f}x", bp <= 2 * up))
    fp = ttft_p99(fcfs, hi)
    if fp:
        out.append(Check(f"{hi} p99 TTFT >= 10x better than vLLM FCFS ({name})",
                         f"{fp:.3f}s / {bp:.3f}s = {fp / bp:.1f}x", fp / bp >= 10))
    pp = ttft_p99(prio, hi)
    if pp:
        out.append(Check(f"{hi} p99 TTFT >= 5x better than vLLM priority ({name})",
                         f"{pp:.3f}s / {bp:.3f}s = {pp / bp:.1f}x", pp / bp >= 5))
    if fcfs and fcfs.throughput_tps > 0:
        for s in loaded:
            ratio = s.throughput_tps / fcfs.throughput_tps
            out.append(Check(f"throughput >= 95% of vLLM FCFS ({s.label})",
                             f"{s.throughput_tps:.0f} vs {fcfs.throughput_tps:.0f} tok/s = {ratio:.0%}",
                             ratio >= 0.95))
    for s in loaded:
        if s.fairness and s.fairness.service:
            f, b = s.fairness, s.fairness.backlogged
            if b is None:
                continue
            shares = ", ".join(f"{t} {v:.0f} (w {f.weights[t]:g})" for t, v in sorted(b.service.items()))
            old = f"whole window (old, counts a tenant that asked for less): {_pct(f.max_share_error)}"
            out.append(Check(f"batch tenants within 5% of their weights while both backlogged, policy cost ({s.label})",
                             f"{shares} in {b.seconds:.1f}s both backlogged; max error {_pct(b.max_share_error)}; "
                             f"Jain {_f(b.jain)}; {old}",
                             None if math.isnan(b.max_share_error) else b.max_share_error <= 0.05))
            toks = " : ".join(f"{b.output_tokens[t]:.0f}" for t in sorted(b.output_tokens))
            out.append(Check(f"batch tenants within 5% of their weights while both backlogged, output tokens only "
                             f"({s.label})", f"{toks}; max error {_pct(b.token_share_error)}; whole window (old): "
                             f"{_pct(f.token_share_error)}",
                             None if math.isnan(b.token_share_error) else b.token_share_error <= 0.05))
    for s in summaries:
        if s.affinity_hit_rate is not None and s.kind in ("tokenslice", "tokenslice-per-slice", "no-affinity"):
            # judged only where it can fail: with one engine and no cut, every continuation finds its own
            # KV on the only engine, so the figure says nothing about routing
            can_fail = scenario.engines >= 2 or bool(s.preemptions)
            out.append(Check(f"continuation chunks hit the prefix cache >= 95% ({s.label})",
                             f"{_hit_range(s)} of reusable prefix tokens"
                             + ("" if can_fail else " (not judged: 1 engine and no preemption, it cannot fail)"),
                             s.affinity_hit_rate_high >= 0.95  # type: ignore[operator]
                             if s.kind in ("tokenslice", "tokenslice-per-slice") and can_fail else None))
    return out


# --- rendering -----------------------------------------------------------------------------------------

def _f(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}{unit}"


def _hit_range(s: SystemSummary) -> str:
    lo, hi = s.affinity_hit_rate, s.affinity_hit_rate_high
    if lo is None or hi is None or f"{lo:.1%}" == f"{hi:.1%}":
        return _pct(lo)
    return f"{lo:.1%}-{hi:.1%}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1%}"


def markdown(summaries: list[SystemSummary], scenario: Scenario, command: str | None = None) -> str:
    hi = focus_stream(scenario)
    fclass = fairness_class(scenario)
    fcfs = next((s for s in summaries if s.label == "vllm-fcfs"), None)
    lines = [f"### {scenario.name}: {scenario.description}".rstrip(": "), ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += [f"Headline: `{hi}` is the latency-critical stream; fairness is over the `{fclass}` tenants "
              f"(service in [{scenario.warmup_s:g}s, {scenario.window_s:g}s)).", "",
              f"| system | {hi} TTFT p50 | p90 | p99 | {hi} longest pause p99 | throughput tok/s | vs FCFS "
              f"| {fclass} output tokens | share error both backlogged (cost / tokens; seconds) "
              "| share error whole window (old) | Jain | preemptions | migrations | KV hit (reusable) | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        g = s.groups.get(hi)
        ttft = g.ttft if g else None
        cens = f" ({g.censored} censored)" if g and g.censored else ""
        rel = _pct(s.throughput_tps / fcfs.throughput_tps) if fcfs and fcfs.throughput_tps else "-"
        share = ("-" if not s.fairness else
                 " : ".join(f"{s.fairness.output_tokens[t]:.0f}" for t in sorted(s.fairness.output_tokens)))
        back = s.fairness.backlogged if s.fairness else None
        err = ("-" if not back else
               f"{_pct(back.max_share_error)} / {_pct(back.token_share_error)}; {back.seconds:.0f}s")
        old = ("-" if not s.fairness else
               f"{_pct(s.fairness.max_share_error)} / {_pct(s.fairness.token_share_error)}")
        lines.append(
            f"| {s.label} | {_f(ttft.p50 if ttft else None, 's')} | {_f(ttft.p90 if ttft else None, 's')} "
            f"| {_f(ttft.p99 if ttft else None, 's')}{cens} | {_f(g.longest_pause.p99 if g else None, 's')} "
            f"| {_f(s.throughput_tps, '', 0) if not s.unloaded else '(unloaded)'} | {rel if not s.unloaded else '-'} "
            f"| {share} | {err} | {old} | {_f(s.fairness.jain if s.fairness else None)} "
            f"| {_f(s.preemptions, '', 0)} | {_f(s.migrations, '', 0)} | {_hit_range(s)} "
            f"| {s.errors} |")
    if any(s.fairness for s in summaries):
        first = next(s.fairness for s in summaries if s.fairness)
        tenants = sorted(first.service)
        pol = scenario.policy.fairness
        lines += ["", f"`{fclass}` output tokens are those of {' : '.join(tenants)} (weights "
                  f"{' : '.join(f'{first.weights[t]:g}' for t in tenants)}); share error is measured in the policy's "
                  f"cost ({pol.input:g} x prompt + {pol.output:g} x output tokens, the currency the gateway shares) "
                  f"and in output tokens alone, counted only while every `{fclass}` tenant was backlogged (had a "
                  f"request waiting for its first token, or paused for over {STALL_S:g}s mid-answer; the seconds "
                  "that was true are given) -- weighted fair share promises the weights' ratio only then; a tenant "
                  "that asks for less than its share is served what it asks. The whole-window error (old) compares "
                  "all service with the weights regardless; Jain is over cost / weight, whole window."]
    lines += ["", "Per stream (TTFT / TPOT / end-to-end / longest pause in seconds; SLO = the stream's objectives):",
              "", "| system | stream | req | done | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | E2E p50 | E2E p99 "
              "| pause p99 | tokens | SLO met | goodput req/s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        for g in s.groups.values():
            lines.append(
                f"| {s.label} | {g.name} | {g.requests} | {g.completed} | {_f(g.ttft.p50)} | {_f(g.ttft.p99)} "
                f"| {_f(g.tpot.p50, '', 4)} | {_f(g.tpot.p99, '', 4)} | {_f(g.e2e.p50, '', 2)} "
                f"| {_f(g.e2e.p99, '', 2)} | {_f(g.longest_pause.p99)} | {g.output_tokens} "
                f"| {_pct(g.slo_attainment)} | {_f(g.goodput_rps, '', 2)} |")
    cs = checks(summaries, scenario)
    if cs:
        lines += ["", "Targets:", "", "| claim | measured | met |", "|---|---|---|"]
        for c in cs:
            lines.append(f"| {c.claim} | {c.measured} | {'yes' if c.met else 'no' if c.met is False else 'n/a'} |")
    waits = [s for s in summaries if s.queue_wait_ms]
    if waits:
        lines += ["", "Mean wait of a chunk in the gateway for a slot (the pause the scheduler imposed), per class:",
                  ""]
        for s in waits:
            lines.append(f"* {s.label}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(s.queue_wait_ms.items())))
    errs = [s for s in summaries if s.first_error]
    for s in errs:
        lines.append(f"\n{s.label}: {s.errors} error(s), first: `{s.first_error}`")
    return "\n".join(lines) + "\n"


def pooled_markdown(results: list[SystemResult], summaries: list[SystemSummary], scenario: Scenario) -> str:
    """With ``rounds`` > 1: every system pooled over its rounds, and the targets judged on the pooled numbers.

    Pooled: the focus stream's TTFT p99 over all rounds' requests (censored ones as lower bounds), throughput as
    the mean over rounds (and each round's ratio to FCFS of the same round), batch shares summed over the
    seconds in which every batch tenant was backlogged, in every round.
    """
    if scenario.rounds < 2:
        return ""
    hi = focus_stream(scenario)
    by: dict[str, list[tuple[SystemResult, SystemSummary]]] = {}
    for r, s in zip(results, summaries):
        by.setdefault(base_label(s.label), []).append((r, s))

    def p99(label: str) -> float | None:
        vals = [v for r, _ in by.get(label, []) for x in r.results
                if x.stream == hi and (v := ttft_censored(x, r.cutoff)) is not None]
        return percentile(vals, 99) if vals else None

    def tps(label: str) -> list[float]:
        return [s.throughput_tps for _, s in by.get(label, [])]

    def shares(label: str) -> tuple[float, float, float] | None:
        service: dict[str, float] = {}
        tokens: dict[str, float] = {}
        seconds, weights = 0.0, {}
        for _, s in by.get(label, []):
            b = s.fairness.backlogged if s.fairness else None
            if b is None:
                continue
            seconds += b.seconds
            weights = s.fairness.weights  # type: ignore[union-attr]
            for t, v in b.service.items():
                service[t] = service.get(t, 0.0) + v
            for t, v in b.output_tokens.items():
                tokens[t] = tokens.get(t, 0.0) + v
        if not service or sum(service.values()) <= 0:
            return None
        return share_error(service, weights), share_error(tokens, weights), seconds

    lines = ["", f"Pooled over {scenario.rounds} rounds (ABBA order on each engine, the same trace each round; "
             f"`{hi}` TTFT p99 over every round's requests, throughput the mean of the rounds, batch shares summed "
             "over the seconds every batch tenant was backlogged):", "",
             f"| system | rounds | {hi} TTFT p99 pooled | per round | throughput tok/s (mean) | per round "
             "| share error both backlogged (cost / tokens; s) |", "|---|---:|---:|---|---:|---|---:|"]
    for label, pairs in by.items():
        per = ", ".join(_f(s.groups[hi].ttft.p99) if hi in s.groups else "-" for _, s in pairs)
        t = tps(label)
        sh = shares(label)
        unloaded = pairs[0][1].unloaded
        lines.append(f"| {label} | {len(pairs)} | {_f(p99(label), 's')} | {per} "
                     f"| {'(unloaded)' if unloaded else _f(sum(t) / len(t), '', 0)} "
                     f"| {'-' if unloaded else ', '.join(_f(x, '', 0) for x in t)} "
                     f"| {'-' if sh is None else f'{_pct(sh[0])} / {_pct(sh[1])}; {sh[2]:.0f}s'} |")
    loaded = [label for label, pairs in by.items() if pairs[0][1].kind == "tokenslice" and not pairs[0][1].unloaded]
    unloaded = next((label for label, pairs in by.items() if pairs[0][1].unloaded), None)
    out: list[Check] = []
    fcfs = tps("vllm-fcfs")
    for label in loaded:
        bp = p99(label)
        if bp is None:
            continue
        up = p99(unloaded) if unloaded else None
        if up:
            out.append(Check(f"{hi} p99 TTFT <= 2x unloaded, pooled ({label})",
                             f"{bp:.3f}s vs 2x{up:.3f}s = {bp / up:.1f}x", bp <= 2 * up))
        for base, times, name in (("vllm-fcfs", 10, "FCFS"), ("vllm-priority", 5, "priority")):
            other = p99(base)
            if other:
                out.append(Check(f"{hi} p99 TTFT >= {times}x better than vLLM {name}, pooled ({label})",
                                 f"{other:.3f}s / {bp:.3f}s = {other / bp:.1f}x", other / bp >= times))
        mine = tps(label)
        if fcfs and mine and sum(fcfs) > 0:
            ratio = (sum(mine) / len(mine)) / (sum(fcfs) / len(fcfs))
            rounds = ", ".join(f"{a / b:.0%}" for a, b in zip(mine, fcfs) if b > 0)
            out.append(Check(f"throughput >= 95% of vLLM FCFS, pooled ({label})",
                             f"{ratio:.1%} (per round: {rounds})", ratio >= 0.95))
        sh = shares(label)
        if sh is not None:
            out.append(Check(f"batch tenants within 5% of their weights while backlogged, pooled ({label})",
                             f"{_pct(sh[0])} (cost) / {_pct(sh[1])} (output tokens) over {sh[2]:.0f}s",
                             sh[0] <= 0.05 and sh[1] <= 0.05))
    if out:
        lines += ["", "Targets, pooled over the rounds:", "", "| claim | measured | met |", "|---|---|---|"]
        lines += [f"| {c.claim} | {c.measured} | {'yes' if c.met else 'no'} |" for c in out]
    return "\n".join(lines) + "\n"


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{1000 * x:.0f}"


def preemption_markdown(results: list[SystemResult], summaries: list[SystemSummary], scenario: Scenario) -> str:
    """The per-preemption breakdown of every system that has a picker: counts, latency, cost."""
    fcfs = next((s for s in summaries if s.label == "vllm-fcfs"), None)
    rows = [(r, s) for r, s in zip(results, summaries) if r.preemption and not s.unloaded]
    if not rows:
        return ""
    lines = ["", "Preemption (revocable slices; the picker's metrics -- histogram quantiles are as coarse as its "
             "buckets -- plus the focus stream's client-side TTFT):", "",
             "| system | preemptions | per s | cuts not acted on | cut -> slot free p50 / p99 ms "
             "| waiter queued -> slot p50 / p99 ms | waiter first token p50 / p99 ms "
             "| tokens recomputed per preemption | throughput lost per preemption (tokens, vs FCFS) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r, s in rows:
        p = r.preemption
        n = p.get("preemptions") or 0
        group = s.groups.get(focus_stream(scenario))
        ttft = group.ttft if group else None
        lost = None
        if fcfs and n:
            seconds = r.observation.seconds or 0.0
            lost = (fcfs.throughput_tps - s.throughput_tps) * seconds / n
        lines.append(f"| {s.label} | {n:.0f} | {_f(p.get('preemptions_per_s'), digits=2)} | "
                     f"{_f(p.get('cut_failures'), digits=0)} | "
                     f"{_ms(p.get('cut_to_free_p50_s'))} / {_ms(p.get('cut_to_free_p99_s'))} | "
                     f"{_ms(p.get('waiter_queue_p50_s'))} / {_ms(p.get('waiter_queue_p99_s'))} | "
                     f"{_ms(ttft.p50 if ttft else None)} / {_ms(ttft.p99 if ttft else None)} | "
                     f"{_f(p.get('recomputed_tokens_per_preemption'), digits=1)} | {_f(lost, digits=0)} |")
    return "\n".join(lines) + "\n"


def kv_results(results: list[SystemResult]) -> list[kvcache.KVCost]:
    return [kvcache.kv_cost(r.engine_counters, [q.prompt_tokens for q in r.results],
                            [q.completion_tokens > 0 for q in r.results], r.block_size) for r in results]


def kv_markdown(results: list[SystemResult], summaries: list[SystemSummary], scenario: Scenario) -> str:
    """The KV table (tokenslice.bench.kvcache) of every loaded system: what pausing cost in recomputed context."""
    hi = focus_stream(scenario)
    rows = [(s.label, k, s.throughput_tps, ttft_p99(s, hi), kvcache.estimate(r.gateway_counters))
            for s, k, r in zip(summaries, kv_results(results), results) if not s.unloaded]
    return kvcache.markdown(rows, results[0].kv_tokens if results else None)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def write_json(path: Path, scenario: Scenario, results: list[SystemResult], summaries: list[SystemSummary],
               meta: dict[str, Any]) -> None:
    def request_row(r: Any) -> dict[str, Any]:
        return {"index": r.index, "stream": r.stream, "tenant": r.tenant, "class": r.priority_class,
                "scheduled": round(r.scheduled, 4), "sent": round(r.sent, 4) if r.sent == r.sent else None,
                "ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e, "longest_pause": r.longest_pause,
                "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "status": r.status,
                "error": r.error}

    doc = {
        "meta": meta,
        "scenario": scenario.model_dump(mode="json", by_alias=True),
        "systems": [{
            "summary": _jsonable(s),
            "cutoff": res.cutoff,
            "engine_counters": res.engine_counters,
            "gateway_counters": res.gateway_counters,
            "preemption": res.preemption,
            "kv": _jsonable(dataclasses.asdict(kv)),
            "reusable_tokens": res.reusable_tokens,
            "block_size": res.block_size,
            "requests": [_jsonable(request_row(r)) for r in res.results],
        } for s, res, kv in zip(summaries, results, kv_results(results))],
        "checks": _jsonable(checks(summaries, scenario)),
    }
    path.write_text(json.dumps(doc, indent=1))


# --- re-reading a stored run ----------------------------------------------------------------------------

def fairness_from_json(doc: dict[str, Any]) -> list[tuple[str, Fairness]]:
    """Fair share of every loaded system of a stored ``results.json``, old and backlogged, from its request rows.

    The rows keep no per-token times, so this is an approximation: each request's tokens are spread evenly
    between its first token and its end, and mid-answer pauses are unknown (a tenant counts as backlogged
    only while it has a request waiting for its first token) -- good for re-reading runs made before the
    backlogged measure existed, not a replacement for it.
    """
    sc = doc["scenario"]
    policy = sc["policy"]
    weights = {t["name"]: float(t.get("weight", 1.0)) for t in policy.get("tenants", [])}
    cost = policy.get("fairness") or {}
    classes = {c["name"]: c.get("priority", 0) for c in policy.get("priorityClasses", [])}
    fclass = min({s["priority_class"] for s in sc["streams"]}, key=lambda c: classes.get(c, 0))
    out: list[tuple[str, Fairness]] = []
    for system in doc["systems"]:
        if system["summary"].get("unloaded"):
            continue
        rows: list[RequestResult] = []
        for q in system["requests"]:
            if q["class"] != fclass or q["sent"] is None:
                continue
            r = RequestResult(q["index"], q["stream"], q["tenant"], q["class"], q["scheduled"], sent=q["sent"],
                              completion_tokens=q["completion_tokens"], prompt_tokens=q["prompt_tokens"],
                              status=q["status"])
            if q["ttft"] is not None:
                r.first_token = q["sent"] + q["ttft"]
                end = q["sent"] + q["e2e"] if q["e2e"] is not None else float(system["cutoff"])
                r.end = end if q["e2e"] is not None else None
                n = max(int(q["completion_tokens"]), 1)
                r.token_times = [r.first_token + (end - r.first_token) * k / max(n - 1, 1) for k in range(n)]
                r.token_counts = [1] * n
            rows.append(r)
        if len({r.tenant for r in rows}) >= 2:
            out.append((system["summary"]["label"], fairness(
                rows, fclass, weights, float(sc["warmup_s"]), float(sc["window_s"]),
                input_cost=float(cost.get("input", 0.0)), output_cost=float(cost.get("output", 1.0)),
                stall_s=math.inf)))
    return out
