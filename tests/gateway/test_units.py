"""Fast unit tests of the flow-control and scheduling layers (no Envoy, no network)."""

from __future__ import annotations

import asyncio

import pytest

from tokenslice_picker.datastore.endpoints import Datastore, Endpoint, parse_endpoints
from tokenslice_picker.datastore.scraper import parse_vllm_metrics
from tokenslice_picker.dispatcher import Dispatcher
from tokenslice_picker.envoy import bootstrap_config
from tokenslice_picker.flowcontrol.chunk import Chunk, NoEndpoints, Shed
from tokenslice_picker.flowcontrol.fairness import VirtualCounters, jain_index
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.flowcontrol.queues import FlowQueues
from tokenslice_picker.metrics import GatewayMetrics
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.filters import kv_holder_filter, subset_hint_filter
from tokenslice_picker.scheduling.profile import default_profile
from tokenslice import contract
from tokenslice.policy import PriorityClass, QueueLimits, SchedulingPolicySpec, Tenant

TWO_CLASSES = SchedulingPolicySpec(
    priority_classes=[PriorityClass(name="hi", priority=10, starvation_seconds=5),
                      PriorityClass(name="lo", priority=1, starvation_seconds=5),
                      PriorityClass(name="rt", priority=5, preemptible=False)],
    tenants=[Tenant(name="a", weight=2), Tenant(name="b", weight=1)])


def _order(q: FlowQueues, now: float) -> list[str]:
    return [c.request_id for c in q.in_order(now)]


def test_order_is_priority_then_fair_share_then_fifo():
    q = FlowQueues(TWO_CLASSES)
    for rid, klass, tenant in [("lo1", "lo", "a"), ("hi-b1", "hi", "b"), ("hi-a1", "hi", "a"), ("hi-b2", "hi", "b")]:
        q.push(Chunk(rid, tenant, klass, index=1), now=0.0, active_tenants=set())
    q.counters.charge("hi", "b", 10, 1)  # b has been served more
    assert _order(q, 1.0) == ["hi-a1", "hi-b1", "hi-b2", "lo1"]


def test_aged_chunks_and_non_preemptible_continuations_go_first():
    q = FlowQueues(TWO_CLASSES)
    q.push(Chunk("lo-old", "a", "lo", index=1), now=0.0, active_tenants=set())
    q.push(Chunk("hi", "a", "hi", index=1), now=4.0, active_tenants=set())
    q.push(Chunk("rt-first", "a", "rt", index=0), now=4.5, active_tenants=set())
    q.push(Chunk("rt-cont", "a", "rt", index=3), now=4.6, active_tenants=set())
    assert _order(q, 4.9) == ["rt-cont", "hi", "rt-first", "lo-old"]
    assert _order(q, 5.1) == ["lo-old", "rt-cont", "hi", "rt-first"]  # lo-old waited > 5 s


def test_vtc_weighted_service_and_no_banked_credit():
    vtc = VirtualCounters()
    served = {"a": 0, "b": 0}
    for _ in range(300):  # both backlogged: always serve the smaller counter, 10 tokens a time
        t = min(("a", "b"), key=lambda t: (vtc.get("c", t), t))
        vtc.charge("c", t, 10, {"a": 2, "b": 1}[t])
        served[t] += 10
    assert abs(served["a"] / served["b"] - 2) < 0.05
    # c was idle the whole time: it returns at the floor of the active tenants, not at 0
    vtc.lift("c", "c", ["a", "b"])
    assert vtc.get("c", "c") == min(vtc.get("c", "a"), vtc.get("c", "b"))


def test_queue_lift_only_for_a_tenant_returning_from_idle():
    q = FlowQueues(TWO_CLASSES)
    q.counters.charge("hi", "a", 100, 1)
    q.push(Chunk("b1", "b", "hi", index=1), now=0, active_tenants={"a"})
    assert q.counters.get("hi", "b") == 100  # lifted to the active tenant's counter
    q.counters.charge("hi", "a", 100, 1)
    q.remove(next(iter(q.in_order(0))))
    q.push(Chunk("b2", "b", "hi", index=2), now=0, active_tenants={"a", "b"})  # b only between chunks
    assert q.counters.get("hi", "b") == 100


