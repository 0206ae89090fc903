"""The load generator's arithmetic: trace determinism, arrival rates, percentiles, Jain index, reports.

Pure functions, checked against hand-computed values -- no servers needed.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import pytest

from tokenslice.bench.report import (
    checks,
    fairness_from_json,
    markdown,
    pooled_markdown,
    preemption_markdown,
    summarize,
    write_json,
)
from tokenslice.bench.runner import (
    Plan,
    SystemResult,
    base_label,
    long_slices,
    plan_systems,
    reusable_tokens,
    rounds_of,
    salted,
    sweep_policy,
)
from tokenslice.bench.scenario import SYSTEMS, Arrivals, LengthDist, Scenario, resolve_scenario
from tokenslice.bench.stats import RequestResult, fairness, jain_index, percentile, summarize_group, throughput
from tokenslice.bench.trace import arrival_times, build_trace

GPU_HEADLINE = Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "headline-gpu.yaml"


def _scenario(**update: object) -> Scenario:
    base = resolve_scenario("demo").model_dump()
    base.update(update)
    return Scenario.model_validate(base)


# --- trace ---------------------------------------------------------------------------------------------

def test_trace_is_determined_by_the_seed() -> None:
    a, b = build_trace(_scenario(seed=7)), build_trace(_scenario(seed=7))
    assert a == b
    c = build_trace(_scenario(seed=8))
    assert [r.at for r in c] != [r.at for r in a]
    assert [r.prompt for r in c] != [r.prompt for r in a]


def test_trace_is_ordered_and_inside_the_window() -> None:
    sc = _scenario()
    trace = build_trace(sc)
    assert [r.at for r in trace] == sorted(r.at for r in trace)
    assert all(0 <= r.at < sc.window_s for r in trace)
    assert [r.index for r in trace] == list(range(len(trace)))
    hi = sc.stream("hi")
    assert all(r.at >= hi.arrivals.start_s for r in trace if r.stream == "hi")
    assert len({r.prompt for r in trace}) == len(trace), "every prompt unique (no accidental prefix sharing)"


def test_streams_draw_independently() -> None:
    """Adding or dropping a stream leaves the other streams' arrivals untouched."""
    sc = _scenario()
    full = [(r.at, r.prompt) for r in build_trace(sc) if r.stream == "hi"]
    alone = [(r.at, r.prompt) for r in build_trace(sc, ["hi"])]
    assert full == alone


def test_poisson_rate_and_exponential_gaps() -> None:
    rate, window = 5.0, 4000.0
    times = arrival_times(Arrivals(process="poisson", rate=rate), window, random.Random(1))
    n = len(times)
    # Poisson count: mean = var = rate*window = 20000, sd ~ 141; allow 4 sd.
    assert abs(n - rate * window) < 4 * math.sqrt(rate * window)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)  # CV of exp = 1


def test_bursty_arrivals_come_in_bursts_at_the_mean_rate() -> None:
    times = arrival_times(Arrivals(process="bursty", rate=4.0, burst_size=8), 2000.0, random.Random(3))
    assert len(times) % 8 == 0
    bursts = [times[i:i + 8] for i in range(0, len(times), 8)]
    assert all(len(set(b)) == 1 for b in bursts)
    assert len(times) / 2000.0 == pytest.approx(4.0, rel=0.1)


def test_arrivals_respect_start_and_stop() -> None:
    times = arrival_times(Arrivals(rate=10, start_s=3, stop_s=7), 100, random.Random(0))
    assert times and min(times) >= 3 and max(times) < 7


def test_length_distributions_stay_in_bounds() -> None:
    rng = random.Random(5)
    assert LengthDist(kind="fixed", mean=42).sample(rng) == 42
    u = [LengthDist(kind="uniform", min=10, max=20).sample(rng) for _ in range(2000)]
    assert min(u) == 10 and max(u) == 20
    ln = [LengthDist(kind="lognormal", mean=100, sigma=0.5, min=1, max=100_000).sample(rng) for _ in range(20000)]
    assert statistics.fmean(ln) == pytest.approx(100, rel=0.03)
    with pytest.raises(ValueError):
        LengthDist(min=5, max=4)


