"""The InferencePool (upstream ``inference.networking.k8s.io/v1``): one model for everything that reads a pool.

The operator (children, injection, webhook, reconcile) and the picker's Kubernetes datastore read pools
only through this model, so all of them accept and refuse the same objects.  It mirrors the upstream
Go types (``api/v1/inferencepool_types.go`` of kubernetes-sigs/gateway-api-inference-extension) with
their defaults; unknown fields are kept (a newer upstream release may add some) and never rejected.
The two CEL rules of the upstream CRD ("port number must be unique", "port is required when kind is
'Service'") are part of the model (``parse`` refuses what breaks them), so an API server that does not
enforce them still gets them.  ``served`` is the one rule of which pools tokenslice serves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

API_GROUP = "inference.networking.k8s.io"
API_VERSION = "v1"
KIND = "InferencePool"
PLURAL = "inferencepools"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
H2C = "kubernetes.io/h2c"


class PoolError(ValueError):
    """The pool cannot be used as tokenslice needs it (the message says why, for the pool's status)."""


class UnsupportedPool(PoolError):
    """A valid pool that asks for something tokenslice does not do (it is then neither served nor injected)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)


class ObjectMeta(_Model):
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    resource_version: str = Field(default="", alias="resourceVersion")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    deletion_timestamp: str | None = Field(default=None, alias="deletionTimestamp")


class LabelSelector(_Model):
    match_labels: dict[str, str] = Field(alias="matchLabels", min_length=1)


class Port(_Model):
    number: int = Field(ge=1, le=65535)


class EndpointPickerRef(_Model):
    group: str = ""
    kind: str = "Service"
    name: str = Field(min_length=1)
    port: Port | None = None
    failure_mode: Literal["FailOpen", "FailClose"] = Field(default="FailClose", alias="failureMode")

    @model_validator(mode="after")
    def _port_required_for_services(self) -> EndpointPickerRef:
        # upstream CEL: self.kind != 'Service' || has(self.port)
        if self.kind == "Service" and self.port is None:
            raise ValueError("endpointPickerRef.port is required when kind is 'Service'")
        return self


class InferencePoolSpec(_Model):
    selector: LabelSelector
    target_ports: list[Port] = Field(alias="targetPorts", min_length=1, max_length=8)
    app_protocol: Literal["http", "kubernetes.io/h2c"] = Field(default="http", alias="appProtocol")
    endpoint_picker_ref: EndpointPickerRef | None = Field(default=None, alias="endpointPickerRef")

    @model_validator(mode="after")
    def _unique_ports(self) -> InferencePoolSpec:
        # upstream CEL: self.all(p1, self.exists_one(p2, p1.number == p2.number))
        ports = [p.number for p in self.target_ports]
        if len(ports) != len(set(ports)):
            raise ValueError("spec.targetPorts: port number must be unique")
        return self


class InferencePool(_Model):
    """A whole InferencePool object as the API server returns it (``status`` kept as plain data)."""

    api_version: str = Field(default=GROUP_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta
    spec: InferencePoolSpec
    status: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> InferencePool:
        """The model of a pool object; PoolError (not pydantic's error) when it is not a valid v1 pool."""
        try:
            return cls.model_validate(obj)
        except ValueError as exc:
            name = ((obj or {}).get("metadata") or {}).get("name", "?")
            raise PoolError(f"InferencePool {name} is not a valid {GROUP_VERSION} pool: {exc}") from None

    def selector(self) -> dict[str, str]:
        """The labels a pod must all carry (same namespace) to be a member."""
        return dict(self.spec.selector.match_labels)

    def selects(self, labels: dict[str, str] | None) -> bool:
        """Whether a pod with these labels is a member of the pool."""
        labels = labels or {}
        return all(labels.get(k) == v for k, v in self.spec.selector.match_labels.items())

    def label_selector(self) -> str:
        """The selector as a Kubernetes ``labelSelector`` query string."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.spec.selector.match_labels.items()))

    def target_ports(self) -> list[int]:
        """Every target port, in order; each is a distinct endpoint ``podIP:port`` (unique: checked by parse)."""
        return [p.number for p in self.spec.target_ports]

    def picker_ref(self) -> tuple[str, int]:
        """(Service name, service port) of the pool's endpoint picker; PoolError when it names none usable."""
        ref = self.spec.endpoint_picker_ref
        if ref is None:
            raise PoolError("spec.endpointPickerRef is not set; tokenslice needs it to name its picker Service")
        if ref.group != "" or ref.kind != "Service":
            raise PoolError(f"endpointPickerRef must be a core Service, not {ref.group}/{ref.kind}")
        if ref.port is None:  # parse refuses it already (the CEL rule); kept for a model built by hand
            raise PoolError("endpointPickerRef.port is required when kind is 'Service'")
        return ref.name, ref.port.number

    def check_supported(self) -> None:
        """UnsupportedPool when serving the pool would break what it asks for.

        ``appProtocol: kubernetes.io/h2c`` makes gateways speak HTTP/2 cleartext to the target ports, where
        the sidecar serves HTTP/1.1 only: taking the port over would break the pool, so tokenslice declines.
        """
        if self.spec.app_protocol == H2C:
            raise UnsupportedPool(f"appProtocol {H2C} is not supported: the tokenslice sidecar that takes over "
                                  "the target port serves HTTP/1.1 only")

    def owner_reference(self) -> dict[str, Any]:
        """The ownerReference that makes an object the pool's child (garbage-collected with it)."""
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.metadata.name,
                "uid": self.metadata.uid, "controller": True, "blockOwnerDeletion": True}


def served(obj: dict[str, Any]) -> InferencePool:
    """The pool if tokenslice serves it, else PoolError (UnsupportedPool) saying why: the one rule.

    Valid upstream v1 (schema and both CEL rules), its endpointPickerRef a core Service, and nothing that
    tokenslice declines (``check_supported``).  The operator's reconciler, its webhook and the picker all
    decide by this, so a pool one of them refuses is neither given a picker, nor injected, nor served.
    """
    pool = InferencePool.parse(obj)
    pool.picker_ref()
    pool.check_supported()
    return pool


def path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    """REST path of the pools of a namespace, or of one pool (and a subresource such as ``status``)."""
    out = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out
