"""Residency-aware scheduling (issue 13): whose KV is probably cached, and what the picker does with it.

The rotation test replays chunk boundaries through the real dispatcher and judges the result with
its own independent LRU model of vLLM's prefix cache (not the tracker under test): with the
feature off (no tracker) most continuations of a working set larger than the cache find their KV
evicted; with it on at most half as many do, and every tenant is still served.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from tokenslice.policy import PriorityClass, SchedulingPolicySpec, Tenant
from tokenslice_picker.datastore.endpoints import Datastore, Endpoint
from tokenslice_picker.datastore.scraper import parse_vllm_metrics
from tokenslice_picker.dispatcher import Dispatcher
from tokenslice_picker.flowcontrol.chunk import Chunk, make_chunk
from tokenslice_picker.metrics import PickerMetrics
from tokenslice_picker.scheduling.affinity import Verdict, holder_verdict
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.profile import default_profile
from tokenslice_picker.scheduling.residency import ResidencyAwareVictims, ResidencyTracker, Tier
from tokenslice_picker.scheduling.victims import FAIR_SHARE, PRIORITY, LowestClassFirst, VictimContext

EP = "10.0.0.1:80"
TENANTS = [f"t{i}" for i in range(6)]
POLICY = SchedulingPolicySpec(slots_per_endpoint=2, chunk_size=32, priority_classes=[
    PriorityClass(name="hi", priority=10, preemptible=False),
    PriorityClass(name="lo", priority=1, starvation_seconds=600)],
    tenants=[Tenant(name=t) for t in TENANTS])


def _released(tracker: ResidencyTracker, ep: Endpoint, rid: str, context: int) -> None:
    c = make_chunk(rid, "t", "lo", index=1, prompt_tokens=context, slice=0)
    tracker.on_grant(c, ep)
    tracker.on_release(c, ep, 0)


def test_tracker_replays_the_lru_gpu_then_offload_then_evicted():
    ep = Endpoint(EP, kv_capacity_tokens=100)
    tracker = ResidencyTracker(offload_tokens=48)
    assert tracker.tier("r1", ep) is None  # never seen here
    for rid in ("r1", "r2", "r3"):
        _released(tracker, ep, rid, 48)
    # newest first: r3 (48), r2 (96) fit in 100; r1 (144) fits only with the 48-token offload tier
    assert [tracker.tier(r, ep) for r in ("r3", "r2", "r1")] == [Tier.RESIDENT, Tier.RESIDENT, Tier.OFFLOADED]
    _released(tracker, ep, "r4", 40)  # 40 rounds up to 48 (16-token blocks): r1 falls out entirely
    assert tracker.tier("r1", ep) is Tier.EVICTED
    running = make_chunk("r2", "t", "lo", index=2, prompt_tokens=96, slice=0)
    tracker.on_grant(running, ep)  # r2 resumes: its 96 tokens are held first
    # held first: r2's 96; then newest paused first: r4 (144 -> offload tier), r3 (192 -> evicted)
    assert [tracker.tier(r, ep) for r in ("r2", "r4", "r3")] == [Tier.RESIDENT, Tier.OFFLOADED, Tier.EVICTED]
    assert tracker.tier("r1", Endpoint(EP)) is None  # capacity unknown: no claim at all


def test_scraper_reads_the_kv_capacity_from_cache_config_info():
    text = ('vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="256",'
            'num_cpu_blocks="None",engine="0"} 1.0\nvllm:kv_cache_usage_perc{engine="0"} 0.25\n')
    values = parse_vllm_metrics(text)
    assert values["kv_capacity_tokens"] == 4096 and values["kv_usage"] == 0.25


def test_evicted_kv_costs_nothing_to_move_resident_kv_does():
    cost = CostModel(prefill_tokens_per_second=1000.0)
    holder = Endpoint(EP, granted=2, mean_chunk_s=0.5)
    chunk = make_chunk("r", "t", "lo", index=3, prompt_tokens=500, generated=500, kv_holder=EP)
    # 1000 resident tokens take 1 s to recompute elsewhere: waiting ~0.5 s for the holder is cheaper
    assert holder_verdict(chunk, holder, slots=2, ahead=0, cost_model=cost) is Verdict.WAIT
    assert holder_verdict(chunk, holder, slots=2, ahead=0, cost_model=cost, resident_tokens=1000) is Verdict.WAIT
    # evicted on the holder: it recomputes there too, so any free endpoint beats waiting
    assert holder_verdict(chunk, holder, slots=2, ahead=0, cost_model=cost, resident_tokens=0) is Verdict.MIGRATE


def test_no_fair_share_cut_that_overflows_the_cache_priority_cuts_still_happen():
    ep = Endpoint(EP, granted=2, tokens_per_s=16.0, kv_capacity_tokens=256)
    tracker = ResidencyTracker()
    sel = ResidencyAwareVictims(LowestClassFirst(), tracker)
    classes = {c.name: c for c in POLICY.priority_classes}
    ctx = VictimContext(classes.__getitem__, lambda c: 16, lambda c, t: {"t0": 100.0}.get(t, 0.0), 10.0)

    def running(rid: str, tenant: str) -> Chunk:
        c = make_chunk(rid, tenant, "lo", index=1, prompt_tokens=100, slice=64)
        c.granted_on, c.endpoint, c.dispatched_at, c.enqueued_at = ep, EP, 1.0, 1.0
        tracker.on_grant(c, ep)
        return c
    victim = running("v", "t0")
    waiter = make_chunk("w", "t1", "lo", index=1, prompt_tokens=32)
    assert LowestClassFirst().select(waiter, [victim], ctx).reason == FAIR_SHARE
    assert sel.select(waiter, [victim], ctx).reason == FAIR_SHARE  # 176 + 32 tokens held of 256: it stays cached
    for n in range(4):
        _released(tracker, ep, f"old{n}", 200)  # finished / paused long ago, far beyond the cache
    # what is paused already does not count: the cut adds nothing to it, and the victim (the newest) stays
    assert sel.select(waiter, [victim], ctx).reason == FAIR_SHARE
    big = make_chunk("big", "t1", "lo", index=1, prompt_tokens=100)
    # this waiter's 112 tokens + the 176 running ones exceed 256: pausing the victim only thrashes
    assert sel.select(big, [victim], ctx) is None
    urgent = make_chunk("u", "t1", "hi", index=0, prompt_tokens=200)
    assert sel.select(urgent, [victim], ctx).reason == PRIORITY  # a priority cut is made regardless


class _Worker:
    """Records the cuts the dispatcher sends (no worker process: the cut's effect is not under test)."""

    def __init__(self) -> None:
        self.cuts: list[tuple[str, str, int, str]] = []

    async def __call__(self, address: str, request_id: str, chunk_index: int, reason: str) -> int | None:
        self.cuts.append((address, request_id, chunk_index, reason))
        return 200


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)  # loop turns for the tasks to queue their next chunk (no timing)