def test_scenario_rejects_unknown_class_and_duplicate_streams() -> None:
    base = resolve_scenario("demo").model_dump()
    bad = {**base, "streams": [{**base["streams"][0], "priority_class": "platinum"}]}
    with pytest.raises(ValueError, match="platinum"):
        Scenario.model_validate(bad)
    dup = {**base, "streams": [base["streams"][0], base["streams"][0]]}
    with pytest.raises(ValueError, match="unique"):
        Scenario.model_validate(dup)


def test_builtin_scenarios_load() -> None:
    for name in ("demo", "headline", "two-engine"):
        sc = resolve_scenario(name)
        assert build_trace(sc)
    assert resolve_scenario("two-engine").engines == 2


# --- percentiles, Jain, fairness -----------------------------------------------------------------------

def test_percentile_matches_hand_values() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == 2.5          # between ranks 1 and 2 (0-based), halfway
    assert percentile(xs, 90) == pytest.approx(3.7)   # pos 2.7 -> 3 + 0.7*(4-3)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(xs, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    assert percentile([1.0, 2.0, math.inf], 99) == math.inf


def test_jain_index_hand_values() -> None:
    assert jain_index([1, 1, 1, 1]) == 1.0
    assert jain_index([1, 0, 0, 0]) == 0.25                 # a tenant given nothing counts
    assert jain_index([2, 1]) == pytest.approx(9 / 10)      # (2+1)^2 / (2 * (4+1))
    assert jain_index([3, 1, 2]) == pytest.approx(36 / 42)  # 6^2 / (3 * 14)
    assert jain_index([]) == 1.0 and jain_index([0, 0]) == 1.0  # nobody to be unfair to: never NaN


def test_one_jain_index_for_the_picker_gauge_and_the_report() -> None:
    from tokenslice.bench import stats
    from tokenslice.fairness import jain_index as the_one
    from tokenslice_picker.flowcontrol import accounting

    assert accounting.jain_index is the_one and stats.jain_index is the_one


def _req(i: int, tenant: str, times: list[float], *, cls: str = "batch", sent: float = 0.0,
         tokens: int | None = None, stream: str | None = None) -> RequestResult:
    return RequestResult(index=i, stream=stream or tenant, tenant=tenant, priority_class=cls, scheduled=sent,
                         sent=sent, first_token=times[0] if times else None, end=times[-1] if times else None,
                         token_times=list(times), completion_tokens=len(times) if tokens is None else tokens)


def test_fairness_of_weighted_service() -> None:
    # in [10, 20): tenant a gets 20 tokens, b gets 10 -> weights 2:1 -> perfectly fair
    a = _req(0, "batch-a", [10 + 0.5 * k for k in range(20)] + [25.0])
    b = _req(1, "batch-b", [10 + 1.0 * k for k in range(10)] + [5.0])
    f = fairness([a, b], "batch", {"batch-a": 2, "batch-b": 1}, 10, 20)
    assert f.service == {"batch-a": 20, "batch-b": 10}
    assert f.jain == pytest.approx(1.0)
    assert f.max_share_error == pytest.approx(0.0)
    # equal service under 2:1 weights: normalised 10/2 vs 10/1 -> Jain (5+10)^2/(2*(25+100)) = 0.9
    b2 = _req(1, "batch-b", [10 + 0.5 * k for k in range(20)])
    f2 = fairness([a, b2], "batch", {"batch-a": 2, "batch-b": 1}, 10, 20)
    assert f2.jain == pytest.approx(0.9)
    assert f2.max_share_error == pytest.approx(0.5)   # b has 1/2 instead of 1/3: 50% over
    # in the policy's currency: b started a request with a 40-token prompt in the window -> cost 2*20 + 40
    a.prompt_tokens, b2.prompt_tokens = 10, 40
    b2.first_token = 10.0
    a.first_token = 1.0                               # a's prefill ran before the window: not charged in it
    f3 = fairness([a, b2], "batch", {"batch-a": 2, "batch-b": 1}, 10, 20, input_cost=1, output_cost=2)
    assert f3.service == {"batch-a": 40, "batch-b": 80}
    assert f3.output_tokens == {"batch-a": 20, "batch-b": 20}
    assert f3.jain == pytest.approx((20 + 80) ** 2 / (2 * (20 ** 2 + 80 ** 2)))


