"""The dispatcher: slots, the fast path, the pass, cancellation, reserved slots, slice caps."""

from __future__ import annotations

import asyncio

import pytest

from tokenslice.policy import PriorityClass, SchedulingPolicySpec, Tenant
from tokenslice_picker.datastore.endpoints import Datastore, Endpoint
from tokenslice_picker.dispatcher import Dispatcher
from tokenslice_picker.flowcontrol.chunk import Chunk, NoEndpoints, make_chunk
from tokenslice_picker.metrics import PickerMetrics

PER_SLICE = 0
"""``max_slice_tokens`` for the tests that drive chunks slice end by slice end: per-slice mechanics are their
point (the picker's default is long slices, ``PickerSettings``; those tests pass 4096)."""


async def test_dispatcher_slots_cancel_and_reconcile():
    ds = Datastore(["10.0.0.1:80"])
    d = Dispatcher(SchedulingPolicySpec(slots_per_endpoint=1), ds, PickerMetrics(), max_slice_tokens=PER_SLICE)
    first = make_chunk("r1", "t", "standard", index=1, slice=32, generated=0)
    ep = await d.acquire(first)
    assert ep.granted == 1
    waiting = asyncio.ensure_future(d.acquire(make_chunk("r2", "t", "standard", index=1, slice=4)))
    await asyncio.sleep(0)  # let it queue (one loop turn, no timing involved)
    assert len(d.queues) == 1
    waiting.cancel()  # its caller went away: it leaves the queue, nothing leaks
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(d.queues) == 0
    d.release(first, None)
    assert ep.granted == 0
    before = d.ledger.counters.get("standard", "t")
    # the next chunk of r1 reports generated=10: chunk 1 produced 10, not 32 -> the counter is corrected
    nxt = make_chunk("r1", "t", "standard", index=2, slice=32, generated=10, kv_holder=ep.address)
    await d.acquire(nxt)
    assert d.ledger.counters.get("standard", "t") == pytest.approx(before + 2 * (10 - 32) + 2 * 32)
    ds.set_endpoints([])
    with pytest.raises(NoEndpoints):
        await d.acquire(make_chunk("r3", "t", "standard"))


async def test_dispatcher_drains_a_large_backlog_in_priority_then_fair_order():
    ds = Datastore(["10.0.0.1:80", "10.0.0.2:80"])
    policy = SchedulingPolicySpec(slots_per_endpoint=2, priority_classes=[
        PriorityClass(name="hi", priority=10), PriorityClass(name="lo", priority=1)],
        tenants=[Tenant(name="a", weight=3), Tenant(name="b", weight=1)])
    d = Dispatcher(policy, ds, PickerMetrics(), max_slice_tokens=PER_SLICE)
    held = []
    for i in range(4):  # fill every slot
        c = make_chunk(f"fill{i}", "a", "hi", index=1, slice=1)
        await d.acquire(c)
        held.append(c)
    served: list[Chunk] = []

    async def one(c: Chunk) -> None:
        await d.acquire(c)
        served.append(c)

    backlog = [make_chunk(f"lo{i}", "ab"[i % 2], "lo", index=1, slice=4) for i in range(1000)]
    backlog += [make_chunk(f"hi{i}", "ab"[i % 2], "hi", index=1, slice=4) for i in range(1000)]
    tasks = [asyncio.ensure_future(one(c)) for c in backlog]
    while len(d.queues) < len(backlog):
        await asyncio.sleep(0)  # let every task reach the queue (loop turns, not time)
    while held:  # each release grants exactly one queued chunk, which then holds the slot
        seen = len(served)
        d.release(held.pop(0), None)
        while len(d.queues) and len(served) == seen:
            await asyncio.sleep(0)
        held.extend(served[seen:])
    await asyncio.gather(*tasks)
    order = [c.priority_class for c in served]
    assert order == ["hi"] * 1000 + ["lo"] * 1000
    # inside each class the 3:1 weights hold while both tenants are backlogged
    first_hi = [c.tenant for c in served[:1000]][:600]
    assert abs(first_hi.count("a") / len(first_hi) - 0.75) < 0.02