async def test_a_fair_share_cut_is_not_withheld_for_good_once_served_requests_outgrew_the_cache():
    """The wrapper used to count every request ever released on the endpoint (finished ones too): once
    they outgrew the cache, no fair-share cut was ever made again, and an owed tenant's waiter sat
    behind a whole long slice (fails that way with the old ``overflows``)."""
    policy = SchedulingPolicySpec(slots_per_endpoint=1, chunk_size=8, priority_classes=[
        PriorityClass(name="batch", priority=1, starvation_seconds=600)])
    ds = Datastore([EP])
    (ep,) = ds.endpoints()
    ep.kv_capacity_tokens = 1024
    tracker = ResidencyTracker()
    worker = _Worker()
    profile = default_profile()
    assert profile.victim_selector is not None
    profile.victim_selector = ResidencyAwareVictims(profile.victim_selector, tracker)
    d = Dispatcher(policy, ds, PickerMetrics(), cut=worker, profile=profile, residency=tracker,
                   max_slice_tokens=4096)
    for n in range(12):  # twelve finished requests of ~200 tokens: 2400 tokens served here, > 1024
        done = make_chunk(f"done{n}", "c", "batch", prompt_tokens=100, slice=4096)
        await d.acquire(done)
        d.release(done, 100)
    ep.tokens_per_s = 100.0  # the decode rate observed (10 ms a token)
    a_long = make_chunk("a-long", "a", "batch", index=1, prompt_tokens=100, generated=50, slice=4096, kv_holder=EP)
    await d.acquire(a_long)
    a_long.dispatched_at -= 5.0  # decoding for 5 s (~500 tokens, far past its 8-token quantum): set, not slept
    b_next = asyncio.ensure_future(d.acquire(make_chunk("b-0", "b", "batch", prompt_tokens=64, slice=4096)))
    await _settle()
    # 160 running + the waiter's 64 fit 1024: a is ahead of b, so b's waiter cuts it
    assert worker.cuts == [(EP, "a-long", 1, "fair_share")]
    d.release(a_long, 500)
    await _settle()
    assert b_next.done()
    await d.close()