def test_request_latency_properties() -> None:
    r = _req(0, "t", [1.5, 1.6, 2.6, 2.7], sent=1.0)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.7)
    assert r.tpot == pytest.approx((2.7 - 1.5) / 3)
    assert r.longest_pause == pytest.approx(1.0)
    assert r.tokens_between(1.55, 2.65) == 2
    # usage says 8 tokens over 4 events: each event carries 2
    assert _req(0, "t", [1, 2, 3, 4], tokens=8).tokens_between(0, 2.5) == 4
    # exact per-event counts win (merged events under load)
    merged = _req(0, "t", [1, 2, 3, 4], tokens=8)
    merged.token_counts = [1, 5, 1, 1]
    assert merged.tokens_between(0, 2.5) == 6


def test_throughput_counts_only_the_window() -> None:
    rs = [_req(0, "a", [0.5, 1.5, 2.5, 3.5]), _req(1, "b", [1.0, 2.0, 9.0])]
    assert throughput(rs, 1.0, 3.0) == pytest.approx(4 / 2)


def test_group_summary_censors_requests_still_waiting() -> None:
    done = [_req(i, "web", [i + 0.2, i + 0.3], sent=float(i), cls="interactive") for i in range(3)]
    waiting = RequestResult(index=9, stream="web", tenant="web", priority_class="interactive", scheduled=4,
                            sent=4.0, status="timeout")
    g = summarize_group("web", [*done, waiting], cutoff=10.0, duration=10.0, slo_ttft_s=1.0)
    assert g.requests == 4 and g.completed == 3 and g.censored == 1
    assert g.ttft.max == pytest.approx(6.0)      # lower bound: cutoff - sent
    assert g.slo_attainment == pytest.approx(0.75)
    assert g.goodput_rps == pytest.approx(0.3)


# --- runner helpers and the report ---------------------------------------------------------------------

def test_reusable_tokens_hand_values() -> None:
    # prompt 100, 100 generated, chunks of 32 -> continuation chunks start at 132, 164, 196
    # (L-1)//16*16: 131->128, 163->160, 195->192
    assert reusable_tokens(100, 100, 32, 16) == 128 + 160 + 192
    assert reusable_tokens(100, 32, 32, 16) == 0     # one chunk: nothing to continue
    assert reusable_tokens(10, 300, 256, 128) == 256  # one continuation at L=266 -> 2 full blocks
    # cut off right at a chunk boundary: the next chunk (L=164) was already looked up
    assert reusable_tokens(100, 64, 32, 16, finished=False) == 128 + 160
    assert reusable_tokens(100, 64, 32, 16) == 128


def test_plan_and_sweep_policy() -> None:
    sc = _scenario(chunk_sizes=[16, 64])
    labels = [p.label for p in plan_systems(sc)]
    assert labels[:2] == ["tokenslice-q16", "tokenslice-q64"]  # the default policy: long slices, quantum 16/64
    assert labels[-1] == "vllm-priority"                    # needs its own engine: last
    assert "unloaded-tokenslice-q32" in labels
    with_reserve = [p.label for p in plan_systems(_scenario(chunk_sizes=[16], reserved_slots=[0, 1]))]
    assert with_reserve[:2] == ["tokenslice-q16", "tokenslice-q16-r1"]
    assert sweep_policy(sc, 16, 1).reserved_slots_per_endpoint == 1
    with pytest.raises(ValueError, match="reserved_slots"):
        _scenario(reserved_slots=[4])
    pol = sweep_policy(sc, 64)
    assert pol.chunk_size == 64 and pol.slots_per_endpoint == sc.max_num_seqs
    assert all(c.chunk_size is None for c in pol.priority_classes)
    a, b = salted(build_trace(sc), "x"), salted(build_trace(sc), "y")
    assert a[0].prompt != b[0].prompt and a[0].at == b[0].at


