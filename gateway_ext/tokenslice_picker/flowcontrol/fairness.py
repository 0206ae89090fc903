"""Weighted fair share between tenants by tokens served: a virtual token counter (VTC).

Each (class, tenant) has a counter of weighted service: serving ``cost`` tokens adds
``cost / weight``.  Inside a class the backlogged tenant with the *smallest* counter goes next,
so over any backlogged interval the service ratio converges to the weight ratio (the gap is
bounded by one chunk's cost per tenant).  A tenant that comes back from idle has its counter
lifted to the minimum of the active tenants: idling never banks credit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable


class VirtualCounters:
    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], float] = {}

    def get(self, klass: str, tenant: str) -> float:
        return self._counters.get((klass, tenant), 0.0)

    def charge(self, klass: str, tenant: str, cost: float, weight: float) -> None:
        key = (klass, tenant)
        self._counters[key] = self._counters.get(key, 0.0) + cost / weight

    def lift(self, klass: str, tenant: str, active: Iterable[str]) -> None:
        """Returning from idle: start no lower than the least-served active tenant of the class."""
        floor = min((self.get(klass, t) for t in active if t != tenant), default=None)
        if floor is not None and self.get(klass, tenant) < floor:
            self._counters[(klass, tenant)] = floor

    def snapshot(self) -> dict[tuple[str, str], float]:
        return dict(self._counters)


class ServiceWindow:
    """Tokens served per tenant over the last ``window_s`` (for the live Jain index)."""

    def __init__(self, window_s: float = 60.0, max_events: int = 200_000) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, str, float]] = deque(maxlen=max_events)

    def add(self, tenant: str, tokens: float, now: float | None = None) -> None:
        self._events.append((time.monotonic() if now is None else now, tenant, tokens))

    def per_tenant(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        out: dict[str, float] = {}
        for _, tenant, tokens in self._events:
            out[tenant] = out.get(tenant, 0.0) + tokens
        return out
