"""Chunk scheduling through a REAL Envoy and the in-process picker: fair share, priority with the
starvation bound, migration, policy hot reload.

The upstreams are recording aiohttp servers (tests/picker/upstream.py).  Every test builds a
deterministic backlog: the single slot is held by a blocked chunk, the backlog is queued *inside*
the picker (polled until it is there), then the slot is released and the upstream's arrival order
is the picker's dispatch order.  No timing asserts.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.picker.conftest import until
from tokenslice.fairness import jain_index
from tokenslice.policy import FairnessWeights, PriorityClass, SchedulingPolicySpec, Tenant
from tokenslice_picker.scheduling.cost_model import CostModel


async def _backlog(stack, up, chunks: list[dict[str, str]], blocker: dict[str, str]) -> list[asyncio.Task]:
    """Hold the slot with ``blocker``, queue ``chunks`` in this order, return the tasks (slot still held)."""
    up.block()
    tasks = [asyncio.create_task(stack.post(headers=blocker))]
    await until(lambda: len(up.received) == 1, what="blocker holds the slot")
    for h in chunks:
        tasks.append(asyncio.create_task(stack.post(headers=h)))
        n = len(tasks) - 1
        await until(lambda n=n: len(stack.picker.dispatcher.queues) == n, what=f"{n} chunks queued")
    return tasks


async def test_weighted_fair_share_by_tokens_within_5_percent(gateway_stack, upstreams):
    (up,) = await upstreams(1)
    policy = SchedulingPolicySpec(
        slots_per_endpoint=1, fairness=FairnessWeights(input=1, output=2),
        tenants=[Tenant(name="big", weight=3), Tenant(name="small", weight=1), Tenant(name="other")])
    stack = await gateway_stack(endpoints=[up.address], policy=policy)
    # big asks for short slices, small for long ones: fairness is by tokens, not by requests
    big = [stack.chunk_headers(tenant="big", request_id=f"b{i}", chunk_index=1, kv_holder=up.address, slice=8)
           for i in range(120)]
    small = [stack.chunk_headers(tenant="small", request_id=f"s{i}", chunk_index=1, kv_holder=up.address,
                                 slice=16) for i in range(30)]
    interleaved = [h for pair in zip(big[:30], small, strict=True) for h in pair] + big[30:]
    up.block()
    tasks = [asyncio.create_task(stack.post(headers=stack.chunk_headers(tenant="other", slice=1)))]
    await until(lambda: len(up.received) == 1, what="blocker")
    tasks += [asyncio.create_task(stack.post(headers=h)) for h in interleaved]
    await until(lambda: len(stack.picker.dispatcher.queues) == len(interleaved), what="backlog queued")
    up.unblock()
    assert all(s == 200 for s, _, _ in await asyncio.gather(*tasks))
    served = up.received[1:]
    # while both are backlogged: up to the point where either has nothing left
    last = {t: max(i for i, r in enumerate(served) if r.tenant == t) for t in ("big", "small")}
    window = served[:min(last.values()) + 1]
    tokens = {t: sum(r.slice for r in window if r.tenant == t) for t in ("big", "small")}
    share_big = tokens["big"] / (tokens["big"] + tokens["small"])
    assert abs(share_big - 0.75) <= 0.05 * 0.75, tokens
    assert len(window) >= 100  # the comparison covers most of the backlog
    assert jain_index([tokens["big"] / 3, tokens["small"] / 1]) > 0.99
    assert 0 < stack.picker.dispatcher.ledger.jain() <= 1  # the live gauge (last minute, all tenants)


async def test_strict_priority_then_starvation_bound(gateway_stack, upstreams):
    (up,) = await upstreams(1)
    policy = SchedulingPolicySpec(
        slots_per_endpoint=1,
        priority_classes=[PriorityClass(name="high", priority=200),
                          PriorityClass(name="low", priority=100, starvation_seconds=60)])
    # the pause path: the order at slice ends (no cuts)
    stack = await gateway_stack(endpoints=[up.address], policy=policy, preemption=False)

    def make_chunk(klass: str, rid: str) -> dict[str, str]:
        return stack.chunk_headers(priority_class=klass, request_id=rid, chunk_index=1, kv_holder=up.address,
                                   slice=1)

    # 1) strict priority: the low chunk queued first is served after every high one
    tasks = await _backlog(stack, up, [make_chunk("low", "L"), make_chunk("high", "H1"), make_chunk("high", "H2")],
                           make_chunk("high", "blocker"))
    up.unblock()
    await asyncio.gather(*tasks)
    assert [r.request_id for r in up.received[1:]] == ["H1", "H2", "L"]
    assert stack.picker.metrics.pauses.labels("low", "default")._value.get() == 1

    # 2) starvation bound: once the low chunk waited past starvationSeconds it goes first
    stack.picker.set_policy(policy.model_copy(update={"priority_classes": [
        PriorityClass(name="high", priority=200), PriorityClass(name="low", priority=100, starvation_seconds=0.3)]}))
    up.received.clear()
    tasks = await _backlog(stack, up, [make_chunk("low", "L2"), make_chunk("high", "H3"), make_chunk("high", "H4")],
                           make_chunk("high", "blocker2"))
    await until(lambda: stack.picker.dispatcher.queues.oldest(time.monotonic()).get(("low", "default"), 0) > 0.3,
                what="low chunk aged")
    up.unblock()
    await asyncio.gather(*tasks)
    assert [r.request_id for r in up.received[1:]] == ["L2", "H3", "H4"]


async def test_migration_follows_the_cost_model(gateway_stack, upstreams):
    holder, idle = await upstreams(2)
    policy = SchedulingPolicySpec(slots_per_endpoint=1)
    stack = await gateway_stack(endpoints=[holder.address, idle.address], policy=policy,
                                default_chunk_seconds=1.0)
    d = stack.picker.dispatcher

    def resumed(rid: str, prompt: int) -> dict[str, str]:
        return stack.chunk_headers(request_id=rid, chunk_index=2, kv_holder=holder.address, prompt_tokens=prompt,
                                   generated=64, slice=1)

    holder.block()
    busy = asyncio.create_task(stack.post(headers=stack.chunk_headers(chunk_index=1, kv_holder=holder.address,
                                                                      slice=1)))
    await until(lambda: len(holder.received) == 1, what="holder busy")
    # expected wait on the holder = 1 chunk * 1.0 s.  Recompute of 64+64 tokens at 1000 tok/s = 0.128 s:
    # cheaper than waiting -> migrate to the idle endpoint now.
    d.cost_model = CostModel(prefill_tokens_per_second=1000)
    status, _, _ = await stack.post(headers=resumed("cheap", 64))
    assert status == 200 and [r.request_id for r in idle.received] == ["cheap"]
    assert d.migrations == 1
    # recompute of 4000+64 tokens at 1000 tok/s = 4.06 s > 1 s wait -> stay paused for the holder
    waiting = asyncio.create_task(stack.post(headers=resumed("costly", 4000)))
    await until(lambda: len(d.queues) == 1, what="costly chunk paused")
    assert len(idle.received) == 1 and d.migrations == 1
    holder.unblock()
    assert (await waiting)[0] == 200 and (await busy)[0] == 200
    assert [r.request_id for r in holder.received][-1] == "costly"
    assert stack.picker.metrics.migrations._value.get() == 1


async def test_policy_hot_reload_reorders_queued_work_without_dropping_it(gateway_stack, upstreams, tmp_path):
    (up,) = await upstreams(1)
    path = tmp_path / "policy.yaml"
    path.write_text("slotsPerEndpoint: 1\npriorityClasses:\n"
                    "  - {name: alpha, priority: 200}\n  - {name: beta, priority: 100}\n")
    stack = await gateway_stack(endpoints=[up.address], policy_path=path, policy_poll_s=0.05, preemption=False)

    def make_chunk(klass: str, rid: str) -> dict[str, str]:
        return stack.chunk_headers(priority_class=klass, request_id=rid, chunk_index=1, kv_holder=up.address,
                                   slice=1)

    tasks = await _backlog(stack, up, [make_chunk("alpha", "A1"), make_chunk("beta", "B1"), make_chunk("alpha", "A2"),
                                       make_chunk("beta", "B2")], make_chunk("alpha", "blocker"))
    reloads = stack.picker.metrics.policy_reloads
    path.write_text("slotsPerEndpoint: 1\npriorityClasses:\n"
                    "  - {name: alpha, priority: 100}\n  - {name: beta, priority: 300}\n")
    await until(lambda: reloads.labels("applied")._value.get() == 1, what="policy reloaded")
    assert stack.picker.policy.klass("beta").priority == 300
    # an invalid policy is rejected and the current one kept
    path.write_text("slotsPerEndpoint: 0\n")
    await until(lambda: reloads.labels("invalid")._value.get() == 1, what="invalid policy noticed")
    assert stack.picker.policy.klass("beta").priority == 300
    assert len(stack.picker.dispatcher.queues) == 4
    up.unblock()
    assert all(s == 200 for s, _, _ in await asyncio.gather(*tasks))
    assert [r.request_id for r in up.received[1:]] == ["B1", "B2", "A1", "A2"]


async def test_reserved_slot_dispatches_a_non_preemptible_chunk_past_a_preemptible_backlog(gateway_stack, upstreams):
    (up,) = await upstreams(1)
    policy = SchedulingPolicySpec(
        slots_per_endpoint=3, reserved_slots_per_endpoint=1,
        priority_classes=[PriorityClass(name="interactive", priority=200, preemptible=False),
                          PriorityClass(name="batch", priority=100)])
    stack = await gateway_stack(endpoints=[up.address], policy=policy, preemption=False)  # the reserve alone
    d = stack.picker.dispatcher

    def make_chunk(klass: str, rid: str, index: int = 1) -> dict[str, str]:
        return stack.chunk_headers(priority_class=klass, request_id=rid, chunk_index=index, kv_holder=up.address,
                                   slice=1)

    granted: list[str] = []  # the dispatcher's grant order (arrival order at the upstream may interleave)
    on_dispatch = d.metrics.on_dispatch
    d.metrics.on_dispatch = lambda c, *rest: (granted.append(c.request_id), on_dispatch(c, *rest))[1]
    up.block()
    tasks = [asyncio.create_task(stack.post(headers=make_chunk("batch", f"B{i}"))) for i in range(2)]
    await until(lambda: len(up.received) == 2, what="batch fills slots - reserved")
    tasks += [asyncio.create_task(stack.post(headers=make_chunk("batch", f"Q{i}"))) for i in range(3)]
    await until(lambda: len(d.queues) == 3, what="batch backlog queued")
    assert len(up.received) == 2  # a free slot, but it is reserved
    # a non-preemptible request's first chunk goes straight into the reserved slot
    tasks.append(asyncio.create_task(stack.post(headers=make_chunk("interactive", "I", index=0))))
    await until(lambda: len(up.received) == 3, what="interactive dispatched into the reserve")
    assert up.received[2].request_id == "I" and len(d.queues) == 3
    assert stack.picker.datastore.get(up.address).granted == 3
    # its continuation, with every slot busy, waits -- and is the first chunk granted when one frees
    tasks.append(asyncio.create_task(stack.post(headers=make_chunk("interactive", "I"))))
    await until(lambda: len(d.queues) == 4, what="continuation queued")
    up.unblock()
    assert all(s == 200 for s, _, _ in await asyncio.gather(*tasks))
    assert granted == ["B0", "B1", "I", "I", "Q0", "Q1", "Q2"]
    assert sorted(r.request_id for r in up.received) == sorted(granted)


@pytest.mark.parametrize("preemption", [True, False])
async def test_a_queued_high_priority_chunk_cuts_one_chunk_on_the_right_worker_and_gets_its_slot(
        gateway_stack, upstreams, preemption):
    """Two workers, each slot held by a low chunk; a high chunk bound to B must cut B's chunk only.

    The workers are recording upstreams that act on a signed cut as a worker sidecar does (end that
    chunk's response at once): the picker's side of preemption is what is under test here.
    """
    a, b = await upstreams(2)
    policy = SchedulingPolicySpec(slots_per_endpoint=1, priority_classes=[
        PriorityClass(name="high", priority=200), PriorityClass(name="low", priority=100)])
    stack = await gateway_stack(endpoints=[a.address, b.address], policy=policy, preemption=preemption,
                                prefill_tokens_per_second=1.0)  # recomputing a prefix elsewhere never pays
    for up in (a, b):
        up.key = stack.key
        up.block()

    def chunk(klass: str, rid: str, holder: str, index: int = 1) -> dict[str, str]:
        return stack.chunk_headers(priority_class=klass, request_id=rid, chunk_index=index, kv_holder=holder,
                                   prompt_tokens=100, slice=8)

    low = [asyncio.create_task(stack.post(headers=chunk("low", f"L{up.address}", up.address))) for up in (a, b)]
    await until(lambda: len(a.received) == 1 and len(b.received) == 1, what="both slots held by low chunks")
    high = asyncio.create_task(stack.post(headers=chunk("high", "H", b.address)))
    if not preemption:  # without cuts the high chunk waits for B's slice end: this test's assertions fail
        await until(lambda: len(stack.picker.dispatcher.queues) == 1, what="high chunk queued")
        assert b.cuts == [] and len(b.received) == 1
        b.unblock()
        await until(lambda: [r.request_id for r in b.received] == [f"L{b.address}", "H"], what="high after low")
        a.unblock()
        await asyncio.gather(*low, high)
        return
    await until(lambda: [r.request_id for r in b.received] == [f"L{b.address}", "H"], what="high chunk on B")
    assert [(c.request_id, c.chunk_index, c.reason) for c in b.cuts] == [(f"L{b.address}", 1, "priority")]
    assert a.cuts == []
    status, _, body = await low[1]
    assert status == 200 and body.count(b"data: {") == 1  # the cut chunk ended cleanly with what it had
    # the victim's continuation finds B's slot taken by the high chunk: it waits, no second cut
    cont = asyncio.create_task(stack.post(headers=chunk("low", f"L{b.address}", b.address, index=2)))
    await until(lambda: len(stack.picker.dispatcher.queues) == 1, what="continuation queued")
    assert len(b.received) == 2 and len(b.cuts) == 1
    assert stack.picker.metrics.preemptions.labels("priority", "low")._value.get() == 1
    for up in (a, b):
        up.unblock()
    await asyncio.gather(*low, high, cont)
    assert [r.request_id for r in b.received] == [f"L{b.address}", "H", f"L{b.address}"]


async def test_a_long_slice_is_cut_for_another_tenant_after_its_quantum(gateway_stack, upstreams):
    """Long slices: tenant A's one-chunk request holds the slot; tenant B's chunk arrives; once A's slice ran
    its quantum (50 ms here: no decode rate observed yet) the picker cuts it, and B runs."""
    (up,) = await upstreams(1)
    policy = SchedulingPolicySpec(slots_per_endpoint=1, chunk_size=8, priority_classes=[
        PriorityClass(name="batch", priority=1)], tenants=[Tenant(name="a"), Tenant(name="b")])
    stack = await gateway_stack(endpoints=[up.address], policy=policy, default_chunk_seconds=0.05)  # long: default
    up.key = stack.key
    up.block()

    def chunk(tenant: str, rid: str) -> dict[str, str]:
        return stack.chunk_headers(tenant=tenant, priority_class="batch", request_id=rid, chunk_index=1,
                                   kv_holder=up.address, slice=4096)

    first = asyncio.create_task(stack.post(headers=chunk("a", "A")))
    await until(lambda: len(up.received) == 1, what="A holds the slot")
    second = asyncio.create_task(stack.post(headers=chunk("b", "B")))
    await until(lambda: [r.request_id for r in up.received] == ["A", "B"], what="B runs after a cut")
    assert [(c.request_id, c.reason) for c in up.cuts] == [("A", "fair_share")]
    status, _, body = await first
    assert status == 200 and body.count(b"data: {") == 1
    up.unblock()
    assert (await second)[0] == 200


async def test_a_long_slice_is_charged_while_it_runs_and_cut_once_its_tenant_is_ahead(gateway_stack, upstreams):
    """Issue 12's fairness gap: tenant B was served 48 tokens, then tenant A's long slice takes the slot and B
    waits.  A's slice is charged one quantum (8) at grant; only charging it as it runs shows that A overtook
    B, so B's waiter cuts it.  Without that, A's counter stays behind B's and B waits for A's whole slice."""
    (up,) = await upstreams(1)
    policy = SchedulingPolicySpec(slots_per_endpoint=1, chunk_size=8, priority_classes=[
        PriorityClass(name="batch", priority=1)], tenants=[Tenant(name="a"), Tenant(name="b")])
    stack = await gateway_stack(endpoints=[up.address], policy=policy, default_chunk_seconds=0.05)  # long: default
    up.key = stack.key

    def chunk(tenant: str, rid: str, index: int, generated: int, slice: int) -> dict[str, str]:
        return stack.chunk_headers(tenant=tenant, priority_class="batch", request_id=rid, chunk_index=index,
                                   kv_holder=up.address, generated=generated, slice=slice)

    status, _, body = await stack.post(headers=chunk("b", "B", 1, 0, 48))  # B's slice: 48 tokens
    assert status == 200 and body.count(b"data: {") == 48
    up.block()
    first = asyncio.create_task(stack.post(headers=chunk("a", "A", 1, 0, 4096)))
    await until(lambda: len(up.received) == 2, what="A holds the slot")
    ledger = stack.picker.dispatcher.ledger
    second = asyncio.create_task(stack.post(headers=chunk("b", "B", 2, 48, 4096)))  # says B's slice made 48
    await until(lambda: [r.request_id for r in up.received] == ["B", "A", "B"], what="B runs after a cut")
    assert [(c.request_id, c.reason) for c in up.cuts] == [("A", "fair_share")]
    assert ledger.counters.get("batch", "a") >= ledger.counters.get("batch", "b") - 2 * 8  # A had overtaken B
    assert (await first)[0] == 200
    up.unblock()
    assert (await second)[0] == 200