def test_the_per_slice_comparison_runs_beside_the_default_with_its_own_labels() -> None:
    """``tokenslice-per-slice`` is the old mode (--max-slice-tokens 0, winning over the scenario's flags);
    ``tokenslice`` run with an explicit 0 is per slice too, labelled so, and the same plan is not run twice."""
    sc = _scenario(chunk_sizes=[32], systems=["tokenslice", "tokenslice-per-slice", "vllm-fcfs"])
    plans = {p.label: p for p in plan_systems(sc)}
    assert plans["tokenslice-q32"].picker_args == () and plans["tokenslice-q32"].kind == "tokenslice"
    per = plans["tokenslice-c32"]
    assert per.kind == "tokenslice-per-slice" and per.mode == "tokenslice"
    assert not long_slices([*sc.picker_args, *per.picker_args])
    long_asked = type(sc).model_validate({**sc.model_dump(), "picker_args": ["--max-slice-tokens", "4096"]})
    assert not long_slices([*long_asked.picker_args, *plan_systems(long_asked)[1].picker_args])  # 0 wins
    explicit = _scenario(chunk_sizes=[32], systems=["tokenslice", "tokenslice-per-slice"],
                         picker_args=["--max-slice-tokens", "0"])
    labels = [p.label for p in plan_systems(explicit)]
    assert labels.count("tokenslice-c32") == 1 and "unloaded-tokenslice-c32" in labels


def test_shipped_headline_scenarios_run_the_default_policy_without_a_reserve() -> None:
    """Issue 12: the headline must meet its targets with the default policy and no reserved slots."""
    gpu = resolve_scenario(str(GPU_HEADLINE))
    for sc in (resolve_scenario("headline"), resolve_scenario("demo"), gpu):
        plans = [p for p in plan_systems(sc) if p.kind == "tokenslice"]
        assert plans and all(p.reserved == 0 and not p.picker_args for p in plans), sc.name
        assert long_slices(sc.picker_args) and all(p.label.startswith(("tokenslice-q", "unloaded-tokenslice-q"))
                                                   for p in plans), sc.name


def test_the_policys_own_reserve_is_kept_unless_swept() -> None:
    """A policy with reservedSlotsPerEndpoint: 2 (headline-gpu.yaml had it); the run uses it without --reserved."""
    shipped = resolve_scenario(str(GPU_HEADLINE))
    gpu = shipped.model_copy(update={"policy": shipped.policy.model_copy(update={"reserved_slots_per_endpoint": 2})})
    assert gpu.policy.reserved_slots_per_endpoint == 2
    plans = [p for p in plan_systems(gpu) if p.kind == "tokenslice" and not p.unloaded]
    assert plans and all(p.reserved == 2 and p.label.endswith("-r2") for p in plans)
    assert sweep_policy(gpu, 32, plans[0].reserved).reserved_slots_per_endpoint == 2
    swept = type(gpu).model_validate({**gpu.model_dump(), "reserved_slots": [0]})
    assert [p.reserved for p in plan_systems(swept) if p.kind == "tokenslice" and not p.unloaded] == [0, 0, 0]


def _system(label: str, kind: str, hi_ttft: float, tokens_a: int, tokens_b: int, *, unloaded: bool = False,
            chunk: int | None = None) -> SystemResult:
    rs = [_req(i, "web", [10 + i + hi_ttft, 10 + i + hi_ttft + 0.1], sent=10.0 + i, cls="interactive",
               stream="hi") for i in range(10)]
    if not unloaded:
        rs.append(_req(20, "batch-a", [8 + k * 20 / tokens_a for k in range(tokens_a)], stream="batch-a"))
        rs.append(_req(21, "batch-b", [8 + k * 20 / tokens_b for k in range(tokens_b)], stream="batch-b"))
        for i, tenant in ((22, "batch-a"), (23, "batch-b")):  # one more request each, queued all along: backlogged
            rs.append(_req(i, tenant, [], stream=tenant))
            rs[-1].status = "timeout"
    return SystemResult(Plan(label, SYSTEMS[kind], chunk, unloaded), rs, cutoff=40, started_at=0)


