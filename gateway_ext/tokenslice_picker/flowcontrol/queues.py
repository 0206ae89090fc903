"""Queues per (class, tenant) and the dispatch order over them.

Order (the scheduling algorithm, see docs/picker.md):

1. *urgent* chunks, oldest first: continuation chunks of a non-preemptible class (its requests
   are never paused), and chunks of a preemptible class that waited longer than the class's
   ``starvationSeconds`` (aging: served as if top priority);
2. then classes by priority, highest first;
3. inside a class, tenants by virtual token counter, smallest first (weighted fair share);
4. inside a tenant, older requests first (when the picker first granted one of their chunks; a
   first chunk is as old as its arrival), then FIFO.

The dispatcher walks this order and grants the first chunk that its scheduler can place; a chunk
whose KV holder is busy is skipped (it waits, or migrates), so the walk is work-conserving.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from tokenslice.policy import PriorityClass, SchedulingPolicySpec
from tokenslice_picker.flowcontrol.accounting import ServiceLedger
from tokenslice_picker.flowcontrol.chunk import Chunk, Shed


class FlowQueues:
    """The waiting room; it orders by the ledger's counters and asks it who is active."""

    def __init__(self, policy: SchedulingPolicySpec, ledger: ServiceLedger) -> None:
        self.policy = policy
        self.ledger = ledger
        self._queues: dict[str, dict[str, deque[Chunk]]] = {}
        self._arrivals: dict[str, deque[Chunk]] = {}
        """Per class, in push order (lazily pruned): the aged chunks are a prefix of it."""
        self._members: set[Chunk] = set()
        self._urgent: deque[Chunk] = deque()
        self._per_tenant: dict[str, int] = {}
        self._seq = 0
        self.total = 0
        self._class_order: list[PriorityClass] = []
        self.set_policy(policy)

    # --- policy ------------------------------------------------------------------
    def set_policy(self, policy: SchedulingPolicySpec) -> None:
        """Swap the policy; queued chunks stay queued (a vanished class maps to the lowest one)."""
        self.policy = policy
        self._class_order = sorted(policy.priority_classes, key=lambda c: (-c.priority, c.name))
        self._classes = {c.name: c for c in policy.priority_classes}
        self._lowest = policy.lowest_class()
        self._non_preemptible = [c.name for c in policy.priority_classes if not c.preemptible]
        lowest = self._lowest.name
        for name in [n for n in self._queues if policy.klass(n) is None]:
            for tenant, q in self._queues.pop(name).items():
                for chunk in q:
                    chunk.priority_class = lowest
                self._queues.setdefault(lowest, {}).setdefault(tenant, deque()).extend(q)
            self._arrivals.setdefault(lowest, deque()).extend(self._arrivals.pop(name, ()))
        for q in self._queues.get(lowest, {}).values():
            _resort(q, lambda c: (c.born, c.seq))
        _resort(self._arrivals.get(lowest, deque()), lambda c: c.seq)

    def resolve_class(self, name: str) -> PriorityClass:
        """The class by name; an unknown (or since removed) class is the lowest one."""
        return self._classes.get(name) or self._lowest

    # --- queue operations ----------------------------------------------------------
    def push(self, chunk: Chunk, now: float) -> None:
        """Queue a chunk; first chunks beyond the queue bounds are shed (continuations never are)."""
        limits = self.policy.queue
        if chunk.index == 0:
            if self.total >= limits.max_queued_chunks:
                raise Shed("queue_full", f"the picker queue is full ({limits.max_queued_chunks} chunks)")
            if self._per_tenant.get(chunk.tenant, 0) >= limits.max_queued_per_tenant:
                raise Shed("tenant_queue_full", f"tenant {chunk.tenant!r} has {limits.max_queued_per_tenant} "
                                                "chunks queued already")
        self._seq += 1
        chunk.seq = self._seq
        chunk.enqueued_at = now
        pclass = self.resolve_class(chunk.priority_class)
        if chunk.index > 0 and not pclass.preemptible:
            self._urgent.append(chunk)
        else:
            tenants = self._queues.setdefault(pclass.name, {})
            q = tenants.get(chunk.tenant)
            if q is None:
                q = tenants[chunk.tenant] = deque()
            if not q:
                active = self.ledger.active_tenants(pclass.name, now)
                if chunk.tenant not in active:
                    self.ledger.counters.lift(pclass.name, chunk.tenant,
                                              [t for t, tq in tenants.items() if tq] + list(active))
            i = len(q)  # older requests first: a continuation of an old request overtakes younger ones
            while i and (q[i - 1].born, q[i - 1].seq) > (chunk.born, chunk.seq):
                i -= 1
            q.insert(i, chunk)
            self._arrivals.setdefault(pclass.name, deque()).append(chunk)
        self._members.add(chunk)
        self.total += 1
        self._per_tenant[chunk.tenant] = self._per_tenant.get(chunk.tenant, 0) + 1

    def remove(self, chunk: Chunk) -> bool:
        """Take a chunk out (granted, shed, or its caller went away); False if it was not queued."""
        if chunk not in self._members:
            return False
        try:
            if chunk in self._urgent:
                self._urgent.remove(chunk)
            else:
                self._queues[self.resolve_class(chunk.priority_class).name][chunk.tenant].remove(chunk)
        except (KeyError, ValueError):
            return False
        self._members.discard(chunk)
        self.total -= 1
        n = self._per_tenant[chunk.tenant] - 1
        if n:
            self._per_tenant[chunk.tenant] = n
        else:
            del self._per_tenant[chunk.tenant]
        return True

    def any_non_preemptible(self) -> bool:
        """Whether a chunk of a non-preemptible class may be queued (conservative: never a false False)."""
        if self._urgent:
            return True
        for name in self._non_preemptible:
            tenants = self._queues.get(name)
            if tenants and any(tenants.values()):
                return True
        return False

    # --- the dispatch order ----------------------------------------------------------
    def in_order(self, now: float) -> Iterator[Chunk]:
        """Queued chunks in dispatch order (see module docstring). Do not mutate while iterating."""
        aged: list[Chunk] = list(self._urgent)
        for pclass in self._class_order:
            if not pclass.preemptible or pclass.starvation_seconds is None:
                continue
            arrivals = self._arrivals.get(pclass.name)
            if not arrivals:
                continue
            members = self._members
            while arrivals and arrivals[0] not in members:
                arrivals.popleft()
            cutoff = now - pclass.starvation_seconds
            for chunk in arrivals:  # push order: the aged chunks are a prefix
                if chunk.enqueued_at > cutoff:
                    break
                if chunk in members:
                    aged.append(chunk)
        if aged:
            aged.sort(key=lambda c: c.seq)
            yield from aged
            skip = set(map(id, aged))
        else:
            skip = set()
        counters = self.ledger.counters
        for pclass in self._class_order:
            tenants = self._queues.get(pclass.name)
            if not tenants:
                continue
            busy = [(counters.get(pclass.name, t), t, q) for t, q in tenants.items() if q]
            busy.sort(key=lambda x: (x[0], x[1]))
            for _, _, q in busy:
                for chunk in q:
                    if not skip or id(chunk) not in skip:
                        yield chunk

    # --- introspection (metrics, tests) ---------------------------------------------------
    def lengths(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for pclass, tenants in self._queues.items():
            for tenant, q in tenants.items():
                if q:
                    out[(pclass, tenant)] = len(q)
        for chunk in self._urgent:
            key = (chunk.priority_class, chunk.tenant)
            out[key] = out.get(key, 0) + 1
        return out

    def oldest(self, now: float) -> dict[tuple[str, str], float]:
        """Wait so far of the oldest queued chunk per (class, tenant)."""
        out: dict[tuple[str, str], float] = {}
        for pclass, tenants in self._queues.items():
            for tenant, q in tenants.items():
                if q:
                    out[(pclass, tenant)] = now - q[0].enqueued_at
        for chunk in self._urgent:
            key = (chunk.priority_class, chunk.tenant)
            out[key] = max(out.get(key, 0.0), now - chunk.enqueued_at)
        return out

    def __len__(self) -> int:
        return self.total


def _resort(q: deque[Chunk], key: Callable[[Chunk], tuple[float, int] | int]) -> None:
    if len(q) > 1:
        ordered = sorted(q, key=key)
        q.clear()
        q.extend(ordered)
