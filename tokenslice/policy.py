"""The SchedulingPolicy schema: one pydantic model shared by the gateway, the operator and the CRD.

The CRD's OpenAPI schema in ``crds/`` is generated from (and checked against) these
models, so the gateway, the operator and the API server can never disagree about
what a policy is.  Field names are camelCase on the wire (Kubernetes style) and
snake_case in Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from tokenslice import inferencepool

API_GROUP = "tokenslice.io"
API_VERSION = "v1alpha1"
KIND = "SchedulingPolicy"
PLURAL = "schedulingpolicies"

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class PriorityClass(_Model):
    """A class of service. Higher ``priority`` is served first at every chunk boundary."""

    name: Name
    priority: int = Field(ge=0, le=1_000_000, description="Higher runs first.")
    chunk_size: int | None = Field(default=None, ge=1, le=8192,
                                   description="Decode tokens per time slice; defaults to the policy's chunkSize.")
    preemptible: bool = Field(default=True, description="Whether its requests may be paused at chunk boundaries.")
    ttft_seconds: float | None = Field(default=None, gt=0, description="Time-to-first-token objective.")
    tpot_seconds: float | None = Field(default=None, gt=0, description="Time-per-output-token objective.")
    starvation_seconds: float | None = Field(
        default=30.0, gt=0,
        description="Longest a queued chunk of this class waits before it is aged to the top priority.")


class Tenant(_Model):
    """A consumer of the pool, identified by the policy's tenant header."""

    name: Name
    weight: float = Field(default=1.0, gt=0, le=1000, description="Fair-share weight inside a class.")
    allowed_classes: list[Name] | None = Field(
        default=None, description="Classes the tenant may use; all when unset.")
    default_class: Name | None = Field(default=None, description="Class used when a request names none.")
    max_concurrency: int | None = Field(default=None, ge=1, description="In-flight requests at most.")
    tokens_per_second: float | None = Field(default=None, gt=0, description="Token-rate limit (input+output).")


class FairnessWeights(_Model):
    """Cost of one token in the virtual token counter."""

    input: float = Field(default=1.0, ge=0)
    output: float = Field(default=2.0, ge=0)


class QueueLimits(_Model):
    max_queued_chunks: int = Field(default=10_000, ge=1, description="Beyond this, new requests are shed (429).")
    max_queued_per_tenant: int = Field(default=2_000, ge=1)
    queue_ttl_seconds: float = Field(default=120.0, gt=0,
                                     description="A first chunk queued longer than this is shed (429).")
    max_open_requests: int = Field(default=10_000, ge=1,
                                   description="Client requests admitted and not yet answered, all tenants together; "
                                               "beyond this, new requests are shed (429).")


class RequestLimits(_Model):
    """Ceilings on what one client request may ask for; beyond them it is refused (400) before it runs."""

    max_tokens: int | None = Field(default=None, ge=1, description="Largest max_tokens; also the budget of a "
                                   "request that names none (else: up to the context length).")
    max_n: int = Field(default=16, ge=1, le=1024, description="Largest n (and best_of): sequences per request.")


class PoolRef(_Model):
    name: Name
    group: str = inferencepool.API_GROUP
    kind: str = inferencepool.KIND


