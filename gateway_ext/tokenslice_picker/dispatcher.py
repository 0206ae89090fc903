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

Preemption: when a pass leaves chunks queued, the profile's victim selector may pick a running
chunk to cut for one of them (``scheduling.victims``); the cut is sent by its own task and, when
the victim's stream ends, its slot goes straight to that waiter -- nobody else, the victim's own
continuation included, can take it in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from tokenslice.policy import SchedulingPolicySpec
from tokenslice_picker.datastore.endpoints import Datastore, Endpoint
from tokenslice_picker.flowcontrol.accounting import ServiceLedger, Settled
from tokenslice_picker.flowcontrol.chunk import Chunk, NoEndpoints, Shed
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.flowcontrol.queues import FlowQueues
from tokenslice_picker.metrics import EndpointState, PickerMetrics, PickerSnapshot
from tokenslice_picker.scheduling.affinity import Verdict, holder_verdict
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.profile import SchedulerProfile, default_profile
from tokenslice_picker.scheduling.residency import ResidencyTracker
from tokenslice_picker.scheduling.victims import FAIR_SHARE, Preemption, VictimContext

log = logging.getLogger("tokenslice_picker.dispatcher")

CutFn = Callable[[str, str, int, str], Awaitable[int | None]]
"""``(worker address, request id, chunk index, reason) -> HTTP status or None``: sends one cut."""

KV_BLOCK_TOKENS = 16
"""vLLM's default KV block: a continuation after a cut recomputes only the tokens past the last full one."""


@dataclass(frozen=True, slots=True)
class _ClassRule:
    """What the policy allows one class, resolved once per policy (a dict lookup on the hot path)."""

    slots: int
    """Slots of an endpoint its chunks may fill (``slotsPerEndpoint`` minus the reserve if preemptible)."""
    chunk_size: int
    """The fairness quantum: a chunk is charged at most this many output tokens until it reports."""
    max_slice: int
    """The slice a driver may claim without being counted as capped (>= chunk_size; long slices)."""


def _class_rules(policy: SchedulingPolicySpec, max_slice_tokens: int) -> dict[str, _ClassRule]:
    rules = {}
    for c in policy.priority_classes:
        size = policy.class_chunk_size(c)
        rules[c.name] = _ClassRule(policy.class_slots(c), size, max(size, max_slice_tokens))
    return rules