async def test_a_running_long_slice_pushes_paused_kv_out_as_it_grows():
    """A long slice is granted with one quantum of context assumed; the dispatcher's accrual (what it
    has produced by now) grows it in the replay, so a paused request it crowds out is no longer
    counted resident (fails without ``on_progress``: the replay kept the grant-time 160 tokens)."""
    policy = SchedulingPolicySpec(slots_per_endpoint=1, chunk_size=8, priority_classes=[
        PriorityClass(name="batch", priority=1, starvation_seconds=600)])
    ds = Datastore([EP])
    (ep,) = ds.endpoints()
    ep.kv_capacity_tokens = 768
    tracker = ResidencyTracker()
    d = Dispatcher(policy, ds, PickerMetrics(), cut=_Worker(), residency=tracker, max_slice_tokens=4096)
    _released(tracker, ep, "p", 300)  # a paused request: 304 tokens cached
    ep.tokens_per_s = 100.0
    a_long = make_chunk("a-long", "a", "batch", index=1, prompt_tokens=100, generated=50, slice=4096, kv_holder=EP)
    await d.acquire(a_long)
    assert tracker.tier("p", ep) is Tier.RESIDENT  # 160 running + 304 paused of 768
    a_long.dispatched_at -= 5.0  # decoding for 5 s at 100 tokens/s: ~500 tokens more context (set, not slept)
    waiter = asyncio.ensure_future(d.acquire(make_chunk("a-next", "a", "batch", prompt_tokens=16, slice=4096)))
    await _settle()  # the pass for the waiter accrues the running slice
    assert tracker.tier("p", ep) is Tier.EVICTED  # ~656 running + 304 > 768
    waiter.cancel()
    await _settle()
    await d.close()


class _CountingTracker(ResidencyTracker):
    """Counts the chunks the ordering ranks (the work a pass does before its first grant)."""

    ranked = 0

    def _ranked(self, run, counter, holder):  # type: ignore[no-untyped-def]
        self.ranked += len(run) if len(run) > 1 else 0
        return super()._ranked(run, counter, holder)


async def test_an_interactive_grant_waits_for_no_ranking_of_the_batch_queue():
    """The ordering used to rank the whole queue before the pass looked at its first chunk, so every
    interactive grant paid O(queued batch chunks) of sorting first; now a pinned chunk at the head goes
    out before any run behind it is ranked (fails with the old list-building ``order``)."""
    policy = SchedulingPolicySpec(slots_per_endpoint=3, reserved_slots_per_endpoint=1, chunk_size=32,
                                  priority_classes=POLICY.priority_classes, tenants=POLICY.tenants)
    ds = Datastore([EP])
    (ep,) = ds.endpoints()
    ep.kv_capacity_tokens = 4096
    tracker = _CountingTracker()
    d = Dispatcher(policy, ds, PickerMetrics(), residency=tracker, max_slice_tokens=0)
    running = [make_chunk(f"run{i}", TENANTS[i], "lo", index=1, prompt_tokens=64, slice=32, kv_holder=EP)
               for i in range(2)]
    first_hi = make_chunk("hi-0", "t0", "hi", prompt_tokens=16, slice=32)
    for c in (*running, first_hi):
        await d.acquire(c)  # every slot busy, the reserved one with the interactive chunk
    for i in range(6):  # six paused batch continuations, resident: the ordering has something to rank
        _released(tracker, ep, f"lo{i}", 64)
    waiting = [asyncio.ensure_future(d.acquire(make_chunk(f"lo{i}", TENANTS[i], "lo", index=1, prompt_tokens=64,
                                                          slice=32, kv_holder=EP))) for i in range(6)]
    second_hi = make_chunk("hi-1", "t1", "hi", prompt_tokens=16, slice=32)
    hi_next = asyncio.ensure_future(d.acquire(second_hi))
    await _settle()
    assert not hi_next.done()
    tracker.ranked = 0
    d.release(first_hi, 32)  # the reserved slot frees: the pass grants the interactive chunk
    await _settle()
    assert hi_next.done() and tracker.ranked == 0
    d.release(second_hi, 32)
    d.release(running[0], 32)  # a batch slot frees: now the batch queue is ranked (the feature is on)
    await _settle()
    assert tracker.ranked >= 2 and sum(w.done() for w in waiting) == 1
    for w in waiting:
        w.cancel()
    await _settle()


