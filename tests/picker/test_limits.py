"""Per-tenant concurrency and token-rate limits."""

from __future__ import annotations

from tokenslice.policy import SchedulingPolicySpec, Tenant
from tokenslice_picker.flowcontrol.limits import TenantLimits


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