async def test_reserved_slots_are_for_non_preemptible_classes_only():
    ds = Datastore(["10.0.0.1:80"])
    policy = SchedulingPolicySpec(slots_per_endpoint=3, reserved_slots_per_endpoint=1, priority_classes=[
        PriorityClass(name="rt", priority=5, preemptible=False), PriorityClass(name="lo", priority=1)])
    d = Dispatcher(policy, ds, PickerMetrics(), max_slice_tokens=PER_SLICE)
    (ep,) = ds.endpoints()
    order: list[str] = []

    async def run(c: Chunk) -> Chunk:
        await d.acquire(c)
        order.append(c.request_id)
        return c

    async def settle() -> None:
        for _ in range(5):  # loop turns, not time: let woken acquirers record themselves
            await asyncio.sleep(0)

    lo = [await run(make_chunk(f"lo{i}", "t", "lo", index=1, slice=4)) for i in range(2)]  # fills slots - reserved
    backlog = [asyncio.ensure_future(run(make_chunk(f"lo{i}", "t", "lo", index=1, slice=4))) for i in (2, 3)]
    await settle()
    assert ep.granted == 2 and len(d.queues) == 2  # preemptible work may not take the reserved slot
    rt0 = await run(make_chunk("rt0", "t", "rt", index=0, slice=4))  # non-preemptible first chunk: at once
    assert ep.granted == 3 and len(d.queues) == 2
    rt1 = asyncio.ensure_future(run(make_chunk("rt1", "t", "rt", index=1, slice=4)))  # now every slot is busy
    await settle()
    assert len(d.queues) == 3
    d.release(lo[0], None)  # a slot frees: the non-preemptible chunk goes first (priority and reserve)
    await settle()
    assert order[-1] == "rt1" and ep.granted == 3
    d.release(rt0, None)  # only the reserved slot is free: the preemptible backlog keeps waiting
    await settle()
    assert ep.granted == 2 and len(d.queues) == 2 and order[-1] == "rt1"
    d.release(lo[1], None)
    await settle()
    assert order[-1] == "lo2" and ep.granted == 2
    for c in [await rt1, await backlog[0]]:
        d.release(c, None)
    await settle()
    d.release(await backlog[1], None)
    assert order == ["lo0", "lo1", "rt0", "rt1", "lo2", "lo3"] and ep.granted == 0


async def test_a_slice_beyond_the_class_chunk_size_is_accounted_at_the_chunk_size():
    ds = Datastore(["10.0.0.1:80"])
    policy = SchedulingPolicySpec(chunk_size=32, priority_classes=[
        PriorityClass(name="small", priority=5, chunk_size=8), PriorityClass(name="std", priority=1)])
    m = PickerMetrics()
    d = Dispatcher(policy, ds, m, max_slice_tokens=PER_SLICE)
    big = make_chunk("r1", "t", "small", index=1, slice=100)
    await d.acquire(big)
    assert big.slice == 8 and d.ledger.counters.get("small", "t") == pytest.approx(2 * 8)
    assert m.slices_capped.labels("small")._value.get() == 1
    # the next chunk reports what really came out (100): the charge is corrected to it
    d.release(big, None)
    await d.acquire(make_chunk("r1", "t", "small", index=2, slice=8, generated=100, kv_holder="10.0.0.1:80"))
    assert d.ledger.counters.get("small", "t") == pytest.approx(2 * 100 + 2 * 8)
    fits = make_chunk("r2", "t", "std", index=1, slice=32)  # the policy's chunk size for a class without one
    await d.acquire(fits)
    assert fits.slice == 32 and m.slices_capped.labels("std")._value.get() == 0


class Worker:
    """Records the cuts the dispatcher sends (what a worker sidecar would receive) and answers ``status``."""

    def __init__(self, status: int | None = 200) -> None:
        self.status = status
        self.cuts: list[tuple[str, str, int, str]] = []
        self.sent = asyncio.Event()

    async def __call__(self, address: str, request_id: str, chunk_index: int, reason: str) -> int | None:
        self.cuts.append((address, request_id, chunk_index, reason))
        self.sent.set()
        return self.status


HI_LO = SchedulingPolicySpec(slots_per_endpoint=1, priority_classes=[
    PriorityClass(name="top", priority=20), PriorityClass(name="hi", priority=10),
    PriorityClass(name="lo", priority=1)])


async def _settle() -> None:
    for _ in range(5):  # loop turns, not time
        await asyncio.sleep(0)


