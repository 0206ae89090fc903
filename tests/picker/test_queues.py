"""FlowQueues: the dispatch order, the lift from idle, the queue bounds, policy swaps."""

from __future__ import annotations

import pytest

from tests.picker.helpers import TWO_CLASSES
from tokenslice.policy import PriorityClass, QueueLimits, SchedulingPolicySpec
from tokenslice_picker.flowcontrol.accounting import ServiceLedger
from tokenslice_picker.flowcontrol.chunk import Shed, make_chunk
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.flowcontrol.queues import FlowQueues
from tokenslice_picker.metrics import PickerMetrics


def queues(policy: SchedulingPolicySpec = TWO_CLASSES) -> FlowQueues:
    return FlowQueues(policy, ServiceLedger(policy, TenantLimits(), PickerMetrics()))


def _order(q: FlowQueues, now: float) -> list[str]:
    return [c.request_id for c in q.in_order(now)]


def test_order_is_priority_then_fair_share_then_fifo():
    q = queues()
    for rid, pclass, tenant in [("lo1", "lo", "a"), ("hi-b1", "hi", "b"), ("hi-a1", "hi", "a"), ("hi-b2", "hi", "b")]:
        q.push(make_chunk(rid, tenant, pclass, index=1), now=0.0)
    q.ledger.counters.charge("hi", "b", 10, 1)  # b has been served more
    assert _order(q, 1.0) == ["hi-a1", "hi-b1", "hi-b2", "lo1"]


def test_aged_chunks_and_non_preemptible_continuations_go_first():
    q = queues()
    q.push(make_chunk("lo-old", "a", "lo", index=1), now=0.0)
    q.push(make_chunk("hi", "a", "hi", index=1), now=4.0)
    q.push(make_chunk("rt-first", "a", "rt", index=0), now=4.5)
    q.push(make_chunk("rt-cont", "a", "rt", index=3), now=4.6)
    assert _order(q, 4.9) == ["rt-cont", "hi", "rt-first", "lo-old"]
    assert _order(q, 5.1) == ["lo-old", "rt-cont", "hi", "rt-first"]  # lo-old waited > 5 s


def test_queue_lift_only_for_a_tenant_returning_from_idle():
    q = queues()
    ledger = q.ledger
    ledger.counters.charge("hi", "a", 100, 1)
    a_running = make_chunk("a0", "a", "hi", index=1)
    ledger.charge_grant(a_running, "10.0.0.1:80", now=0)  # a is active: it runs a chunk
    before = ledger.counters.get("hi", "a")
    q.push(make_chunk("b1", "b", "hi", index=1), now=0)
    assert ledger.counters.get("hi", "b") == before  # lifted to the active tenant's counter
    ledger.counters.charge("hi", "a", 100, 1)
    q.remove(next(iter(q.in_order(0))))
    b_ran = make_chunk("b1", "b", "hi", index=1)
    ledger.charge_grant(b_ran, "10.0.0.1:80", now=0)
    ledger.charge_end(b_ran, None, now=0)  # b only between chunks (within the idle grace): not lifted
    lifted = ledger.counters.get("hi", "b")
    q.push(make_chunk("b2", "b", "hi", index=2), now=0.5)
    assert ledger.counters.get("hi", "b") == lifted < ledger.counters.get("hi", "a")


def test_queue_bounds_shed_first_chunks_only():
    q = queues(TWO_CLASSES.model_copy(update={"queue": QueueLimits(max_queued_chunks=2, max_queued_per_tenant=1)}))
    q.push(make_chunk("a0", "a", "hi"), 0)
    with pytest.raises(Shed) as exc:
        q.push(make_chunk("a1", "a", "hi"), 0)
    assert exc.value.reason == "tenant_queue_full"
    q.push(make_chunk("b0", "b", "hi"), 0)
    with pytest.raises(Shed):
        q.push(make_chunk("c0", "c", "hi"), 0)
    q.push(make_chunk("a-cont", "a", "hi", index=4), 0)  # a continuation is never shed
    assert len(q) == 3


def test_policy_swap_keeps_queued_chunks_of_a_removed_class():
    q = queues()
    q.push(make_chunk("x", "a", "hi", index=1), 0)
    q.push(make_chunk("y", "a", "lo", index=1), 0)
    q.set_policy(SchedulingPolicySpec(priority_classes=[PriorityClass(name="lo", priority=1)]))
    assert sorted(_order(q, 0)) == ["x", "y"] and len(q) == 2


def test_within_a_tenant_older_requests_go_first():
    q = queues()
    young = make_chunk("young", "a", "hi", index=0)
    young.born = 5.0
    q.push(young, now=5.0)
    old_cont = make_chunk("old", "a", "hi", index=3)
    old_cont.born = 1.0  # its request was first granted long ago
    q.push(old_cont, now=6.0)
    mid_cont = make_chunk("mid", "a", "hi", index=1)
    mid_cont.born = 3.0
    q.push(mid_cont, now=7.0)
    assert _order(q, 7.0) == ["old", "mid", "young"]


def test_aging_still_finds_a_chunk_queued_behind_older_requests():
    q = queues()
    waited = make_chunk("waited", "a", "lo", index=1)
    waited.born = 10.0
    q.push(waited, now=0.0)
    older = make_chunk("older", "a", "lo", index=1)
    older.born = 1.0
    q.push(older, now=4.9)  # goes ahead of it in the tenant's queue, but has not waited long
    q.push(make_chunk("hi", "b", "hi", index=1), now=4.9)
    assert _order(q, 5.1) == ["waited", "hi", "older"]  # waited > 5 s: aged to the top