def test_queue_bounds_shed_first_chunks_only():
    policy = TWO_CLASSES.model_copy(update={"queue": QueueLimits(max_queued_chunks=2, max_queued_per_tenant=1)})
    q = FlowQueues(policy)
    q.push(Chunk("a0", "a", "hi"), 0, set())
    with pytest.raises(Shed) as exc:
        q.push(Chunk("a1", "a", "hi"), 0, set())
    assert exc.value.reason == "tenant_queue_full"
    q.push(Chunk("b0", "b", "hi"), 0, set())
    with pytest.raises(Shed):
        q.push(Chunk("c0", "c", "hi"), 0, set())
    q.push(Chunk("a-cont", "a", "hi", index=4), 0, set())  # a continuation is never shed
    assert len(q) == 3


def test_policy_swap_keeps_queued_chunks_of_a_removed_class():
    q = FlowQueues(TWO_CLASSES)
    q.push(Chunk("x", "a", "hi", index=1), 0, set())
    q.push(Chunk("y", "a", "lo", index=1), 0, set())
    q.set_policy(SchedulingPolicySpec(priority_classes=[PriorityClass(name="lo", priority=1)]))
    assert sorted(_order(q, 0)) == ["x", "y"] and len(q) == 2


def test_cost_model():
    m = CostModel(prefill_tokens_per_second=1000)
    assert m.recompute_seconds(500, 500) == 1.0
    assert m.expected_wait(ahead=0, slots=4, mean_chunk_s=0.5) == 0.5
    assert m.expected_wait(ahead=9, slots=4, mean_chunk_s=0.5) == 1.5
    assert m.should_migrate(prompt_tokens=100, generated=0, ahead=0, slots=1, mean_chunk_s=0.5)
    assert not m.should_migrate(prompt_tokens=1000, generated=0, ahead=0, slots=1, mean_chunk_s=0.5)


def test_kv_holder_filter_waits_or_migrates():
    holder, idle = Endpoint("10.0.0.1:80", granted=2), Endpoint("10.0.0.2:80")
    chunk = Chunk("r", "a", "hi", index=2, kv_holder=holder.address, prompt_tokens=100)
    slow = PickContext(chunk, slots=2, cost_model=CostModel(1.0))
    assert kv_holder_filter(slow, [holder, idle]) == []  # recompute 100 s > wait 1 s: wait
    fast = PickContext(chunk, slots=2, cost_model=CostModel(1e6))
    assert kv_holder_filter(fast, [holder, idle]) == [idle] and fast.migrating
    holder.granted = 1
    assert kv_holder_filter(slow, [holder, idle]) == [holder]
    gone = Chunk("r", "a", "hi", index=2, kv_holder="10.9.9.9:1")
    assert kv_holder_filter(PickContext(gone, 2, CostModel()), [holder, idle]) == [holder, idle]


def test_subset_filter_and_profile_prefers_prefix_and_low_load():
    a, b, c = Endpoint("10.0.0.1:80"), Endpoint("10.0.0.2:80", granted=3), Endpoint("10.0.0.3:80")
    prof = default_profile()
    chunk = Chunk("r", "t", "hi", subset=frozenset({b.address, c.address}))
    assert subset_hint_filter(PickContext(chunk, 8, CostModel()), [a, b, c]) == [b, c]
    # prefix affinity outweighs a little load
    prof.prefix_scorer.record(("h1", "h2"), b.address)
    warm = Chunk("r2", "t", "hi", prefix_hashes=("h1", "h2", "h3"))
    assert prof.pick(PickContext(warm, 8, CostModel()), [a, b, c]).endpoint is b
    # no affinity: least loaded
    b.granted, a.granted = 0, 5
    cold = Chunk("r3", "t", "hi")
    assert prof.pick(PickContext(cold, 8, CostModel()), [a, b]).endpoint is b