@pytest.mark.parametrize("preemption", [True, False])
async def test_a_higher_class_waiter_cuts_one_victim_and_gets_its_slot(preemption: bool):
    ds = Datastore(["10.0.0.1:80", "10.0.0.2:80"])
    worker = Worker()
    d = Dispatcher(HI_LO, ds, PickerMetrics(), cut=worker if preemption else None, max_slice_tokens=PER_SLICE)
    a, b = ds.endpoints()
    lo_a = make_chunk("lo-a", "t", "lo", index=1, kv_holder=a.address, prompt_tokens=10**6)
    lo_b = make_chunk("lo-b", "t", "lo", index=3, kv_holder=b.address, prompt_tokens=10**6)
    assert await d.acquire(lo_a) is a and await d.acquire(lo_b) is b
    # a hi continuation bound to b (its prefix is too long to recompute elsewhere)
    hi = asyncio.ensure_future(d.acquire(make_chunk("hi", "t", "hi", index=2, kv_holder=b.address,
                                                    prompt_tokens=10**6)))
    await _settle()
    if not preemption:  # the scheduler without cuts: the waiter waits for a slice end
        assert worker.cuts == [] and not hi.done()
        d.release(lo_b, None)
        assert await hi is b
        return
    assert worker.cuts == [(b.address, "lo-b", 3, "priority")]  # exactly one cut, to the right worker
    # before the victim's stream ends, a chunk of an even higher class queues for b, first in the order
    older = asyncio.ensure_future(d.acquire(make_chunk("top", "t", "top", index=5, kv_holder=b.address,
                                                       prompt_tokens=10**6)))
    await _settle()
    assert len(worker.cuts) == 1  # the victim is already promised: no second cut on b
    d.release(lo_b, 5)  # the victim ended with 5 tokens
    await _settle()
    assert hi.done() and hi.result() is b and not older.done()  # the freed slot was reserved for its waiter
    # the victim's continuation queues behind; nothing else took b meanwhile
    cont = asyncio.ensure_future(d.acquire(make_chunk("lo-b", "t", "lo", index=4, generated=5, kv_holder=b.address,
                                                      prompt_tokens=10**6)))
    await _settle()
    assert b.granted == 1 and not cont.done()
    m = d.metrics
    assert m.preemptions.labels("priority", "lo")._value.get() == 1
    assert m.cut_tokens.labels("produced")._value.get() == 5
    older.cancel()
    cont.cancel()
    await _settle()


async def test_a_cut_the_worker_refuses_frees_the_waiter_to_look_again():
    ds = Datastore(["10.0.0.1:80"])
    worker = Worker(status=404)  # the chunk had already ended there
    d = Dispatcher(HI_LO, ds, PickerMetrics(), cut=worker, max_slice_tokens=PER_SLICE)
    (ep,) = ds.endpoints()
    lo = make_chunk("lo", "t", "lo", index=1)
    await d.acquire(lo)
    hi_chunk = make_chunk("hi", "t", "hi", index=1)
    hi = asyncio.ensure_future(d.acquire(hi_chunk))
    await _settle()
    assert worker.cuts == [(ep.address, "lo", 1, "priority")] and lo.cut_failed and hi_chunk.cutting is None
    assert d.metrics.cut_failures.labels("not_running")._value.get() == 1
    d.release(lo, None)
    assert await hi is ep


async def test_a_non_preemptible_or_equal_class_is_never_cut():
    policy = SchedulingPolicySpec(slots_per_endpoint=1, priority_classes=[
        PriorityClass(name="hi", priority=10), PriorityClass(name="rt", priority=5, preemptible=False)])
    ds = Datastore(["10.0.0.1:80"])
    worker = Worker()
    d = Dispatcher(policy, ds, PickerMetrics(), cut=worker, max_slice_tokens=PER_SLICE)
    rt = make_chunk("rt", "t", "rt", index=1)
    await d.acquire(rt)
    waiters = [asyncio.ensure_future(d.acquire(make_chunk(f"hi{i}", "u", "hi", index=1))) for i in range(2)]
    await _settle()
    assert worker.cuts == []
    d.release(rt, None)
    await _settle()
    assert waiters[0].done() and not waiters[1].done()
    waiters[1].cancel()
    await _settle()


async def test_a_long_slice_is_charged_one_quantum_until_it_reports():
    ds = Datastore(["10.0.0.1:80"])
    policy = SchedulingPolicySpec(chunk_size=32, priority_classes=[PriorityClass(name="std", priority=1)])
    d = Dispatcher(policy, ds, PickerMetrics(), max_slice_tokens=4096)
    long = make_chunk("r", "t", "std", index=1, slice=4096)
    await d.acquire(long)
    assert long.slice == 32 and d.ledger.counters.get("std", "t") == pytest.approx(2 * 32)
    assert d.metrics.slices_capped.labels("std")._value.get() == 0  # a long slice is not a capped one
    d.release(long, 700)  # the worker's count: charged what it produced
    assert d.ledger.counters.get("std", "t") == pytest.approx(2 * 700)
    beyond = make_chunk("r2", "t", "std", index=1, slice=5000)
    await d.acquire(beyond)
    assert d.metrics.slices_capped.labels("std")._value.get() == 1


