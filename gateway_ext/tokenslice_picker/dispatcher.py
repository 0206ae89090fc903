"""The dispatcher: a chunk waits here, inside its ext_proc call, until it is granted an endpoint slot.

It only sequences the parts, each of which owns its rule: flow control orders the waiting chunks
(``flowcontrol.queues``) and charges what is granted (``flowcontrol.accounting``), the scheduling
profile places a chunk (``scheduling.profile``; the wait/holder/migrate rule is
``scheduling.affinity``), the datastore knows the pool.  Everything runs on the event loop; no locks.

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
from collections.abc import Callable
from dataclasses import dataclass

from tokenslice.policy import SchedulingPolicySpec
from tokenslice_picker.datastore.endpoints import Datastore, Endpoint
from tokenslice_picker.flowcontrol.accounting import ServiceLedger
from tokenslice_picker.flowcontrol.chunk import Chunk, NoEndpoints, Shed
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.flowcontrol.queues import FlowQueues
from tokenslice_picker.metrics import EndpointState, PickerMetrics, PickerSnapshot
from tokenslice_picker.scheduling.affinity import Verdict, holder_verdict
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.profile import SchedulerProfile, default_profile

log = logging.getLogger("tokenslice_picker.dispatcher")


@dataclass(frozen=True, slots=True)
class _ClassRule:
    """What the policy allows one class, resolved once per policy (a dict lookup on the hot path)."""

    slots: int
    """Slots of an endpoint its chunks may fill (``slotsPerEndpoint`` minus the reserve if preemptible)."""
    chunk_size: int
    """The slice the picker accounts a chunk at most (the driver was admitted with this size)."""


def _class_rules(policy: SchedulingPolicySpec) -> dict[str, _ClassRule]:
    return {c.name: _ClassRule(policy.class_slots(c), policy.class_chunk_size(c)) for c in policy.priority_classes}


class Dispatcher:
    def __init__(self, policy: SchedulingPolicySpec, datastore: Datastore, metrics: PickerMetrics, *,
                 cost_model: CostModel | None = None, profile: SchedulerProfile | None = None,
                 idle_grace_s: float = 2.0, ledger_size: int = 100_000) -> None:
        self.limits = TenantLimits()
        self.ledger = ServiceLedger(policy, self.limits, metrics, idle_grace_s=idle_grace_s, ledger_size=ledger_size)
        self.queues = FlowQueues(policy, self.ledger)
        self._rules = _class_rules(policy)
        self.datastore = datastore
        self.metrics = metrics
        self.cost_model = cost_model or CostModel()
        self.profile = profile or default_profile()
        self._ttl_handles: dict[int, asyncio.TimerHandle] = {}
        self.migrations = 0
        self.release_listeners: list[Callable[[Chunk, float], None]] = []
        """Called with (chunk, monotonic time) when a chunk ends; benchmarks measure notification latency."""
        datastore.on_change(self.dispatch)

    @property
    def policy(self) -> SchedulingPolicySpec:
        return self.queues.policy

    def set_policy(self, policy: SchedulingPolicySpec) -> None:
        """Hot reload: queued chunks stay queued and are re-ordered under the new policy."""
        self.queues.set_policy(policy)
        self.ledger.set_policy(policy)
        self._rules = _class_rules(policy)
        self.dispatch()

    # --- chunk lifecycle ----------------------------------------------------------
    async def acquire(self, chunk: Chunk) -> Endpoint:
        """Wait for a slot; return the endpoint granted. Raises Shed (429) or NoEndpoints (503)."""
        now = time.monotonic()
        chunk.priority_class = self.queues.resolve_class(chunk.priority_class).name
        rule = self._rule(chunk.priority_class)
        if chunk.slice > rule.chunk_size:
            self._cap_slice(chunk, rule)
        self.ledger.reconcile(chunk)
        members = self.datastore.endpoints()
        if not members:
            raise NoEndpoints("no ready endpoint in the pool")
        holder = self.datastore.get(chunk.kv_holder) if chunk.kv_holder else None
        if holder is None or holder.granted < rule.slots:  # the fast path: no busy holder to weigh
            decision = self.profile.pick(PickContext(chunk, rule.slots, self.cost_model), members)
            if decision.endpoint is not None:
                chunk.enqueued_at = now
                return self._grant(chunk, decision.endpoint, decision.migrated, now)
        loop = asyncio.get_running_loop()
        chunk.future = loop.create_future()
        self.queues.push(chunk, now)
        chunk.waited = True
        if chunk.index == 0:
            self._ttl_handles[id(chunk)] = loop.call_later(self.policy.queue.queue_ttl_seconds, self._expire, chunk)
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
        """The chunk ended (its ext_proc stream closed): free the slot, settle its charge."""
        if not chunk.endpoint:
            return
        now = time.monotonic()
        ep = chunk.granted_on  # the object granted, even if its address left (and came back) meanwhile
        if ep is not None and ep.granted > 0:
            ep.granted -= 1
            ep.observe_chunk(now - chunk.dispatched_at)
        self.metrics.chunk_seconds.observe(self.metrics.chunk_series, now - chunk.dispatched_at)
        self.ledger.charge_end(chunk, produced, now)
        chunk.endpoint = ""
        chunk.granted_on = None
        for listener in self.release_listeners:
            listener(chunk, now)
        self.dispatch()

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
                limit = self._rule(chunk.priority_class).slots
                if limit < slots and not open_to_all:
                    continue  # preemptible, and only reserved slots are free
                holder = chunk.kv_holder
                held = busy.get(holder)
                if (held is not None and (chunk.subset is None or holder in chunk.subset)
                        and holder_verdict(chunk, held, slots=limit, ahead=ahead.get(holder, 0),
                                           cost_model=self.cost_model) is Verdict.WAIT):
                    ahead[holder] = ahead.get(holder, 0) + 1  # the cheap common skip: paused for its holder
                    continue
                ctx = PickContext(chunk, limit, self.cost_model, ahead_on_holder=ahead.get(holder, 0))
                try:
                    decision = self.profile.pick(ctx, members)
                except NoEndpoints as exc:
                    self._fail(chunk, exc)
                    placed = True
                    break
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
    def _rule(self, priority_class: str) -> _ClassRule:
        """The class's rule; a class a policy reload removed is the lowest (as in the queues)."""
        rule = self._rules.get(priority_class)
        return rule if rule is not None else self._rules[self.queues.resolve_class(priority_class).name]

    def _cap_slice(self, chunk: Chunk, rule: _ClassRule) -> None:
        """Account a slice larger than the class's chunk size at the chunk size.

        Not a 400: a driver keeps the size it was admitted with, so after a hot reload that shrank
        ``chunkSize`` its in-flight requests legitimately claim the old size, and a request that
        reached a driver without the picker's admission uses the sidecar's ``--chunk-size`` -- a
        deployment matter, not the client's fault.  The next chunk's signed ``generated`` corrects
        the charge to what was really produced.
        """
        chunk.slice = rule.chunk_size
        self.metrics.slices_capped.labels(chunk.priority_class).inc()

    def _grant(self, chunk: Chunk, ep: Endpoint, migrated: bool, now: float) -> Endpoint:
        ep.granted += 1
        chunk.endpoint = ep.address
        chunk.granted_on = ep
        chunk.dispatched_at = now
        chunk.migrated = migrated
        self.ledger.charge_grant(chunk, ep.address, now)
        self.profile.on_grant(chunk, ep)
        self.metrics.on_dispatch(chunk, now - chunk.enqueued_at, migrated)
        if migrated:
            self.migrations += 1
            log.info("migrated", extra={"request_id": chunk.request_id, "from": chunk.kv_holder,
                                        "to": ep.address, "chunk": chunk.index})
        return ep

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

    # --- what the metrics read ------------------------------------------------------------
    def snapshot(self, now: float) -> PickerSnapshot:
        return PickerSnapshot(
            queue_lengths=self.queues.lengths(), queue_oldest=self.queues.oldest(now),
            endpoints=[EndpointState(e.address, e.granted, e.mean_chunk_s) for e in self.datastore.endpoints()],
            jain=self.ledger.jain(), virtual_counters=self.ledger.counters.snapshot(),
            open_requests=dict(self.limits.open_requests))
