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


# --- GIE / llm-d request headers ------------------------------------------------------------------
GIE = {"x-gateway-inference-fairness-id": "web", "x-gateway-inference-objective": "standard"}
LLM_D = {"x-llm-d-inference-fairness-id": "web", "x-llm-d-inference-objective": "standard"}


async def test_an_llm_d_client_is_classed_and_tenanted_as_with_our_headers(gateway_stack, upstreams):
    """web's default class is interactive, so "standard" shows the objective was read; anon shows the tenant."""
    (up,) = await upstreams(1)
    stack = await gateway_stack(endpoints=[up.address], policy=POLICY, trust_tenant_header=True)

    def admitted() -> tuple[str, str]:
        got = _admitted(stack, up)
        return got.tenant, got.priority_class

    assert (await stack.post(headers={"x-tenant-id": "web", "x-priority-class": "standard"}))[0] == 200
    ours = admitted()
    for theirs in (GIE, LLM_D, {"x-llm-d-router-inference-fairness-id": "web",
                                "x-llm-d-router-inference-objective": "standard"}):
        assert (await stack.post(headers=theirs))[0] == 200
        assert admitted() == ours == ("web", "standard"), theirs
        assert up.received[-1].headers.get(next(iter(theirs))) == "web"  # believed here, so passed on
    # an objective never escalates: anon may not be interactive, an unknown objective is the default class
    assert (await stack.post(headers={**GIE, "x-gateway-inference-fairness-id": "anon",
                                      "x-gateway-inference-objective": "interactive"}))[0] == 200
    assert admitted() == ("anon", "standard")
    assert (await stack.post(headers={**GIE, "x-gateway-inference-objective": "no-such-objective"}))[0] == 200
    assert admitted() == ("web", "interactive")
    # our own headers win over theirs
    assert (await stack.post(headers={**GIE, "x-tenant-id": "anon", "x-priority-class": "standard"}))[0] == 200
    assert admitted() == ("anon", "standard")


async def test_an_untrusted_fairness_id_is_ignored_and_stripped(gateway_stack, upstreams):
    (up,) = await upstreams(1)
    # Envoy reports this test client as 127.0.0.1
    untrusted = await gateway_stack(endpoints=[up.address], policy=POLICY)
    other_proxy = await gateway_stack(endpoints=[up.address], policy=POLICY, trusted_proxies=["10.0.0.0/8"])
    own_header = await gateway_stack(endpoints=[up.address], policy=POLICY, identity_header="x-auth-tenant",
                                     trusted_proxies=["127.0.0.0/8"])
    for stack in (untrusted, other_proxy, own_header):
        for theirs in (GIE, LLM_D):
            assert (await stack.post(headers={**theirs, "x-llm-d-inference-objective": "interactive"}))[0] == 200
            got = up.received[-1]
            assert contract.AdmitHeaders.verify(got.headers, stack.key).tenant == "anon"
            assert not set(contract.FAIRNESS_ID_HEADERS) & set(got.headers)  # nothing downstream can believe it
    # a proxy trusted without a header of its own names the tenant with the fairness id (an llm-d auth layer)
    proxy = await gateway_stack(endpoints=[up.address], policy=POLICY, trusted_proxies=["127.0.0.0/8"])
    assert (await proxy.post(headers=GIE))[0] == 200
    admit = _admitted(proxy, up)
    assert (admit.tenant, admit.priority_class) == ("web", "standard")


def test_fairness_id_rules():
    fid = {"x-gateway-inference-fairness-id": "t"}
    here, inside, outside = "127.0.0.1:1", "10.0.0.1:1", "11.0.0.1:1"
    assert Identity().tenant(fid, "x-tenant-id", here) is None
    assert set(Identity().strip(here)) == set(contract.FAIRNESS_ID_HEADERS)
    assert Identity(trust_tenant_header=True).tenant(fid, "x-tenant-id", None) == "t"
    assert Identity(trust_tenant_header=True).strip(None) == []
    proxy = Identity.configure(trusted_proxies=["10.0.0.0/8"])
    assert proxy.tenant(fid, "x-tenant-id", inside) == "t" and proxy.strip(inside) == []
    assert proxy.tenant(fid, "x-tenant-id", outside) is None
    own = Identity.configure(trusted_header="x-auth", trusted_proxies=["10.0.0.0/8"])
    assert own.tenant(fid, "x-tenant-id", inside) is None  # the proxy speaks with its own header
    assert own.tenant({**fid, "x-auth": "a"}, "x-tenant-id", inside) == "a"
    assert set(own.strip(inside)) == set(contract.FAIRNESS_ID_HEADERS)
