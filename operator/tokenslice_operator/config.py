"""What the operator is told at start-up (flags / chart values), and the names it agrees on.

The conventions below are the operator's public contract with users and the chart:

* an ``InferencePool`` is *managed* when it carries the label ``tokenslice.io/managed: "true"``;
  its ``spec.endpointPickerRef`` (kind Service, core group) names the picker Service the operator
  creates, and ``endpointPickerRef.port.number`` is that Service's ext_proc port;
* every child object carries ``tokenslice.io/pool: <pool>`` and is owned by the pool;
* pods opt out of injection with the annotation ``tokenslice.io/inject: "false"`` and opt in
  (without a GPU request) with the label ``tokenslice.io/inject: "true"``.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, Field, field_validator, model_validator

MANAGED_LABEL = "tokenslice.io/managed"
POOL_LABEL = "tokenslice.io/pool"
POLICY_LABEL = "tokenslice.io/policy"
POLICY_GENERATION_ANNOTATION = "tokenslice.io/policy-generation"
INJECT_KEY = "tokenslice.io/inject"
INJECTED_ANNOTATION = "tokenslice.io/injected"
CHUNK_URL_ANNOTATION = "tokenslice.io/chunk-url"
MANAGED_BY = {"app.kubernetes.io/managed-by": "tokenslice-operator"}
CONTROLLER_NAME = "tokenslice.io/operator"
SIDECAR_NAME = "tokenslice-sidecar"
POLICY_FILE = "policy.yaml"
SIGNING_KEY_FILE = "key"
POLICY_MOUNT = "/etc/tokenslice/policy"
SIGNING_MOUNT = "/var/run/tokenslice/signing"
GATEWAY_MOUNT = "/etc/tokenslice/gateway"
API_KEYS_MOUNT = "/var/run/tokenslice/api-keys"


def signing_secret_name(pool: str) -> str:
    return f"{pool}-tokenslice-signing"


def policy_configmap_name(picker: str) -> str:
    return f"{picker}-policy"


def endpoints_service_name(pool: str) -> str:
    """The headless Service of a FailOpen pool's own pods: where its gateway routes while the picker is down."""
    return f"{pool}-endpoints"


class OperatorConfig(BaseModel):
    """Operator settings; every field has a ``tokenslice operator`` flag and a chart value."""

    picker_image: str = "ghcr.io/tokenslice/picker:0.1.0"
    sidecar_image: str = "ghcr.io/tokenslice/sidecar:0.1.0"
    gateway_image: str = Field(default="docker.io/envoyproxy/envoy:v1.40.0",
                               description="Envoy of each pool's gateway (the version the tests run)")
    image_pull_policy: str = "IfNotPresent"
    picker_grpc_port: int = Field(default=9002, ge=1, le=65535, description="container port of the picker")
    picker_metrics_port: int = Field(default=9090, ge=1, le=65535)
    gateway_service: str = Field(default="{pool}-gateway", description="Service of each pool's gateway")
    gateway_port: int = Field(default=8080, ge=1, le=65535, description="port of each pool's gateway")
    gateway_admin_port: int = Field(default=9901, ge=1, le=65535, description="Envoy admin, pod loopback only")
    chunk_url: str | None = Field(
        default=None,
        description="URL injected sidecars send chunks to; {pool} and {namespace} are filled in. Default: the "
        f"pool's own gateway Service. A pool's annotation {CHUNK_URL_ANNOTATION} overrides it.")

    def gateway_service_name(self, pool: str) -> str:
        return self.gateway_service.format(pool=pool)

    def chunk_url_of(self, pool: str, namespace: str) -> str:
        """Where the sidecars of a pool send chunks: its gateway Service unless configured otherwise."""
        if self.chunk_url:
            return self.chunk_url.format(pool=pool, namespace=namespace)
        return f"http://{self.gateway_service_name(pool)}.{namespace}.svc:{self.gateway_port}"
    gpu_resource: str = "nvidia.com/gpu"
    picker_max_slice_tokens: int | None = Field(default=None, ge=0, description=(
        "every pool's picker: `tokenslice picker --max-slice-tokens N`; None = the picker's own default (long "
        "slices, cut on demand), 0 = per-slice mode (slices of the class's chunk size, the old behaviour)"))
    kv_residency: bool = Field(default=False, description="every pool's picker schedules residency-aware "
                               "(`tokenslice picker --kv-residency`: resume continuations whose KV is still cached)")
    kv_offload_gib: float = Field(default=0.0, ge=0, description="vLLM's native CPU KV offload per injected vLLM "
                                  "container, GiB (--kv-offloading-size, backend native); 0: off. A pod that sets "
                                  "--kv-offloading-size or --kv-transfer-config itself keeps its own")
    kv_offload_tokens: int = Field(default=0, ge=0, description="that offload tier in tokens, for the picker "
                                   "(--kv-offload-tokens): GiB x 2^30 / KV bytes per token of the model")
    picker_api_keys_secret: str | None = Field(
        default=None, pattern=r"^[a-z0-9{}.-]+$",
        description="Secret in each pool's namespace ({pool} is filled in) holding the picker's API keys, a YAML "
        "list of {tenant, key}, under picker_api_keys_key: mounted read-only, `tokenslice picker --api-keys-file`. "
        "None: no API keys")
    picker_api_keys_key: str = Field(default="api-keys.yaml", pattern=r"^[-._a-zA-Z0-9]+$",
                                     description="the key of that Secret holding the file")
    picker_trusted_proxies: list[str] = Field(
        default_factory=list, description="CIDRs of an authenticating proxy in front of every pool's gateway "
        "(`tokenslice picker --trusted-proxies`)")
    picker_identity_header: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9-]+$",
        description="the header that proxy names the tenant in (`--identity-header`); None: a GIE/llm-d fairness id")
    webhook_port: int = Field(default=9443, ge=0, le=65535)
    webhook_cert: str | None = None
    webhook_key: str | None = None

    @field_validator("picker_trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # ValueError: not a CIDR
        return value

    @model_validator(mode="after")
    def _header_needs_proxies(self) -> OperatorConfig:
        if self.picker_identity_header and not self.picker_trusted_proxies:
            raise ValueError("picker_identity_header needs picker_trusted_proxies (the proxies it is believed from)")
        return self

    def api_keys_secret_of(self, pool: str) -> str | None:
        return self.picker_api_keys_secret.format(pool=pool) if self.picker_api_keys_secret else None