def test_limits_concurrency_and_token_rate():
    policy = SchedulingPolicySpec(tenants=[Tenant(name="t", max_concurrency=1, tokens_per_second=100)])
    lim = TenantLimits()
    assert lim.check(policy, "t", now=0) is None
    lim.opened("t")
    assert "concurrency" in lim.check(policy, "t", now=0)
    lim.closed("t")
    lim.spend(policy.tenant("t"), 250, now=0)  # 100 - 250 = -150 tokens of debt
    assert "token rate" in lim.check(policy, "t", now=1.0)
    assert lim.check(policy, "t", now=2.0) is None


def test_jain_index():
    assert jain_index([1, 1, 1]) == 1.0
    assert jain_index([1, 0, 0]) == 1.0  # idle tenants are not counted
    assert abs(jain_index([3, 1]) - 0.8) < 1e-9


def test_parse_endpoints_and_metrics():
    assert parse_endpoints("127.0.0.1:80, localhost:81,127.0.0.1:80") == ["127.0.0.1:80", "127.0.0.1:81"]
    for bad in ("host:80", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:http"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    text = ('# HELP x\nvllm:num_requests_running{model_name="m",engine="0"} 3.0\n'
            'vllm:num_requests_running{model_name="m",engine="1"} 2.0\nvllm:num_requests_waiting 4\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.25\nvllm:prefix_cache_hits_total{a="b"} 10\n'
            'vllm:prefix_cache_queries_total 40\nother_metric 1\n')
    assert parse_vllm_metrics(text) == {"running": 5.0, "waiting": 4.0, "kv_usage": 0.25, "prefix_hits": 10.0,
                                        "prefix_queries": 40.0}


async def test_dispatcher_slots_cancel_and_reconcile():
    ds = Datastore(["10.0.0.1:80"])
    d = Dispatcher(SchedulingPolicySpec(slots_per_endpoint=1), ds, GatewayMetrics())
    first = Chunk("r1", "t", "standard", index=1, slice=32, generated=0)
    ep = await d.acquire(first)
    assert ep.granted == 1
    waiting = asyncio.ensure_future(d.acquire(Chunk("r2", "t", "standard", index=1, slice=4)))
    await asyncio.sleep(0)  # let it queue (one loop turn, no timing involved)
    assert len(d.queues) == 1
    waiting.cancel()  # its caller went away: it leaves the queue, nothing leaks
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(d.queues) == 0
    d.release(first, None)
    assert ep.granted == 0
    before = d.queues.counters.get("standard", "t")
    # the next chunk of r1 reports generated=10: chunk 1 produced 10, not 32 -> the counter is corrected
    nxt = Chunk("r1", "t", "standard", index=2, slice=32, generated=10, kv_holder=ep.address)
    await d.acquire(nxt)
    assert d.queues.counters.get("standard", "t") == pytest.approx(before + 2 * (10 - 32) + 2 * 32)
    ds.set_endpoints([])
    with pytest.raises(NoEndpoints):
        await d.acquire(Chunk("r3", "t", "standard"))


def test_bootstrap_has_the_protocol_pieces():
    cfg = bootstrap_config(listen_port=1, ext_proc_port=2, admin_port=3)
    text = str(cfg)
    assert contract.DESTINATION_ENDPOINT in text and "ORIGINAL_DST" in text
    ext = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    mode = ext["typed_config"]["processing_mode"]
    assert mode["request_header_mode"] == "SEND" and mode["request_body_mode"] == "NONE"
    assert mode["response_trailer_mode"] == "SEND"  # keeps the stream open until the chunk ends
    assert ext["typed_config"]["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]


def test_policy_file_follows_a_configmap_symlink_swap(tmp_path):
    """Kubelet updates a mounted ConfigMap by swapping the ``..data`` symlink to a new directory."""
    import os

    from tokenslice_picker.policy_source import PolicyFile

    def version(name: str, chunk: int) -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "policy.yaml").write_text(f"chunkSize: {chunk}\n")
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(name)
        os.replace(tmp_link, tmp_path / "..data")  # atomic, like the kubelet

    version("..v1", 16)
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    applied: list[int] = []
    results: list[str] = []
    pf = PolicyFile(tmp_path / "policy.yaml", lambda p: applied.append(p.chunk_size), results.append)
    assert pf.load().chunk_size == 16
    assert not pf.check()  # unchanged
    version("..v2", 64)
    assert pf.check() and applied == [64] and results == ["applied"]
    version("..v3", 0)  # invalid: kept the previous policy
    assert not pf.check() and applied == [64] and results == ["applied", "invalid"]