class SchedulingPolicySpec(_Model):
    """``spec`` of the SchedulingPolicy CR; also the local-mode policy YAML."""

    pool_ref: PoolRef | None = Field(default=None, description="The InferencePool this policy governs.")
    chunk_size: int = Field(default=32, ge=1, le=8192, description="Default decode tokens per time slice.")
    slots_per_endpoint: int = Field(default=8, ge=1, le=4096,
                                    description="Chunks that may run at once on one endpoint.")
    reserved_slots_per_endpoint: int = Field(
        default=0, ge=0, le=4095,
        description="Slots of each endpoint that only non-preemptible classes may take (preemptible chunks "
                    "run while fewer than slotsPerEndpoint - reservedSlotsPerEndpoint are granted); must be "
                    "less than slotsPerEndpoint. Run vLLM with max-num-seqs >= slotsPerEndpoint.")
    tenant_header: str = Field(default="x-tenant-id", pattern=r"^[a-z0-9-]+$",
                               description="Request header naming the tenant.")
    class_header: str = Field(default="x-priority-class", pattern=r"^[a-z0-9-]+$",
                              description="Request header asking for a (lower or equal) class.")
    default_tenant: Name = Field(default="default", description="Tenant of requests without the header.")
    default_class: Name | None = Field(default=None, description="Class when neither request nor tenant names one.")
    priority_classes: list[PriorityClass] = Field(
        default_factory=lambda: [PriorityClass(name="standard", priority=100)], min_length=1)
    tenants: list[Tenant] = Field(default_factory=list)
    fairness: FairnessWeights = Field(default_factory=FairnessWeights)
    queue: QueueLimits = Field(default_factory=QueueLimits)
    limits: RequestLimits = Field(default_factory=RequestLimits)

    @model_validator(mode="after")
    def _consistent(self) -> SchedulingPolicySpec:
        problems = policy_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- lookups used on the scheduling hot path ------------------------------
    def klass(self, name: str) -> PriorityClass | None:
        for c in self.priority_classes:
            if c.name == name:
                return c
        return None

    def tenant(self, name: str) -> Tenant | None:
        for t in self.tenants:
            if t.name == name:
                return t
        return None

    def class_chunk_size(self, klass: PriorityClass) -> int:
        """Decode tokens per time slice for requests of ``klass``: its own chunkSize, else the policy's."""
        return klass.chunk_size or self.chunk_size

    def class_slots(self, klass: PriorityClass) -> int:
        """Slots of an endpoint that chunks of ``klass`` may fill: the reserve is for non-preemptible classes."""
        if klass.preemptible:
            return self.slots_per_endpoint - self.reserved_slots_per_endpoint
        return self.slots_per_endpoint

    def lowest_class(self) -> PriorityClass:
        return min(self.priority_classes, key=lambda c: c.priority)

    def resolve(self, tenant_name: str | None, asked_class: str | None) -> tuple[str, PriorityClass]:
        """Tenant and class for a client request.

        A request gets the class it asks for when its tenant is allowed that class, or when the class is
        preemptible and strictly below the tenant's ceiling (the highest allowed class): nothing to gain
        there. Anything else -- a higher class, or one at the ceiling's priority but outside the list,
        which could differ in preemptibility, reserved slots or slice -- falls back to the default.
        Unknown tenants fall back to ``default_tenant``.
        """
        tenant = self.tenant(tenant_name) if tenant_name else None
        if tenant is None:
            tenant = self.tenant(self.default_tenant)
        tname = tenant.name if tenant else self.default_tenant
        allowed = [c for c in self.priority_classes
                   if tenant is None or tenant.allowed_classes is None or c.name in tenant.allowed_classes]
        default_name = (tenant.default_class if tenant and tenant.default_class else None) or self.default_class
        default = self.klass(default_name) if default_name else None
        if default is None or default not in allowed:
            default = min(allowed, key=lambda c: c.priority)
        asked = self.klass(asked_class) if asked_class else None
        if asked is None:
            return tname, default
        ceiling = max(allowed, key=lambda c: c.priority)
        grantable = asked in allowed or (asked.preemptible and asked.priority < ceiling.priority)
        return tname, (asked if grantable else default)


def policy_problems(spec: SchedulingPolicySpec) -> list[str]:
    """Cross-field checks the OpenAPI schema cannot express (shared with the operator's status)."""
    problems: list[str] = []
    names = [c.name for c in spec.priority_classes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"duplicate priority classes: {', '.join(dup)}")
    tnames = [t.name for t in spec.tenants]
    dup = sorted({n for n in tnames if tnames.count(n) > 1})
    if dup:
        problems.append(f"duplicate tenants: {', '.join(dup)}")
    if spec.reserved_slots_per_endpoint >= spec.slots_per_endpoint:
        problems.append(f"reservedSlotsPerEndpoint ({spec.reserved_slots_per_endpoint}) must be less than "
                        f"slotsPerEndpoint ({spec.slots_per_endpoint}): preemptible classes need a slot")
    if spec.reserved_slots_per_endpoint and all(c.preemptible for c in spec.priority_classes):
        problems.append("reservedSlotsPerEndpoint is set but every priority class is preemptible: "
                        "the reserved slots would stay idle")
    known = set(names)
    if spec.default_class and spec.default_class not in known:
        problems.append(f"defaultClass {spec.default_class!r} is not a priority class")
    for t in spec.tenants:
        if t.allowed_classes == []:
            problems.append(f"tenant {t.name!r} has an empty allowedClasses: it could use no class at all "
                            "(leave it unset to allow every class)")
        for c in t.allowed_classes or []:
            if c not in known:
                problems.append(f"tenant {t.name!r} allows unknown class {c!r}")
        if t.default_class and t.default_class not in known:
            problems.append(f"tenant {t.name!r} has unknown defaultClass {t.default_class!r}")
        elif t.default_class and t.allowed_classes is not None and t.default_class not in t.allowed_classes:
            problems.append(f"tenant {t.name!r} defaultClass {t.default_class!r} is not among its allowedClasses")
    return problems


def load_policy(path: str | Path) -> SchedulingPolicySpec:
    """Read a policy YAML: either a bare spec or a whole SchedulingPolicy object."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(data, dict) and data.get("kind") == KIND:
        data = data.get("spec") or {}
    return SchedulingPolicySpec.model_validate(data)
