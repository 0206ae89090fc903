"""Who a client request comes from: the tenant an operator can trust, not the one a client claims.

Three sources, most trusted first:

1. an **authenticating proxy** in front of the gateway names the tenant in ``trusted_header``; the
   picker believes it only from a peer inside ``trusted_proxies`` (Envoy reports the peer address as the
   ext_proc attribute ``source.address``) and strips it from everyone else;
2. an **API key**, ``Authorization: Bearer <key>``, looked up in the keys file (a Kubernetes Secret
   mounted as a file, or a local file); a key that matches no entry is refused (401), never downgraded;
3. the policy's ``tenantHeader`` -- a client's word -- only with ``trust_tenant_header`` (loopback
   demos and benchmarks).

A GIE/llm-d fairness id (``contract.FAIRNESS_ID_HEADERS``) names the tenant under the same rules: it is the
trusted proxy's header when no ``trusted_header`` is configured (an auth layer that writes it, as llm-d
deployments do), and a client's word, believed only with ``trust_tenant_header`` (after the policy's tenant
header), otherwise; a fairness id that is not believed is stripped. A GIE/llm-d objective
(``contract.OBJECTIVE_HEADERS``) is a class the client asks for, like the policy's class header, which a request
only gets within its tenant's classes (``SchedulingPolicySpec.resolve``), so it needs no trust.

Anything else is anonymous: the policy's ``defaultTenant``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from tokenslice.contract import FAIRNESS_ID_HEADERS, OBJECTIVE_HEADERS
from tokenslice.policy import Name

SOURCE_ADDRESS_ATTRIBUTE = "source.address"
"""The Envoy attribute (``ip:port`` of the downstream peer) the ext_proc filter is configured to send."""


def first_header(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The first non-blank value among ``names`` (lower-case keys), or None."""
    for name in names:
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


def asked_class(headers: Mapping[str, str], class_header: str) -> str | None:
    """The class a client asks for: the policy's class header, else a GIE/llm-d objective's name."""
    return headers.get(class_header) or first_header(headers, OBJECTIVE_HEADERS)


class IdentityError(ValueError):
    """The request presented credentials that do not hold: answered 401, never served anonymously."""


class ApiKey(BaseModel):
    """One entry of the API-keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tenant: Name
    key: str = Field(min_length=16, repr=False, description="The bearer token a client presents.")


_KEYS = TypeAdapter(list[ApiKey])


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_api_keys(path: str | Path) -> dict[bytes, str]:
    """``{sha256(key): tenant}`` from a YAML list of ``{tenant, key}``; only digests are kept in memory."""
    data = yaml.safe_load(Path(path).read_text()) or []
    entries = _KEYS.validate_python(data)
    table: dict[bytes, str] = {}
    for entry in entries:
        digest = _digest(entry.key)
        if digest in table and table[digest] != entry.tenant:
            raise ValueError(f"{path}: one API key is listed for tenants {table[digest]!r} and {entry.tenant!r}")
        table[digest] = entry.tenant
    return table


@dataclass(frozen=True, slots=True)
class Identity:
    """How the picker decides a client request's tenant (see the module docstring)."""

    api_keys: Mapping[bytes, str] = field(default_factory=dict, repr=False)
    trusted_header: str | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trust_tenant_header: bool = False

    @classmethod
    def configure(cls, *, api_keys_file: str | Path | None = None, trusted_header: str | None = None,
                  trusted_proxies: list[str] | tuple[str, ...] = (), trust_tenant_header: bool = False) -> Identity:
        if trusted_header and not trusted_proxies:
            raise ValueError("a trusted identity header needs the proxies it is trusted from (CIDRs)")
        return cls(api_keys=load_api_keys(api_keys_file) if api_keys_file else {},
                   trusted_header=trusted_header.lower() if trusted_header else None,
                   trusted_proxies=tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies),
                   trust_tenant_header=trust_tenant_header)

    def strip(self, peer: str | None) -> list[str]:
        """Headers that would name a tenant but are not believed from ``peer``: removed before the request goes on."""
        believed = set(self._proxy_headers()) if self._trusted(peer) else set()
        if self.trust_tenant_header:
            believed.update(FAIRNESS_ID_HEADERS)
        named = {*FAIRNESS_ID_HEADERS, *((self.trusted_header,) if self.trusted_header else ())}
        return sorted(named - believed)

    def tenant(self, headers: Mapping[str, str], tenant_header: str, peer: str | None) -> str | None:
        """The tenant named by trusted means, or None (anonymous). Raises IdentityError on a bad API key."""
        if self._trusted(peer):
            named = first_header(headers, self._proxy_headers())
            if named:
                return named
        if self.api_keys:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if auth:
                if scheme.lower() != "bearer" or not token.strip():
                    raise IdentityError("Authorization must be 'Bearer <API key>'")
                tenant = self.api_keys.get(_digest(token.strip()))
                if tenant is None:
                    raise IdentityError("Incorrect API key provided")
                return tenant
        if self.trust_tenant_header:
            return headers.get(tenant_header) or first_header(headers, FAIRNESS_ID_HEADERS)
        return None

    def _proxy_headers(self) -> tuple[str, ...]:
        """What a trusted proxy names the tenant with: its configured header, else a GIE/llm-d fairness id."""
        return (self.trusted_header,) if self.trusted_header else FAIRNESS_ID_HEADERS

    def _trusted(self, peer: str | None) -> bool:
        if not peer or not self.trusted_proxies:
            return False
        host = peer.rsplit(":", 1)[0].strip("[]") if peer.count(":") == 1 or peer.startswith("[") else peer
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)