async def test_a_long_slice_is_cut_for_another_tenant_once_it_ran_its_quantum():
    policy = SchedulingPolicySpec(slots_per_endpoint=1, chunk_size=8, priority_classes=[
        PriorityClass(name="batch", priority=1)])
    ds = Datastore(["10.0.0.1:80"], default_chunk_s=0.05)  # no decode rate seen yet: a quantum is 50 ms
    worker = Worker()
    d = Dispatcher(policy, ds, PickerMetrics(), cut=worker, max_slice_tokens=4096)
    (ep,) = ds.endpoints()
    mine = make_chunk("a-long", "a", "batch", index=1, slice=4096)
    await d.acquire(mine)
    same_tenant = asyncio.ensure_future(d.acquire(make_chunk("a-other", "a", "batch", index=1, slice=4096)))
    other = asyncio.ensure_future(d.acquire(make_chunk("b-1", "b", "batch", index=1, slice=4096)))
    await _settle()
    assert worker.cuts == []  # within its quantum: nobody cuts it
    # no event happens; the picker's own timer notices when the quantum is over
    await asyncio.wait_for(worker.sent.wait(), 5)
    assert worker.cuts == [(ep.address, "a-long", 1, "fair_share")]
    d.release(mine, 3)
    await _settle()
    assert other.done() and not same_tenant.done()  # the other tenant got the slot
    same_tenant.cancel()
    await _settle()
    await d.close()


async def _long_slices_after_b_served(policy: SchedulingPolicySpec,
                                      b_tokens: int) -> tuple[Dispatcher, Endpoint, Worker]:
    """A long-slice dispatcher on one endpoint whose tenant b was already served ``b_tokens``, decoding at an
    observed 100 tokens/s (10 ms a token), with a worker that records cuts."""
    ds = Datastore(["10.0.0.1:80"])
    (ep,) = ds.endpoints()
    worker = Worker()
    d = Dispatcher(policy, ds, PickerMetrics(), cut=worker, max_slice_tokens=4096)
    b_done = make_chunk("b-0", "b", "batch", index=1, slice=4096)
    await d.acquire(b_done)
    d.release(b_done, b_tokens)
    ep.tokens_per_s = 100.0  # the decode rate observed, not this instant chunk's
    return d, ep, worker


async def test_a_running_long_slice_is_charged_as_it_runs_so_a_tenant_it_overtook_cuts_it():
    """Long slices are charged one quantum at grant and the truth at their end; without charging them
    while they run, a tenant holding slots with long slices looks owed, and the other tenant's waiter
    never cuts it (issue 12: 17% share error on the H200, 85% on CPU)."""
    policy = SchedulingPolicySpec(slots_per_endpoint=1, chunk_size=8, priority_classes=[
        PriorityClass(name="batch", priority=1)], tenants=[Tenant(name="a", weight=2), Tenant(name="b", weight=1)])
    d, ep, worker = await _long_slices_after_b_served(policy, 50)  # b: counter 2 x 50 / 1 = 100
    a_long = make_chunk("a-long", "a", "batch", index=1, slice=4096)
    await d.acquire(a_long)
    assert d.ledger.counters.get("batch", "a") == pytest.approx(2 * 8 / 2)  # one quantum at grant
    a_long.dispatched_at -= 5.0  # it has been decoding for 5 s (~500 tokens): set, not slept
    b_next = asyncio.ensure_future(d.acquire(make_chunk("b-1", "b", "batch", index=1, slice=4096)))
    await _settle()
    assert 499 <= d.ledger.counters.get("batch", "a") <= 510  # charged what it produced so far (2 x ~500 / 2)
    assert worker.cuts == [(ep.address, "a-long", 1, "fair_share")]  # a is ahead of b: b's waiter cuts it
    d.release(a_long, 520)  # the worker's count settles the charge: no double counting
    assert d.ledger.counters.get("batch", "a") == pytest.approx(2 * 520 / 2)
    await _settle()
    assert b_next.done()
    await d.close()


async def test_fair_share_cuts_in_one_pass_stop_once_the_owed_tenant_is_charged_ahead():
    """Several waiters of the owed tenant in one pass: each fair-share cut charges its waiter a quantum in
    advance, so one pass cuts only as many slices as the gap is worth, not every slot the other tenant holds."""
    policy = SchedulingPolicySpec(slots_per_endpoint=4, chunk_size=8, priority_classes=[
        PriorityClass(name="batch", priority=1)], tenants=[Tenant(name="a"), Tenant(name="b")])
    d, ep, worker = await _long_slices_after_b_served(policy, 30)  # b: 2 x 30 = 60
    longs = [make_chunk(f"a-{i}", "a", "batch", index=1, slice=4096) for i in range(4)]
    for c in longs:
        await d.acquire(c)
        c.dispatched_at -= 0.105  # each has produced 10 tokens (past its 8-token quantum): a = 4 x 2 x 10 = 80
    waiters = [asyncio.ensure_future(d.acquire(make_chunk(f"b-{i + 1}", "b", "batch", index=1, slice=4096)))
               for i in range(4)]
    await _settle()
    assert d.ledger.counters.get("batch", "a") == pytest.approx(80)
    # a leads by 20: the first cut charges b 16 in advance (76, still behind), the second 32 (92): two cuts
    assert len(worker.cuts) == 2
    assert {c[3] for c in worker.cuts} == {"fair_share"}
    for w in waiters:
        w.cancel()
    await _settle()
    await d.close()
