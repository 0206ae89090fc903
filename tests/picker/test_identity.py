"""Tenants an operator can trust, through a REAL Envoy: API keys, an authenticating proxy, anonymous.

Before tokenslice/identity.py the tenant was whatever the client's ``x-tenant-id`` said; these tests
check that only the picker's configuration -- a keys file, a proxy's header from a trusted address --
names a tenant, and that everyone else is the policy's default tenant.
"""

from __future__ import annotations

import json
import secrets

import yaml

from tokenslice import contract
from tokenslice.identity import Identity
from tokenslice.policy import PriorityClass, SchedulingPolicySpec, Tenant

POLICY = SchedulingPolicySpec(
    priority_classes=[PriorityClass(name="interactive", priority=1000, preemptible=False),
                      PriorityClass(name="standard", priority=100)],
    tenants=[Tenant(name="web", allowed_classes=["interactive", "standard"], default_class="interactive"),
             Tenant(name="anon", allowed_classes=["standard"])],
    default_tenant="anon",
)
WEB_KEY = "sk-web-" + secrets.token_hex(16)


def _admitted(stack, upstream) -> contract.AdmitHeaders:
    return contract.AdmitHeaders.verify(upstream.received[-1].headers, stack.key)


async def test_api_keys_name_the_tenant_and_a_claimed_one_is_ignored(gateway_stack, upstreams, tmp_path):
    (up,) = await upstreams(1)
    keys = tmp_path / "api-keys.yaml"
    keys.write_text(yaml.safe_dump([{"tenant": "web", "key": WEB_KEY}]))
    stack = await gateway_stack(endpoints=[up.address], policy=POLICY, api_keys_file=keys)

    status, _, _ = await stack.post(headers={"authorization": f"Bearer {WEB_KEY}", "x-priority-class": "interactive"})
    assert status == 200 and (_admitted(stack, up).tenant, _admitted(stack, up).priority_class) == ("web",
                                                                                                   "interactive")
    # the old hole: naming a tenant in a header made you that tenant
    status, _, _ = await stack.post(headers={"x-tenant-id": "web", "x-priority-class": "interactive"})
    assert status == 200 and (_admitted(stack, up).tenant, _admitted(stack, up).priority_class) == ("anon",
                                                                                                   "standard")
    for bad in (f"Bearer {WEB_KEY}x", "Bearer ", f"Basic {WEB_KEY}"):
        n = len(up.received)
        status, headers, body = await stack.post(headers={"authorization": bad})
        err = json.loads(body)["error"]
        assert status == 401 and err["type"] == "AuthenticationError" and err["code"] == "invalid_api_key"
        assert WEB_KEY not in body.decode() and len(up.received) == n  # refused, never served anonymously


async def test_a_proxy_header_counts_only_from_the_trusted_proxy(gateway_stack, upstreams):
    (up,) = await upstreams(1)
    # Envoy reports this test client as 127.0.0.1: trusted in one picker, not in the other
    trusted = await gateway_stack(endpoints=[up.address], policy=POLICY, identity_header="x-auth-tenant",
                                  trusted_proxies=["127.0.0.0/8"])
    assert (await trusted.post(headers={"x-auth-tenant": "web"}))[0] == 200
    assert _admitted(trusted, up).tenant == "web" and up.received[-1].headers.get("x-auth-tenant") == "web"

    untrusted = await gateway_stack(endpoints=[up.address], policy=POLICY, identity_header="x-auth-tenant",
                                    trusted_proxies=["10.0.0.0/8"])
    assert (await untrusted.post(headers={"x-auth-tenant": "web", "x-priority-class": "interactive"}))[0] == 200
    got = up.received[-1]
    assert contract.AdmitHeaders.verify(got.headers, untrusted.key).tenant == "anon"
    assert "x-auth-tenant" not in got.headers  # stripped: nothing downstream can mistake it for the proxy's


def test_identity_rules():
    ident = Identity.configure(trusted_header="X-Auth", trusted_proxies=["10.1.0.0/16", "fd00::/8"])
    assert ident.tenant({"x-auth": "t"}, "x-tenant-id", "10.1.2.3:5555") == "t"
    assert ident.tenant({"x-auth": "t"}, "x-tenant-id", "[fd00::1]:5555") == "t"
    assert ident.tenant({"x-auth": "t"}, "x-tenant-id", "10.2.0.1:5555") is None
    assert ident.tenant({"x-auth": "t"}, "x-tenant-id", None) is None
    assert ident.tenant({"x-tenant-id": "t"}, "x-tenant-id", None) is None  # a client's word, not trusted
    assert Identity(trust_tenant_header=True).tenant({"x-tenant-id": "t"}, "x-tenant-id", None) == "t"
    assert repr(Identity.configure()).count("api_keys") == 0  # keys never in a repr (logs)