def test_checks_and_markdown_report_the_targets() -> None:
    sc = _scenario(window_s=30, warmup_s=8)
    results = [
        _system("tokenslice-c16", "tokenslice", 0.3, 400, 200, chunk=16),
        _system("vllm-fcfs", "vllm-fcfs", 9.0, 300, 300),
        _system("vllm-priority", "vllm-priority", 2.0, 300, 300),
        _system("unloaded-tokenslice-c32", "tokenslice", 0.2, 0, 0, unloaded=True, chunk=32),
    ]
    results[0].gateway_counters = {"sum_queue_wait:batch": 2.0, "count_queue_wait:batch": 4.0,
                                   "tokenslice_picker_preemptions_total": 7.0}
    summaries = [summarize(r, sc) for r in results]
    assert summaries[0].queue_wait_ms == {"batch": 500.0} and summaries[0].preemptions == 7
    by = {c.claim: c for c in checks(summaries, sc)}
    assert by["hi p99 TTFT <= 2x unloaded (tokenslice-c16)"].met is True
    assert by["hi p99 TTFT >= 10x better than vLLM FCFS (tokenslice-c16)"].met is True   # 9.0/0.3 = 30x
    assert by["hi p99 TTFT >= 5x better than vLLM priority (tokenslice-c16)"].met is True   # 2.0/0.3 = 6.7x
    assert by["throughput >= 95% of vLLM FCFS (tokenslice-c16)"].met is True
    assert by["batch tenants within 5% of their weights while both backlogged, policy cost (tokenslice-c16)"].met
    assert by["batch tenants within 5% of their weights while both backlogged, output tokens only "
              "(tokenslice-c16)"].met is True
    assert "in 22.0s both backlogged" in by["batch tenants within 5% of their weights while both backlogged, "
                                            "policy cost (tokenslice-c16)"].measured
    fcfs = next(s for s in summaries if s.label == "vllm-fcfs")
    assert fcfs.fairness is not None and fcfs.fairness.max_share_error == pytest.approx(0.5)
    text = markdown(summaries, sc, "tokenslice bench demo")
    assert "| tokenslice-c16 |" in text and "`tokenslice bench demo`" in text and "| yes |" in text
    results[0].preemption = {"preemptions": 7.0, "preemptions_per_s": 0.35, "cut_to_free_p50_s": 0.003,
                             "cut_to_free_p99_s": 0.005, "waiter_queue_p50_s": 0.004, "waiter_queue_p99_s": 0.04,
                             "recomputed_tokens_per_preemption": 15.0}
    results[0].observation.seconds = 20.0
    table = preemption_markdown(results, summaries, sc)
    row = next(line for line in table.splitlines() if line.startswith("| tokenslice-c16 |"))
    assert "| 7 | 0.35 | - | 3 / 5 | 4 / 40 |" in row and "| 15.0 |" in row


def test_a_stored_run_is_re_read_for_both_fair_share_numbers(tmp_path: Path) -> None:
    """`tokenslice bench fairness results.json`: old runs kept no token times; evenly spaced tokens are exact here."""
    import json

    sc = _scenario(window_s=30, warmup_s=8)
    results = [_system("tokenslice-c16", "tokenslice", 0.3, 400, 200, chunk=16),
               _system("unloaded-tokenslice-c32", "tokenslice", 0.2, 0, 0, unloaded=True, chunk=32)]
    summaries = [summarize(r, sc) for r in results]
    write_json(tmp_path / "results.json", sc, results, summaries, {})
    rows = fairness_from_json(json.loads((tmp_path / "results.json").read_text()))
    assert [label for label, _ in rows] == ["tokenslice-c16"]            # the unloaded system has no batch tenants
    f, live = rows[0][1], summaries[0].fairness
    assert live is not None and live.backlogged is not None and f.backlogged is not None
    assert f.max_share_error == pytest.approx(live.max_share_error, abs=0.01)
    assert f.backlogged.seconds == pytest.approx(live.backlogged.seconds)  # the queued requests: 22 s
    assert f.backlogged.max_share_error == pytest.approx(live.backlogged.max_share_error, abs=0.01)


def test_long_slices_are_recognised_from_the_picker_flags() -> None:
    """No flag is the picker's default, long slices; 0 is per-slice mode; the last flag wins (as in argparse)."""
    assert long_slices(["--max-slice-tokens", "4096"]) and long_slices(["--max-slice-tokens=4096"])
    assert long_slices([]) and long_slices(["--x", "1"])
    assert not long_slices(["--max-slice-tokens", "0"]) and not long_slices(["--max-slice-tokens=0"])
    assert not long_slices(["--max-slice-tokens", "4096", "--max-slice-tokens", "0"])
    assert long_slices(["--max-slice-tokens=0", "--max-slice-tokens", "512"])


