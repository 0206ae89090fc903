"""The dispatcher: a chunk waits here, inside its ext_proc call, until it is granted an endpoint slot.

It joins the layers: flow control decides *which* waiting chunk goes next, the scheduling profile
decides *where*, the datastore knows the pool.  Everything runs on the event loop; no locks.

Slots: an endpoint runs at most ``slotsPerEndpoint`` chunks; the top ``reservedSlotsPerEndpoint`` of
them only take chunks of non-preemptible classes, so such a chunk never waits for a chunk boundary
among preemptible work (``_ClassRule.slots``).

Invariant: after every dispatch pass no queued chunk can be placed.  So an arriving chunk that
can be placed right away may go at once (the fast path, O(filters)); a pass over the queue runs
only when a slot frees, the pool changes, the policy changes, or an arrival must wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tokenslice_picker.datastore.endpoints import Datastore, Endpoint
from tokenslice_picker.flowcontrol.chunk import Chunk, NoEndpoints, Shed
from tokenslice_picker.flowcontrol.fairness import ServiceWindow, jain_index
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.flowcontrol.queues import FlowQueues
from tokenslice_picker.metrics import GatewayMetrics
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.filters import subset_hint_filter
from tokenslice_picker.scheduling.profile import SchedulerProfile, default_profile
from tokenslice.policy import SchedulingPolicySpec

log = logging.getLogger("tokenslice_picker.dispatcher")


@dataclass(slots=True)
class _Ledger:
    """What the last chunk of a request was charged, to correct it when the next chunk reports."""

    klass: str
    tenant: str
    generated: int
    charged_output: int


@dataclass(frozen=True, slots=True)
class _ClassRule:
    """What the policy allows one class, resolved once per policy (a dict lookup on the hot path)."""

    slots: int
    """Slots of an endpoint its chunks may fill (``slotsPerEndpoint`` minus the reserve if preemptible)."""
    chunk_size: int
    """The slice the gateway accounts a chunk at most (the driver was admitted with this size)."""


def _class_rules(policy: SchedulingPolicySpec) -> dict[str, _ClassRule]:
    return {c.name: _ClassRule(policy.class_slots(c), policy.class_chunk_size(c)) for c in policy.priority_classes}


class Dispatcher:
    def __init__(self, policy: SchedulingPolicySpec, datastore: Datastore, metrics: GatewayMetrics, *,
                 cost_model: CostModel | None = None, profile: SchedulerProfile | None = None,
                 idle_grace_s: float = 2.0, ledger_size: int = 100_000) -> None:
        self.queues = FlowQueues(policy)
        self._rules = _class_rules(policy)
        self.datastore = datastore
        self.metrics = metrics
        self.cost_model = cost_model or CostModel()
        self.profile = profile or default_profile()
        self.limits = TenantLimits()
        self.window = ServiceWindow()
        self.idle_grace_s = idle_grace_s
        self._inflight: dict[tuple[str, str], int] = {}
        self._last_active: dict[tuple[str, str], float] = {}
        self._ledger: OrderedDict[str, _Ledger] = OrderedDict()
        self._ledger_size = ledger_size
        self._ttl_handles: dict[int, asyncio.TimerHandle] = {}
        self.migrations = 0
        self.release_listeners: list[Callable[[Chunk, float], None]] = []
        """Called with (chunk, monotonic time) when a chunk ends; benchmarks measure notification latency."""
        datastore.on_change(self._pool_changed)

    @property
    def policy(self) -> SchedulingPolicySpec:
        return self.queues.policy

    def set_policy(self, policy: SchedulingPolicySpec) -> None:
        """Hot reload: queued chunks stay queued and are re-ordered under the new policy."""
        self.queues.set_policy(policy)
        self._rules = _class_rules(policy)
        self.dispatch()

    # --- chunk lifecycle ----------------------------------------------------------
    async def acquire(self, chunk: Chunk) -> Endpoint:
        """Wait for a slot; return the endpoint granted. Raises Shed (429) or NoEndpoints (503)."""
        now = time.monotonic()
        rule = self._rule(chunk.klass)
        if chunk.slice > rule.chunk_size:
            self._cap_slice(chunk, rule)
        self._reconcile(chunk)
        candidates = self._candidates(chunk)
        if not candidates:
            raise NoEndpoints("no ready endpoint in the pool" if chunk.subset is None
                              else "no ready endpoint in the pool matches the subset hint")
        if not chunk.kv_holder or self._holder_free(chunk.kv_holder, rule.slots):
            decision = self.profile.pick(self._ctx(chunk, 0, rule.slots), candidates)
            if decision.endpoint is not None:
                chunk.enqueued_at = now
                return self._grant(chunk, decision.endpoint, decision.migrated, now)
        loop = asyncio.get_running_loop()
        chunk.future = loop.create_future()
        self.queues.push(chunk, now, self._active_tenants(chunk.klass, now))
        chunk.waited = True
        if chunk.index == 0:
            self._ttl_handles[id(chunk)] = loop.call_later(self.policy.queue.queue_ttl_seconds,
                                                          self._expire, chunk)
        self.dispatch()
        try:
            address = await chunk.future
        except asyncio.CancelledError:
            if self.queues.remove(chunk):
                self._cancel_ttl(chunk)
            elif chunk.endpoint:  # granted in the same tick the caller went away
                self.release(chunk, None)
            raise
        ep = self.datastore.get(address)
        if ep is None or ep is not chunk.granted_on:  # left the pool between grant and wake-up
            self.release(chunk, None)
            raise NoEndpoints(f"endpoint {address} left the pool")
        return ep

    def release(self, chunk: Chunk, produced: int | None) -> None:
        """The chunk ended (its ext_proc stream closed): free the slot, learn its duration."""
        if not chunk.endpoint:
            return
        now = time.monotonic()
        ep = chunk.granted_on  # the object granted, even if its address left (and came back) meanwhile
        if ep is not None and ep.granted > 0:
            ep.granted -= 1
            ep.observe_chunk(now - chunk.dispatched_at)
        self.metrics.chunk_seconds.observe(self.metrics.chunk_series, now - chunk.dispatched_at)
        key = (self.queues.klass(chunk.klass).name, chunk.tenant)
        n = self._inflight.get(key, 1) - 1
        if n > 0:
            self._inflight[key] = n
        else:
            self._inflight.pop(key, None)
        self._last_active[key] = now
        if produced is not None and produced != chunk.charged_output:
            self._correct(chunk.klass, chunk.tenant, produced - chunk.charged_output)
            ledger = self._ledger.get(chunk.request_id)
            if ledger is not None:
                ledger.charged_output = produced
        chunk.endpoint = ""
        chunk.granted_on = None
        for listener in self.release_listeners:
            listener(chunk, now)
        self.dispatch()

    # --- client requests (admission) ------------------------------------------------
    def admit(self, chunk: Chunk) -> Endpoint:
        """Pick the driver sidecar for a client request (no slot). Raises Shed / NoEndpoints."""
        candidates = self._candidates(chunk)
        if not candidates:
            raise NoEndpoints("no ready endpoint in the pool")
        limits = self.policy.queue
        if len(self.queues) >= limits.max_queued_chunks:
            raise Shed("queue_full", f"the gateway queue is full ({limits.max_queued_chunks} chunks)")
        why = self.limits.check(self.policy, chunk.tenant)
        if why:
            raise Shed("tenant_limit", why)
        decision = self.profile.pick(PickContext(chunk, self.policy.slots_per_endpoint, self.cost_model,
                                                 admission=True), candidates)
        assert decision.endpoint is not None
        self.profile.driver_scorer.record(chunk.request_id, decision.endpoint.address)
        self.limits.opened(chunk.tenant)
        return decision.endpoint

    def admitted_done(self, chunk: Chunk) -> None:
        self.limits.closed(chunk.tenant)
        self.profile.driver_scorer.forget(chunk.request_id)
        self._ledger.pop(chunk.request_id, None)

    # --- the dispatch pass ------------------------------------------------------------
    def dispatch(self) -> None:
        """Grant queued chunks while some endpoint has a free slot and some queued chunk fits one."""
        if not self.queues.total:
            return
        policy = self.policy
        slots = policy.slots_per_endpoint
        floor = slots - policy.reserved_slots_per_endpoint  # preemptible chunks fill only this many
        while self.queues.total:
            members = self.datastore.endpoints()
            if not any(e.granted < slots for e in members):
                return
            open_to_all = any(e.granted < floor for e in members)
            if not open_to_all and not self.queues.any_non_preemptible():
                return  # only reserved slots are free, and no chunk that may use them is queued
            busy = {e.address: e for e in members if e.granted >= floor}
            now = time.monotonic()
            ahead: dict[str, int] = {}
            placed = False
            for chunk in self.queues.in_order(now):
                limit = self._rule(chunk.klass).slots
                if limit < slots and not open_to_all:
                    continue  # preemptible, and only reserved slots are free
                holder = chunk.kv_holder
                held = busy.get(holder)
                if held is not None and held.granted >= limit and chunk.subset is None and not self._may_migrate(
                        chunk, held, ahead.get(holder, 0), limit):
                    ahead[holder] = ahead.get(holder, 0) + 1  # the cheap common skip: paused for its holder
                    continue
                candidates = self._candidates(chunk)
                if not candidates:
                    self._fail(chunk, NoEndpoints("no ready endpoint in the pool matches this chunk"))
                    placed = True
                    break
                decision = self.profile.pick(self._ctx(chunk, ahead.get(holder, 0), limit), candidates)
                if decision.endpoint is not None:
                    self.queues.remove(chunk)
                    self._cancel_ttl(chunk)
                    self._grant(chunk, decision.endpoint, decision.migrated, now)
                    assert chunk.future is not None
                    if not chunk.future.done():
                        chunk.future.set_result(decision.endpoint.address)
                    placed = True
                    break
                if holder:
                    ahead[holder] = ahead.get(holder, 0) + 1
            if not placed:
                return

    # --- internals ----------------------------------------------------------------
    def _may_migrate(self, chunk: Chunk, holder: Endpoint, ahead: int, slots: int) -> bool:
        return self.cost_model.should_migrate(prompt_tokens=chunk.prompt_tokens, generated=chunk.generated,
                                              ahead=ahead, slots=slots, mean_chunk_s=holder.mean_chunk_s)

    def _rule(self, klass: str) -> _ClassRule:
        rule = self._rules.get(klass)
        return rule if rule is not None else self._rules[self.queues.klass(klass).name]

    def _cap_slice(self, chunk: Chunk, rule: _ClassRule) -> None:
        """Account a slice larger than the class's chunk size at the chunk size.

        Not a 400: a driver keeps the size it was admitted with, so after a hot reload that shrank
        ``chunkSize`` its in-flight requests legitimately claim the old size, and a request that
        reached a driver without the gateway's admission uses the sidecar's ``--chunk-size`` -- a
        deployment matter, not the client's fault.  The next chunk's signed ``generated`` corrects
        the charge to what was really produced.
        """
        chunk.slice = rule.chunk_size
        self.metrics.slices_capped.labels(self.queues.klass(chunk.klass).name).inc()

    def _ctx(self, chunk: Chunk, ahead: int, slots: int) -> PickContext:
        return PickContext(chunk, slots, self.cost_model, ahead_on_holder=ahead)

    def _candidates(self, chunk: Chunk) -> list[Endpoint]:
        members = self.datastore.endpoints()
        if chunk.subset is None:
            return members
        return subset_hint_filter(PickContext(chunk, self.policy.slots_per_endpoint, self.cost_model), members)

    def _holder_free(self, address: str, limit: int) -> bool:
        ep = self.datastore.get(address)
        return ep is None or ep.granted < limit

    def _grant(self, chunk: Chunk, ep: Endpoint, migrated: bool, now: float) -> Endpoint:
        ep.granted += 1
        chunk.endpoint = ep.address
        chunk.granted_on = ep
        chunk.dispatched_at = now
        chunk.migrated = migrated
        queues = self.queues
        klass = queues.klass(chunk.klass).name
        tenant = chunk.tenant
        key = (klass, tenant)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        self._last_active[key] = now
        fairness = queues.policy.fairness
        # Input is charged when the prefix is (re)computed: chunk 0, or a chunk that lost its KV cache.
        recompute = chunk.index == 0 or (chunk.kv_holder != ep.address)
        input_tokens = (chunk.prompt_tokens + (chunk.generated if chunk.index else 0)) if recompute else 0
        chunk.charged_output = chunk.slice
        queues.charge(klass, tenant, fairness.input * input_tokens + fairness.output * chunk.slice)
        self.limits.spend(queues.tenant(tenant), input_tokens + chunk.slice)
        self.window.add(tenant, chunk.slice, now)
        self._ledger[chunk.request_id] = _Ledger(klass, chunk.tenant, chunk.generated, chunk.slice)
        if len(self._ledger) > self._ledger_size:
            self._ledger.popitem(last=False)
        if chunk.index == 0 and chunk.prefix_hashes:
            self.profile.prefix_scorer.record(chunk.prefix_hashes, ep.address)
        wait = now - chunk.enqueued_at
        self.metrics.on_dispatch(chunk, klass, wait, migrated)
        if migrated:
            self.migrations += 1
            log.info("migrated", extra={"request_id": chunk.request_id, "from": chunk.kv_holder,
                                        "to": ep.address, "chunk": chunk.index})
        return ep

    def _reconcile(self, chunk: Chunk) -> None:
        """The next chunk's signed ``generated`` tells what the previous chunk really produced."""
        if chunk.index == 0:
            return
        ledger = self._ledger.get(chunk.request_id)
        if ledger is None:
            return
        produced = chunk.generated - ledger.generated
        if produced != ledger.charged_output and produced >= 0:
            self._correct(ledger.klass, ledger.tenant, produced - ledger.charged_output)
            ledger.charged_output = produced

    def _correct(self, klass: str, tenant: str, delta_output: int) -> None:
        self.queues.counters.charge(klass, tenant, self.policy.fairness.output * delta_output,
                                    self.queues.weight(tenant))
        self.metrics.tokens_served.inc((tenant,), delta_output)
        self.window.add(tenant, delta_output)

    def _active_tenants(self, klass: str, now: float) -> set[str]:
        name = self.queues.klass(klass).name
        return {t for (k, t), n in self._inflight.items() if k == name and n > 0} | {
            t for (k, t), at in self._last_active.items() if k == name and now - at < self.idle_grace_s}

    def _expire(self, chunk: Chunk) -> None:
        self._ttl_handles.pop(id(chunk), None)
        if self.queues.remove(chunk):
            ttl = self.policy.queue.queue_ttl_seconds
            self._fail(chunk, Shed("queue_ttl", f"the request waited longer than the queue TTL ({ttl:g}s)"),
                       removed=True)

    def _fail(self, chunk: Chunk, exc: Exception, removed: bool = False) -> None:
        if not removed:
            self.queues.remove(chunk)
        self._cancel_ttl(chunk)
        if chunk.future is not None and not chunk.future.done():
            chunk.future.set_exception(exc)

    def _cancel_ttl(self, chunk: Chunk) -> None:
        handle = self._ttl_handles.pop(id(chunk), None)
        if handle is not None:
            handle.cancel()

    def _pool_changed(self) -> None:
        self.dispatch()

    # --- introspection ----------------------------------------------------------------
    def jain(self) -> float:
        served = self.window.per_tenant()
        return jain_index(v / self.queues.weight(t) for t, v in served.items())