async def _rotate(tracker: ResidencyTracker | None, *, chunks: int = 12, capacity: int = 1024,
                  prompt: int = 64, slice_: int = 32) -> tuple[int, int, dict[str, int]]:
    """Six one-request tenants share 2 slots chunk by chunk; returns (continuations, evicted, chunks per tenant).

    A chunk boundary is one ``release`` of the longest-running chunk; the request's next chunk then
    arrives like a driver's.  Eviction is judged by this test's own LRU model of the engine cache.
    """
    ds = Datastore([EP])
    d = Dispatcher(POLICY, ds, PickerMetrics(), residency=tracker, max_slice_tokens=0)  # chunk by chunk
    ep = ds.get(EP)
    assert ep is not None
    ep.kv_capacity_tokens = capacity
    granted: list[tuple[Chunk, asyncio.Future[None]]] = []
    cache: OrderedDict[str, int] = OrderedDict()  # paused contexts, least recently released first
    held: dict[str, int] = {}  # running contexts
    stats = {"continuations": 0, "evicted": 0}
    served = dict.fromkeys(TENANTS, 0)

    def resident(rid: str) -> bool:
        used = sum(held.values())
        for other in reversed(cache):
            used += cache[other]
            if other == rid:
                return used <= capacity
        return False

    async def request(rid: str, tenant: str) -> None:
        for k in range(chunks):
            c = make_chunk(rid, tenant, "lo", index=k, prompt_tokens=prompt, generated=k * slice_, slice=slice_,
                           kv_holder=EP if k else "")
            await d.acquire(c)
            if k:
                stats["continuations"] += 1
                stats["evicted"] += not resident(rid)
            cache.pop(rid, None)
            held[rid] = prompt + (k + 1) * slice_
            served[tenant] += 1
            done = asyncio.get_running_loop().create_future()
            granted.append((c, done))
            await done

    tasks = [asyncio.ensure_future(request(f"r{i}", t)) for i, t in enumerate(TENANTS)]
    await _settle()
    while granted:
        c, done = granted.pop(0)
        cache[c.request_id] = held.pop(c.request_id)
        cache.move_to_end(c.request_id)
        d.release(c, slice_)
        done.set_result(None)
        await _settle()
    await asyncio.gather(*tasks)
    return stats["continuations"], stats["evicted"], served


async def test_rotation_over_a_working_set_larger_than_the_cache_evicts_half_as_often_with_residency():
    n_off, evicted_off, served_off = await _rotate(None)
    n_on, evicted_on, served_on = await _rotate(ResidencyTracker(bonus_tokens=256))
    assert n_off == n_on == 6 * 11
    assert evicted_off >= n_off * 0.6  # round robin over 6 requests, cache for ~3: the LRU misses
    assert evicted_on <= evicted_off / 2
    assert served_on == served_off == dict.fromkeys(TENANTS, 12)  # everyone finished


def test_resident_continuation_goes_first_only_within_the_bonus():
    ds = Datastore([EP])
    tracker = ResidencyTracker(bonus_tokens=100)
    ep = ds.get(EP)
    assert ep is not None
    ep.kv_capacity_tokens = 64
    ev = make_chunk("old", "a", "lo", index=1, prompt_tokens=64, slice=32, kv_holder=EP)
    res = make_chunk("new", "b", "lo", index=1, prompt_tokens=32, slice=32, kv_holder=EP)
    _released(tracker, ep, "old", 64)
    _released(tracker, ep, "new", 32)  # "new" is cached, "old" was pushed out by it
    assert tracker.chunk_tier(ev, ep) is Tier.EVICTED and tracker.chunk_tier(res, ep) is Tier.RESIDENT

    def order(b_served: float, pinned: str = "") -> list[str]:
        return [c.request_id for c in tracker.order([ev, res], counter=lambda k, t: {"a": 0.0, "b": b_served}[t],
                                                    pinned=lambda c: c.request_id == pinned, holder=ds.get)]
    assert order(60.0) == ["new", "old"]  # b is ahead by 60 < 100: its resident chunk goes first
    assert order(160.0) == ["old", "new"]  # ahead by more than the bonus: fair share wins
    assert order(60.0, pinned="old") == ["old", "new"]  # a pinned (aged / non-preemptible) chunk keeps its place


def test_offloaded_kv_is_resident_but_slower_in_the_cost_model():
    ep = Endpoint(EP, kv_capacity_tokens=64)
    tracker = ResidencyTracker(offload_tokens=1000)
    _released(tracker, ep, "r", 96)
    _released(tracker, ep, "s", 64)  # r is pushed out of the GPU cache into the CPU tier
    chunk = make_chunk("r", "t", "lo", index=2, prompt_tokens=64, generated=32, kv_holder=EP)
    assert tracker.chunk_tier(chunk, ep) is Tier.OFFLOADED
    assert tracker.resident_tokens(chunk, ep) == 48  # half of the 96-token context: reloading is not free
    assert ResidencyTracker().resident_tokens(chunk, ep) is None  # never seen there: no claim