def test_the_kv_hit_target_is_judged_only_where_it_can_fail() -> None:
    sc = _scenario(window_s=30, warmup_s=8)
    res = _system("tokenslice-c16", "tokenslice", 0.3, 400, 200, chunk=16)
    res.engine_counters = {"prefix_cache_queries": 100.0, "prefix_cache_hits": 10.0}
    res.reusable_tokens = res.reusable_tokens_max = 100.0

    def kv_check(result: SystemResult, scenario) -> object:
        by = {c.claim: c for c in checks([summarize(result, scenario)], scenario)}
        return by["continuation chunks hit the prefix cache >= 95% (tokenslice-c16)"]

    quiet = kv_check(res, sc)  # one engine, no preemption: every continuation finds its KV, cannot fail
    assert quiet.met is None and "not judged" in quiet.measured
    res.gateway_counters = {"tokenslice_picker_preemptions_total": 3.0}
    assert kv_check(res, sc).met is False  # continuations after cuts: 10% is a real miss
    two = _scenario(window_s=30, warmup_s=8, engines=2)
    res.gateway_counters = {}
    assert kv_check(res, two).met is False


def test_rounds_run_each_engines_systems_in_abba_order_with_a_label_per_round() -> None:
    sc = _scenario(systems=["tokenslice", "vllm-fcfs"], chunk_sizes=[32], rounds=3)
    group = [p for p in plan_systems(sc) if p.engine_policy == "fcfs"]
    labels = [p.label for p in rounds_of(group, sc.rounds)]
    first = [p.label for p in group]
    assert labels == first + [f"{x}#2" for x in reversed(first)] + [f"{x}#3" for x in first]
    assert {base_label(x) for x in labels} == set(first)
    assert [p.label for p in rounds_of(group, 1)] == first               # one round: the labels of old


def test_pooled_targets_judge_every_round_together() -> None:
    """Round 1 alone misses throughput; pooled with a faster round 2 the mean meets it -- and it says so per round."""
    sc = _scenario(window_s=30, warmup_s=8, rounds=2)
    results = [
        _system("tokenslice-c16", "tokenslice", 0.3, 400, 200, chunk=16),
        _system("vllm-fcfs", "vllm-fcfs", 9.0, 500, 250),
        _system("vllm-fcfs#2", "vllm-fcfs", 9.0, 500, 250),
        _system("tokenslice-c16#2", "tokenslice", 0.3, 600, 300, chunk=16),
        _system("unloaded-tokenslice-c32", "tokenslice", 0.2, 0, 0, unloaded=True, chunk=32),
        _system("unloaded-tokenslice-c32#2", "tokenslice", 0.2, 0, 0, unloaded=True, chunk=32),
    ]
    summaries = [summarize(r, sc) for r in results]
    tps = {s.label: s.throughput_tps for s in summaries}
    r1, r2 = tps["tokenslice-c16"] / tps["vllm-fcfs"], tps["tokenslice-c16#2"] / tps["vllm-fcfs#2"]
    pooled = (tps["tokenslice-c16"] + tps["tokenslice-c16#2"]) / (tps["vllm-fcfs"] + tps["vllm-fcfs#2"])
    assert r1 < 0.95 <= pooled < r2
    by = {c.claim: c for c in checks(summaries, sc)}
    assert by["throughput >= 95% of vLLM FCFS (tokenslice-c16)"].met is False          # round 1 alone
    assert not any("#2" in claim for claim in by)
    text = pooled_markdown(results, summaries, sc)
    assert "Pooled over 2 rounds" in text
    assert (f"| throughput >= 95% of vLLM FCFS, pooled (tokenslice-c16) | {pooled:.1%} (per round: {r1:.0%}, "
            f"{r2:.0%}) | yes |") in text
    assert ("| hi p99 TTFT >= 10x better than vLLM FCFS, pooled (tokenslice-c16) | 9.000s / 0.300s = 30.0x "
            "| yes |") in text
    assert "| hi p99 TTFT <= 2x unloaded, pooled (tokenslice-c16) | 0.300s vs 2x0.200s = 1.5x | yes |" in text
    assert "| batch tenants within 5% of their weights while backlogged, pooled (tokenslice-c16) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| tokenslice-c16 | 2 |"))
    assert f"| {tps['tokenslice-c16']:.0f}, {tps['tokenslice-c16#2']:.0f} |" in row
    assert pooled_markdown(results[:2], summaries[:2], _scenario(window_s=30, warmup_s=8)) == ""   # one round
