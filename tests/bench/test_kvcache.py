"""The overflow benchmark's plumbing (issue 13): feature variants side by side, and the KV-cost arithmetic."""

from __future__ import annotations

from tokenslice import promtext
from tokenslice.bench import kvcache
from tokenslice.bench.runner import long_slices, plan_systems
from tokenslice.bench.scenario import resolve_scenario
from tokenslice.bench.trace import build_trace


def _interactive(scenario) -> int:
    return sum(r.stream == "hi" for r in build_trace(scenario))


def test_overflow_scenario_runs_residency_off_on_off_again_per_chunk_on_a_shrunk_cache():
    scenario = resolve_scenario("overflow")
    plans = plan_systems(scenario)
    labels = [p.label for p in plans]
    # A-B-A: consecutive systems drift on a shared machine; the off-again run shows it
    assert labels[:3] == ["tokenslice-c32-r1", "tokenslice-c32-r1-kvres", "tokenslice-c32-r1-again"]
    by_label = {p.label: p for p in plans}
    assert by_label["tokenslice-c32-r1"].picker_args == by_label["tokenslice-c32-r1-again"].picker_args == ()
    assert by_label["tokenslice-c32-r1-kvres"].picker_args == ("--kv-residency",)
    assert not long_slices(scenario.picker_args)  # per-chunk slices, said explicitly (not the picker's default)
    assert "vllm-fcfs" in by_label
    assert scenario.vllm_args[scenario.vllm_args.index("--kv-cache-memory-bytes") + 1] == str(4 * 2**20)
    assert _interactive(scenario) >= 100  # a p99 that is not just the slowest request
    # calibrated like the GPU one: fixed rates stopped overflowing once the engine core had a CPU of its own
    assert scenario.calibrate is not None and scenario.calibrate.multiple == 1.5


def test_gpu_overflow_scenario_starts_the_offload_engines_once_for_all_picker_variants():
    scenario = resolve_scenario("scripts/gpu/overflow-gpu.yaml")
    plans = plan_systems(scenario)
    starts = list(dict.fromkeys((p.engine_policy, p.vllm_args) for p in plans))
    assert len(starts) == 2 and "--kv-offloading-size" in starts[1][1]
    offload = [p for p in plans if p.vllm_args]
    assert [p.label for p in offload] == ["tokenslice-c32-r1-offload", "tokenslice-c32-r1-kvres-offload",
                                          "tokenslice-c32-r1-again-offload"]
    assert all("--kv-offload-tokens" in p.picker_args for p in offload)
    assert not long_slices(scenario.picker_args)
    assert _interactive(scenario) >= 100


def _samples(text: str) -> list[promtext.Sample]:
    return promtext.parse(text)


def test_kv_cost_separates_first_chunks_from_continuations_that_found_or_lost_their_prefix():
    before = _samples('vllm:prompt_tokens_total{engine="0"} 100\nvllm:prefix_cache_hits_total{engine="0"} 0\n'
                      f'{kvcache.KV_COMPUTED}_bucket{{le="20.0"}} 1\n{kvcache.KV_COMPUTED}_bucket{{le="50.0"}} 1\n'
                      f'{kvcache.KV_COMPUTED}_count 1\n')
    # five chunks: two first chunks (prompts 40 and 100), two continuations that found their KV
    # (computed 10 and 30 of 200 and 230), one that lost it (computed all 260)
    after = _samples('vllm:prompt_tokens_total{engine="0"} 930\nvllm:prefix_cache_hits_total{engine="0"} 390\n'
                     f'{kvcache.KV_COMPUTED}_bucket{{le="20.0"}} 2\n{kvcache.KV_COMPUTED}_bucket{{le="50.0"}} 4\n'
                     f'{kvcache.KV_COMPUTED}_count 6\n')
    b, a = kvcache.engine_kv_counters([before]), kvcache.engine_kv_counters([after])
    delta = {k: v - b.get(k, 0.0) for k, v in a.items()}
    delta["prefix_cache_hits"] = 390.0
    cost = kvcache.kv_cost(delta, prompt_tokens=[40, 100, 64], started=[True, True, False], block_size=32)
    assert (cost.chunks, cost.first_chunks, cost.continuations) == (5, 2, 3)
    assert cost.threshold == 50.0 and cost.found_prefix == 2  # 3 chunks <= 50 computed, one is the 40-token prompt
    assert cost.recomputed_tokens == 830 - 390 - 140  # continuations' prefill: 10 + 30 + 260
    table = kvcache.markdown([("x", cost, 100.0, 0.5, kvcache.estimate({"residency:resident": 2.0,
                                                                          "residency:evicted": 1.0}))], 2048)
    assert "2 (67%" in table and "| 2 / 0 / 1 |" in table