class Dispatcher:
    def __init__(self, policy: SchedulingPolicySpec, datastore: Datastore, metrics: PickerMetrics, *,
                 cost_model: CostModel | None = None, profile: SchedulerProfile | None = None,
                 idle_grace_s: float = 2.0, ledger_size: int = 100_000, cut: CutFn | None = None,
                 max_slice_tokens: int, fair_share_slack_quanta: float = 0.0, preempt_scan: int = 32,
                 residency: ResidencyTracker | None = None) -> None:
        """``max_slice_tokens`` has no default here: the picker's one default is ``PickerSettings``'s
        (long slices); 0 is per-slice mode."""
        self.limits = TenantLimits()
        self.ledger = ServiceLedger(policy, self.limits, metrics, idle_grace_s=idle_grace_s, ledger_size=ledger_size)
        self.queues = FlowQueues(policy, self.ledger)
        self.max_slice_tokens = max_slice_tokens
        self._rules = _class_rules(policy, max_slice_tokens)
        self.datastore = datastore
        self.metrics = metrics
        self.cost_model = cost_model or CostModel()
        self.profile = profile or default_profile()
        self._ttl_handles: dict[int, asyncio.TimerHandle] = {}
        self.cut = cut
        """Sends a cut; None: never preempt (every chunk runs to its slice end)."""
        self.preempt_scan = preempt_scan
        self.fair_share_slack_quanta = fair_share_slack_quanta
        """A fair-share cut needs the victim's tenant ahead by this many quanta (``PickerSettings`` default)."""
        """At most this many queued chunks (in dispatch order) look for a victim per pass."""
        self.running: set[Chunk] = set()
        self.residency = residency
        """Whose KV is probably still cached (None: residency-blind, the queues' order as is)."""
        self._cut_tasks: set[asyncio.Task[None]] = set()
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_due = 0.0
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
        self._rules = _class_rules(policy, self.max_slice_tokens)
        self.dispatch()

    # --- chunk lifecycle ----------------------------------------------------------
    async def acquire(self, chunk: Chunk) -> Endpoint:
        """Wait for a slot; return the endpoint granted. Raises Shed (429) or NoEndpoints (503)."""
        now = time.monotonic()
        chunk.priority_class = self.queues.resolve_class(chunk.priority_class).name
        rule = self._rule(chunk.priority_class)
        if chunk.slice > rule.chunk_size:
            self._cap_slice(chunk, rule)
        settled = self.ledger.reconcile(chunk)
        if settled is not None:
            self._settled(settled, chunk.prompt_tokens + chunk.generated)
        born = self.ledger.born(chunk.request_id)
        chunk.born = born if born is not None else now
        members = self.datastore.endpoints()
        if not members:
            raise NoEndpoints("no ready endpoint in the pool")
        holder = self.datastore.get(chunk.kv_holder) if chunk.kv_holder else None
        if holder is None or holder.granted < rule.slots:  # the fast path: no busy holder to weigh
            decision = self.profile.pick(PickContext(chunk, rule.slots, self.cost_model,
                                                     resident_tokens=self._resident(chunk, holder)), members)
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
        if ep is not None and self.residency is not None:
            self.residency.on_release(chunk, ep, produced)
        self.metrics.chunk_seconds.observe(self.metrics.chunk_series, now - chunk.dispatched_at)
        self.running.discard(chunk)
        waiter = chunk.cut_for
        settled = self.ledger.charge_end(chunk, produced, now, cut=waiter is not None)
        if settled is not None:
            self._settled(settled, chunk.prompt_tokens + chunk.generated + settled.produced)
        chunk.endpoint = ""
        chunk.granted_on = None
        if waiter is not None:
            chunk.cut_for = None
            self.metrics.cut_to_free_seconds.observe(now - chunk.cut_at)
            if waiter.cutting is chunk and ep is not None:
                self._hand_over(waiter, ep, now)
        for listener in self.release_listeners:
            listener(chunk, now)
        self.dispatch()

    # --- the dispatch pass ------------------------------------------------------------
    def dispatch(self) -> None:
        """Grant what fits; then, for what still waits, cut a running chunk where the policy says so."""
        if self.queues.total and self.running:
            self._accrue(time.monotonic())
        self._fill()
        if self.queues.total and self.cut is not None and self.running:
            self._preempt()

    def _fill(self) -> None:
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
            for chunk in self._order(now):
                limit = self._rule(chunk.priority_class).slots
                if limit < slots and not open_to_all:
                    continue  # preemptible, and only reserved slots are free
                holder = chunk.kv_holder
                held = busy.get(holder)
                resident = self._resident(chunk, self.datastore.get(holder) if holder else None)
                if (held is not None and (chunk.subset is None or holder in chunk.subset)
                        and holder_verdict(chunk, held, slots=limit, ahead=ahead.get(holder, 0),
                                           cost_model=self.cost_model, resident_tokens=resident) is Verdict.WAIT):
                    ahead[holder] = ahead.get(holder, 0) + 1  # the cheap common skip: paused for its holder
                    continue
                ctx = PickContext(chunk, limit, self.cost_model, ahead_on_holder=ahead.get(holder, 0),
                                  resident_tokens=resident)
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

    def _accrue(self, now: float) -> None:
        """Charge each running long slice what it has produced by now (elapsed x its endpoint's rate).

        Fair share needs current counters when the pass orders waiters and weighs victims: a long
        slice charged one quantum until its end would let its tenant look owed while it holds slots.
        Runs only when someone waits (nobody reads the counters otherwise).
        """
        for c in self.running:
            ep = c.granted_on
            if ep is None or c.claim.slice <= c.slice:
                continue  # not a long slice: charged its whole (capped) slice at grant already
            quantum = self._rule(c.priority_class).chunk_size
            per_token = ep.seconds_for(quantum) / quantum
            if per_token <= 0:
                continue
            produced = min(c.claim.slice, int((now - c.dispatched_at) / per_token))
            self.ledger.accrue(c, produced)
            if self.residency is not None:
                self.residency.on_progress(c, ep, produced)

    def _order(self, now: float) -> Iterable[Chunk]:
        """The queues' dispatch order; with residency awareness, resident continuations moved up a class.

        Both are lazy: the walk stops at the first chunk placed, and chunks the ordering pins (urgent,
        non-preemptible, aged) come out before it ranks any preemptible run behind them.
        """
        order = self.queues.in_order(now)
        if self.residency is None:
            return order
        resolve = self.queues.resolve_class

        def pinned(chunk: Chunk) -> bool:
            pclass = resolve(chunk.priority_class)
            return (not pclass.preemptible or (pclass.starvation_seconds is not None
                                               and now - chunk.enqueued_at >= pclass.starvation_seconds))
        return self.residency.order(order, counter=self.ledger.counters.get, pinned=pinned,
                                    holder=self.datastore.get)

    def _resident(self, chunk: Chunk, holder: Endpoint | None) -> int | None:
        if self.residency is None or holder is None:
            return None
        return self.residency.resident_tokens(chunk, holder)

    # --- preemption ----------------------------------------------------------------------
    def _preempt(self) -> None:
        """Let the first ``preempt_scan`` waiters (in dispatch order) each cut at most one running chunk."""
        selector = self.profile.victim_selector
        if selector is None:
            return
        now = time.monotonic()
        counters = self.ledger.counters
        # Fair-share cuts under way are charged in advance (each waiter will run at least a quantum):
        # otherwise every pass before the cuts land would cut again, and one tenant's waiters take every slot.
        ahead: dict[tuple[str, str], float] = {}
        output = self.policy.fairness.output

        def owe(waiter: Chunk) -> None:
            key = (waiter.priority_class, waiter.tenant)
            cost = output * self._rule(waiter.priority_class).chunk_size / self.ledger.weight(waiter.tenant)
            ahead[key] = ahead.get(key, 0.0) + cost

        for c in self.running:
            if c.cut_for is not None and c.cut_reason == FAIR_SHARE:
                owe(c.cut_for)

        def served(klass: str, tenant: str) -> float:
            return counters.get(klass, tenant) + ahead.get((klass, tenant), 0.0)

        def slack(klass: str) -> float:
            return self.fair_share_slack_quanta * output * self._rule(klass).chunk_size

        ctx = VictimContext(self.queues.resolve_class, lambda c: self._rule(c).chunk_size, served, now, slack)
        unserved = False
        for n, waiter in enumerate(self.queues.in_order(now)):
            if n >= self.preempt_scan:
                break
            if waiter.cutting is not None:
                continue
            offered = self._victims_for(waiter)
            choice = selector.select(waiter, offered, ctx) if offered else None
            if choice is not None:
                self._start_cut(choice, waiter, now)
                if choice.reason == FAIR_SHARE:
                    owe(waiter)
            else:
                unserved = True
        if unserved:
            self._recheck_at_next_quantum(now)

    def _recheck_at_next_quantum(self, now: float) -> None:
        """A waiter found no victim; a long slice may become one at its next quantum boundary.

        Passing its first quantum makes it cuttable; every later one adds a quantum to its tenant's
        accrued counter, which may put that tenant ahead of the waiter's.  No event marks those
        moments (nothing ends, nothing arrives), so a timer runs the pass again at the next one.
        """
        due = None
        for c in self.running:
            ep = c.granted_on
            quantum = self._rule(c.priority_class).chunk_size
            if ep is None or c.cut_for is not None or c.cut_failed or c.claim.slice <= quantum:
                continue
            step = ep.seconds_for(quantum)
            if step <= 0:
                continue
            at = c.dispatched_at + (int((now - c.dispatched_at) / step) + 1) * step
            if due is None or at < due:
                due = at
        if due is None:
            return
        if self._recheck is not None:
            if self._recheck_due <= due:
                return
            self._recheck.cancel()
        self._recheck_due = due
        self._recheck = asyncio.get_running_loop().call_later(due - now + 0.001, self._run_recheck)

    def _run_recheck(self) -> None:
        self._recheck = None
        self.dispatch()

    def _victims_for(self, waiter: Chunk) -> list[Chunk]:
        """Running chunks whose slot ``waiter`` could take: where it may run, and with room for its class."""
        limit = self._rule(waiter.priority_class).slots
        subset = waiter.subset
        holder = self.datastore.get(waiter.kv_holder) if waiter.kv_holder else None
        if holder is not None and subset is not None and holder.address not in subset:
            holder = None
        out = []
        for c in self.running:
            ep = c.granted_on
            if (c.cut_for is not None or c.cut_failed or ep is None or ep.granted - 1 >= limit
                    or (holder is not None and ep is not holder) or (subset is not None and ep.address not in subset)
                    or self.datastore.get(ep.address) is not ep):
                continue
            out.append(c)
        return out

    def _start_cut(self, choice: Preemption, waiter: Chunk, now: float) -> None:
        victim = choice.victim
        victim.cut_for = waiter
        victim.cut_reason = choice.reason
        victim.cut_at = now
        waiter.cutting = victim
        self.metrics.preemptions.labels(choice.reason, victim.priority_class).inc()
        log.info("preempting", extra={"request_id": victim.request_id, "chunk": victim.index, "reason": choice.reason,
                                      "endpoint": victim.endpoint, "for": waiter.request_id})
        assert self.cut is not None
        task = asyncio.get_running_loop().create_task(self._send_cut(victim, waiter, victim.endpoint, choice.reason))
        self._cut_tasks.add(task)
        task.add_done_callback(self._cut_tasks.discard)

    async def _send_cut(self, victim: Chunk, waiter: Chunk, address: str, reason: str) -> None:
        assert self.cut is not None
        status = await self.cut(address, victim.request_id, victim.index, reason)
        if status == 200:
            return
        result = "not_running" if status == 404 else "unreachable" if status is None else f"http_{status}"
        self.metrics.cut_failures.labels(result).inc()
        log.warning("cut failed", extra={"request_id": victim.request_id, "chunk": victim.index,
                                         "endpoint": address, "result": result})
        if victim.cut_for is waiter:  # still running: let the waiter look elsewhere, never cut this one again
            victim.cut_for = None
            victim.cut_failed = True
            if waiter.cutting is victim:
                waiter.cutting = None
            self.dispatch()

    def _hand_over(self, waiter: Chunk, ep: Endpoint, now: float) -> None:
        """The victim's slot goes to the chunk it was cut for (if that one still waits and fits)."""
        waiter.cutting = None
        if self.datastore.get(ep.address) is not ep or ep.granted >= self._rule(waiter.priority_class).slots:
            return
        if not self.queues.remove(waiter):
            return  # granted elsewhere meanwhile, or its caller went away
        self._cancel_ttl(waiter)
        self._grant(waiter, ep, False, now)
        assert waiter.future is not None
        if not waiter.future.done():
            waiter.future.set_result(ep.address)

    async def close(self) -> None:
        """Wait for cuts in flight (shutdown)."""
        if self._recheck is not None:
            self._recheck.cancel()
        if self._cut_tasks:
            await asyncio.gather(*self._cut_tasks, return_exceptions=True)

    # --- internals ----------------------------------------------------------------
    def _settled(self, settled: Settled, context_tokens: int) -> None:
        """A chunk's output became known: learn its endpoint's decode rate; a cut one's cost is now known."""
        ep = self.datastore.get(settled.address)
        if ep is not None:
            ep.observe_rate(settled.produced, settled.seconds)
        if settled.cut:
            self.metrics.cut_tokens.labels("produced").inc(settled.produced)
            self.metrics.cut_tokens.labels("recomputed").inc(context_tokens % KV_BLOCK_TOKENS)

    def _rule(self, priority_class: str) -> _ClassRule:
        """The class's rule; a class a policy reload removed is the lowest (as in the queues)."""
        rule = self._rules.get(priority_class)
        return rule if rule is not None else self._rules[self.queues.resolve_class(priority_class).name]

    def _cap_slice(self, chunk: Chunk, rule: _ClassRule) -> None:
        """Account a slice larger than the class's chunk size (the quantum) at the chunk size.

        With long slices (``max_slice_tokens``) that is the normal case; beyond ``max_slice`` it is
        counted in ``slices_capped_total``.  Not a 400: a driver keeps the size it was admitted with,
        so after a hot reload that shrank ``chunkSize`` its in-flight requests legitimately claim the
        old size, and a request that reached a driver without the picker's admission uses the
        sidecar's ``--chunk-size`` -- a deployment matter, not the client's fault.  The next chunk's signed
        ``generated`` corrects the charge to what was really produced.
        """
        if chunk.slice > rule.max_slice:
            self.metrics.slices_capped.labels(chunk.priority_class).inc()
        chunk.slice = rule.chunk_size

    def _grant(self, chunk: Chunk, ep: Endpoint, migrated: bool, now: float) -> Endpoint:
        ep.granted += 1
        chunk.endpoint = ep.address
        chunk.granted_on = ep
        chunk.dispatched_at = now
        chunk.migrated = migrated
        chunk.cutting = None
        self.running.add(chunk)
        self.ledger.charge_grant(chunk, ep.address, now)
        if self.residency is not None:
            if chunk.index:
                tier = self.residency.chunk_tier(chunk, self.datastore.get(chunk.kv_holder))
                self.metrics.residency.labels(tier.value if tier else "unknown").inc()
            self.residency.on_grant(chunk, ep)
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
