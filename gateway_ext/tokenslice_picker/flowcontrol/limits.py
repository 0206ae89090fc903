"""Per-tenant limits from the policy: concurrent client requests and a token rate (token bucket)."""

from __future__ import annotations

import time

from tokenslice.policy import SchedulingPolicySpec, Tenant


class TenantLimits:
    """Admission-time checks; the bucket is charged by every dispatched chunk (prompt + slice)."""

    def __init__(self) -> None:
        self.open_requests: dict[str, int] = {}
        self.total_open = 0
        """Client requests admitted and not yet answered, all tenants (the policy's maxOpenRequests bound)."""
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill)

    def check(self, policy: SchedulingPolicySpec, tenant: str, now: float | None = None) -> str | None:
        """None if the tenant may start a request now, else why not."""
        t = policy.tenant(tenant)
        if t is None:
            return None
        if t.max_concurrency is not None and self.open_requests.get(tenant, 0) >= t.max_concurrency:
            return f"tenant {tenant!r} is at its concurrency limit ({t.max_concurrency} requests)"
        if t.tokens_per_second is not None and self._level(tenant, t.tokens_per_second, now) < 0:
            return f"tenant {tenant!r} is over its token rate ({t.tokens_per_second:g} tokens/s)"
        return None

    def opened(self, tenant: str) -> None:
        self.open_requests[tenant] = self.open_requests.get(tenant, 0) + 1
        self.total_open += 1

    def closed(self, tenant: str) -> None:
        self.total_open = max(0, self.total_open - 1)
        n = self.open_requests.get(tenant, 0) - 1
        if n > 0:
            self.open_requests[tenant] = n
        else:
            self.open_requests.pop(tenant, None)

    def spend(self, t: Tenant | None, tokens: float, now: float | None = None) -> None:
        """Charge a dispatched chunk to its tenant's bucket (no-op without a token-rate limit)."""
        if t is None or t.tokens_per_second is None:
            return
        level = self._level(t.name, t.tokens_per_second, now)
        self._buckets[t.name] = (level - tokens, self._buckets[t.name][1])

    def _level(self, tenant: str, rate: float, now: float | None) -> float:
        """Refill to at most one second's worth of tokens (the burst); may be negative (debt)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(tenant, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        self._buckets[tenant] = (tokens, now)
        return tokens
