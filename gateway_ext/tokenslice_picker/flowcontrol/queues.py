"""Queues per (class, tenant) and the dispatch order over them.

Order (the scheduling algorithm, see docs/gateway.md):

1. *urgent* chunks, oldest first: continuation chunks of a non-preemptible class (its requests
   are never paused), and chunks of a preemptible class that waited longer than the class's
   ``starvationSeconds`` (aging: served as if top priority);
2. then classes by priority, highest first;
3. inside a class, tenants by virtual token counter, smallest first (weighted fair share);
4. inside a tenant, FIFO.

The dispatcher walks this order and grants the first chunk that its scheduler can place; a chunk
whose KV holder is busy is skipped (it waits, or migrates), so the walk is work-conserving.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from tokenslice_picker.flowcontrol.chunk import Chunk, Shed
from tokenslice_picker.flowcontrol.fairness import VirtualCounters
from tokenslice.policy import PriorityClass, SchedulingPolicySpec, Tenant


class FlowQueues:
    def __init__(self, policy: SchedulingPolicySpec) -> None:
        self.policy = policy
        self.counters = VirtualCounters()
        self._queues: dict[str, dict[str, deque[Chunk]]] = {}
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
        self._tenants = {t.name: t for t in policy.tenants}
        self._lowest = policy.lowest_class()
        self._non_preemptible = [c.name for c in policy.priority_classes if not c.preemptible]
        lowest = self._lowest.name
        for name in [n for n in self._queues if policy.klass(n) is None]:
            for tenant, q in self._queues.pop(name).items():
                for chunk in q:
                    chunk.klass = lowest
                self._queues.setdefault(lowest, {}).setdefault(tenant, deque()).extend(q)
        for q in self._queues.get(lowest, {}).values():
            if len(q) > 1:
                ordered = sorted(q, key=lambda c: c.seq)
                q.clear()
                q.extend(ordered)

    def klass(self, name: str) -> PriorityClass:
        """The class by name; an unknown (or since removed) class is the lowest one."""
        return self._classes.get(name) or self._lowest

    def tenant(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def weight(self, tenant: str) -> float:
        t = self._tenants.get(tenant)
        return t.weight if t else 1.0

    # --- queue operations ----------------------------------------------------------
    def push(self, chunk: Chunk, now: float, active_tenants: set[str]) -> None:
        """Queue a chunk; first chunks beyond the queue bounds are shed (continuations never are)."""
        limits = self.policy.queue
        if chunk.index == 0:
            if self.total >= limits.max_queued_chunks:
                raise Shed("queue_full", f"the gateway queue is full ({limits.max_queued_chunks} chunks)")
            if self._per_tenant.get(chunk.tenant, 0) >= limits.max_queued_per_tenant:
                raise Shed("tenant_queue_full", f"tenant {chunk.tenant!r} has {limits.max_queued_per_tenant} "
                                                "chunks queued already")
        self._seq += 1
        chunk.seq = self._seq
        chunk.enqueued_at = now
        klass = self.klass(chunk.klass)
        if chunk.index > 0 and not klass.preemptible:
            self._urgent.append(chunk)
        else:
            tenants = self._queues.setdefault(klass.name, {})
            q = tenants.get(chunk.tenant)
            if q is None:
                q = tenants[chunk.tenant] = deque()
            if not q and chunk.tenant not in active_tenants:
                self.counters.lift(klass.name, chunk.tenant,
                                   [t for t, tq in tenants.items() if tq] + [t for t in active_tenants])
            q.append(chunk)
        self.total += 1
        self._per_tenant[chunk.tenant] = self._per_tenant.get(chunk.tenant, 0) + 1

    def remove(self, chunk: Chunk) -> bool:
        """Take a chunk out (granted, shed, or its caller went away); False if it was not queued."""
        try:
            if chunk in self._urgent:
                self._urgent.remove(chunk)
            else:
                self._queues[self.klass(chunk.klass).name][chunk.tenant].remove(chunk)
        except (KeyError, ValueError):
            return False
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

    def charge(self, klass: str, tenant: str, cost: float) -> None:
        self.counters.charge(klass, tenant, cost, self.weight(tenant))

    # --- the dispatch order ----------------------------------------------------------
    def in_order(self, now: float) -> Iterator[Chunk]:
        """Queued chunks in dispatch order (see module docstring). Do not mutate while iterating."""
        aged: list[Chunk] = list(self._urgent)
        for klass in self._class_order:
            if not klass.preemptible or klass.starvation_seconds is None:
                continue
            cutoff = now - klass.starvation_seconds
            for q in self._queues.get(klass.name, {}).values():
                for chunk in q:  # FIFO: the aged chunks are a prefix of each queue
                    if chunk.enqueued_at > cutoff:
                        break
                    aged.append(chunk)
        if aged:
            aged.sort(key=lambda c: c.seq)
            yield from aged
            skip = set(map(id, aged))
        else:
            skip = set()
        counters = self.counters
        for klass in self._class_order:
            tenants = self._queues.get(klass.name)
            if not tenants:
                continue
            busy = [(counters.get(klass.name, t), t, q) for t, q in tenants.items() if q]
            busy.sort(key=lambda x: (x[0], x[1]))
            for _, _, q in busy:
                for chunk in q:
                    if not skip or id(chunk) not in skip:
                        yield chunk

    # --- introspection (metrics, tests) ---------------------------------------------------
    def lengths(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for klass, tenants in self._queues.items():
            for tenant, q in tenants.items():
                if q:
                    out[(klass, tenant)] = len(q)
        for chunk in self._urgent:
            key = (chunk.klass, chunk.tenant)
            out[key] = out.get(key, 0) + 1
        return out

    def oldest(self, now: float) -> dict[tuple[str, str], float]:
        """Wait so far of the oldest queued chunk per (class, tenant)."""
        out: dict[tuple[str, str], float] = {}
        for klass, tenants in self._queues.items():
            for tenant, q in tenants.items():
                if q:
                    out[(klass, tenant)] = now - q[0].enqueued_at
        for chunk in self._urgent:
            key = (chunk.klass, chunk.tenant)
            out[key] = max(out.get(key, 0.0), now - chunk.enqueued_at)
        return out

    def __len__(self) -> int:
        return self.total