async def test_dispatcher_drains_a_large_backlog_in_priority_then_fair_order():
    ds = Datastore(["10.0.0.1:80", "10.0.0.2:80"])
    policy = SchedulingPolicySpec(slots_per_endpoint=2, priority_classes=[
        PriorityClass(name="hi", priority=10), PriorityClass(name="lo", priority=1)],
        tenants=[Tenant(name="a", weight=3), Tenant(name="b", weight=1)])
    d = Dispatcher(policy, ds, GatewayMetrics())
    held = []
    for i in range(4):  # fill every slot
        c = Chunk(f"fill{i}", "a", "hi", index=1, slice=1)
        await d.acquire(c)
        held.append(c)
    served: list[Chunk] = []

    async def one(c: Chunk) -> None:
        await d.acquire(c)
        served.append(c)

    backlog = [Chunk(f"lo{i}", "ab"[i % 2], "lo", index=1, slice=4) for i in range(1000)]
    backlog += [Chunk(f"hi{i}", "ab"[i % 2], "hi", index=1, slice=4) for i in range(1000)]
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
    order = [c.klass for c in served]
    assert order == ["hi"] * 1000 + ["lo"] * 1000
    # inside each class the 3:1 weights hold while both tenants are backlogged
    first_hi = [c.tenant for c in served[:1000]][:600]
    assert abs(first_hi.count("a") / len(first_hi) - 0.75) < 0.02


async def test_reserved_slots_are_for_non_preemptible_classes_only():
    ds = Datastore(["10.0.0.1:80"])
    policy = SchedulingPolicySpec(slots_per_endpoint=3, reserved_slots_per_endpoint=1, priority_classes=[
        PriorityClass(name="rt", priority=5, preemptible=False), PriorityClass(name="lo", priority=1)])
    d = Dispatcher(policy, ds, GatewayMetrics())
    (ep,) = ds.endpoints()
    order: list[str] = []

    async def run(c: Chunk) -> Chunk:
        await d.acquire(c)
        order.append(c.request_id)
        return c

    async def settle() -> None:
        for _ in range(5):  # loop turns, not time: let woken acquirers record themselves
            await asyncio.sleep(0)

    lo = [await run(Chunk(f"lo{i}", "t", "lo", index=1, slice=4)) for i in range(2)]  # fills slots - reserved
    backlog = [asyncio.ensure_future(run(Chunk(f"lo{i}", "t", "lo", index=1, slice=4))) for i in (2, 3)]
    await settle()
    assert ep.granted == 2 and len(d.queues) == 2  # preemptible work may not take the reserved slot
    rt0 = await run(Chunk("rt0", "t", "rt", index=0, slice=4))  # non-preemptible first chunk: at once
    assert ep.granted == 3 and len(d.queues) == 2
    rt1 = asyncio.ensure_future(run(Chunk("rt1", "t", "rt", index=1, slice=4)))  # now every slot is busy
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
    m = GatewayMetrics()
    d = Dispatcher(policy, ds, m)
    big = Chunk("r1", "t", "small", index=1, slice=100)
    await d.acquire(big)
    assert big.slice == 8 and d.queues.counters.get("small", "t") == pytest.approx(2 * 8)
    assert m.slices_capped.labels("small")._value.get() == 1
    # the next chunk reports what really came out (100): the charge is corrected to it
    d.release(big, None)
    await d.acquire(Chunk("r1", "t", "small", index=2, slice=8, generated=100, kv_holder="10.0.0.1:80"))
    assert d.queues.counters.get("small", "t") == pytest.approx(2 * 100 + 2 * 8)
    fits = Chunk("r2", "t", "std", index=1, slice=32)  # the policy's chunk size for a class without one
    await d.acquire(fits)
    assert fits.slice == 32 and m.slices_capped.labels("std")._value.get() == 0
