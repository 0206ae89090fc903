"""The victim selector: who is cut for a waiter, and who never is."""

from __future__ import annotations

from tokenslice.policy import PriorityClass, SchedulingPolicySpec
from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import Chunk, make_chunk
from tokenslice_picker.scheduling.victims import (
    FAIR_SHARE,
    PRIORITY,
    LowestClassFirst,
    VictimContext,
)

POLICY = SchedulingPolicySpec(chunk_size=16, priority_classes=[
    PriorityClass(name="hi", priority=10), PriorityClass(name="mid", priority=5, starvation_seconds=5),
    PriorityClass(name="lo", priority=1), PriorityClass(name="rt", priority=3, preemptible=False)])
EP = Endpoint("10.0.0.1:80", granted=4, tokens_per_s=16.0)  # one second per 16-token quantum


def running(rid: str, pclass: str, *, tenant: str = "a", since: float, waited: float = 0.0,
            slice: int = 16) -> Chunk:
    c = make_chunk(rid, tenant, pclass, index=1, slice=slice)
    c.granted_on, c.endpoint, c.dispatched_at, c.enqueued_at = EP, EP.address, since, since - waited
    return c


def ctx(now: float = 10.0, served: dict[str, float] | None = None) -> VictimContext:
    classes = {c.name: c for c in POLICY.priority_classes}
    return VictimContext(classes.__getitem__, lambda c: 16, lambda c, t: (served or {}).get(t, 0.0), now)


def test_lowest_class_first_then_least_work_lost_never_non_preemptible():
    sel = LowestClassFirst()
    waiter = make_chunk("w", "a", "hi", index=1)
    rt, mid = running("rt", "rt", since=9.9), running("mid", "mid", since=9.9)
    lo_old, lo_new = running("lo-old", "lo", since=1.0), running("lo-new", "lo", since=9.0)
    assert sel.select(waiter, [rt, mid, lo_old, lo_new], ctx()) == sel.select(waiter, [lo_new], ctx())
    assert sel.select(waiter, [rt, mid, lo_old, lo_new], ctx()).victim is lo_new  # lowest class, least progress
    assert sel.select(waiter, [rt], ctx()) is None  # a non-preemptible class is never cut
    assert sel.select(waiter, [rt, mid], ctx()).victim is mid
    assert sel.select(make_chunk("w", "a", "lo", index=1), [mid, lo_new], ctx()) is None  # nothing lower
    assert sel.select(waiter, [mid], ctx()).reason == PRIORITY


def test_a_chunk_granted_by_aging_runs_its_slice():
    aged = running("mid-aged", "mid", since=9.0, waited=6.0)  # waited past starvationSeconds (5 s)
    assert LowestClassFirst().select(make_chunk("w", "a", "hi", index=1), [aged], ctx()) is None


def test_fair_share_cuts_only_a_long_slice_past_its_quantum_of_a_tenant_not_behind():
    sel = LowestClassFirst()
    waiter = make_chunk("w", "b", "lo", index=1)
    long_over = running("long", "lo", tenant="a", since=8.0, slice=4096)  # ran 2 s > 1 s quantum
    assert sel.select(waiter, [long_over], ctx()).reason == FAIR_SHARE
    assert sel.select(waiter, [running("short", "lo", since=8.0, slice=16)], ctx()) is None  # ends by itself
    assert sel.select(waiter, [running("young", "lo", since=9.5, slice=4096)], ctx()) is None  # within quantum
    assert sel.select(make_chunk("w", "a", "lo", index=1), [long_over], ctx()) is None  # same tenant
    assert sel.select(waiter, [long_over], ctx(served={"a": 1.0, "b": 5.0})) is None  # a is owed more than b
    older = running("older", "lo", tenant="c", since=5.0, slice=4096)
    assert sel.select(waiter, [long_over, older], ctx()).victim is older  # the most over its quantum




def test_fair_share_waits_for_the_victims_tenant_to_lead_by_the_slack():
    """Hysteresis: a lead under the slack is no reason to cut (each cut costs a continuation)."""
    sel = LowestClassFirst()
    waiter = make_chunk("w", "b", "lo", index=1)
    long_over = running("long", "lo", tenant="a", since=8.0, slice=4096)
    classes = {c.name: c for c in POLICY.priority_classes}

    def with_slack(lead: float) -> VictimContext:
        return VictimContext(classes.__getitem__, lambda c: 16, lambda c, t: {"a": lead}.get(t, 0.0), 10.0,
                             lambda c: 512.0)

    assert sel.select(waiter, [long_over], with_slack(100.0)) is None  # ahead, but by less than the slack
    assert sel.select(waiter, [long_over], with_slack(511.9)) is None
    assert sel.select(waiter, [long_over], with_slack(512.0)).reason == FAIR_SHARE
