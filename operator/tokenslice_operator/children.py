"""The objects one managed InferencePool gets: pure functions from (pool, config) to manifests.

Each manifest is complete (server-side apply owns every field it lists) and carries an
ownerReference to the pool, so Kubernetes' garbage collector removes them with it.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

import yaml

from tokenslice import inferencepool, policy
from tokenslice.inferencepool import InferencePool
from tokenslice_operator.config import (
    API_KEYS_MOUNT,
    GATEWAY_MOUNT,
    MANAGED_BY,
    POLICY_FILE,
    POLICY_GENERATION_ANNOTATION,
    POLICY_LABEL,
    POLICY_MOUNT,
    POOL_LABEL,
    SIGNING_KEY_FILE,
    SIGNING_MOUNT,
    OperatorConfig,
    endpoints_service_name,
    policy_configmap_name,
    signing_secret_name,
)

Manifest = dict[str, Any]
PICKER_COMMAND = "picker"
ENVOY_UID = 101  # the envoy user of the upstream envoyproxy/envoy image


def _labels(pool: InferencePool, component: str) -> dict[str, str]:
    return {**MANAGED_BY, "app.kubernetes.io/name": "tokenslice", "app.kubernetes.io/component": component,
            POOL_LABEL: pool.metadata.name}


def _meta(pool: InferencePool, name: str, component: str, **extra: Any) -> Manifest:
    return {"name": name, "namespace": pool.metadata.namespace, "labels": _labels(pool, component),
            "ownerReferences": [pool.owner_reference()], **extra}


def service_account(pool: InferencePool, picker: str) -> Manifest:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(pool, picker, "endpoint-picker")}


def role(pool: InferencePool, picker: str) -> Manifest:
    """Least privilege for the picker: read its pods, its pool and its policies, nothing else."""
    read = ["get", "list", "watch"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _meta(pool, picker, "endpoint-picker"),
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": read},
            {"apiGroups": [inferencepool.API_GROUP], "resources": [inferencepool.PLURAL], "verbs": read},
            {"apiGroups": [policy.API_GROUP], "resources": [policy.PLURAL], "verbs": read},
        ],
    }


def role_binding(pool: InferencePool, picker: str) -> Manifest:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(pool, picker, "endpoint-picker"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": picker},
        "subjects": [{"kind": "ServiceAccount", "name": picker, "namespace": pool.metadata.namespace}],
    }


def signing_secret(pool: InferencePool) -> Manifest:
    """A fresh random key; created once and never rewritten (rotating it would break in-flight chunks)."""
    key = secrets.token_hex(32).encode()
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": _meta(pool, signing_secret_name(pool.metadata.name), "signing-key"),
        "data": {SIGNING_KEY_FILE: base64.b64encode(key).decode()},
    }


def policy_configmap(pool: InferencePool, picker: str, spec: policy.SchedulingPolicySpec,
                     source: Manifest | None) -> Manifest:
    """The policy file the picker reads (and hot-reloads); labelled with the SchedulingPolicy it came from."""
    body = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    header = (f"# published by tokenslice-operator from SchedulingPolicy {source['metadata']['name']} "
              f"generation {source['metadata'].get('generation', 0)}\n" if source
              else "# no SchedulingPolicy names this pool: tokenslice defaults\n")
    meta = _meta(pool, policy_configmap_name(picker), "endpoint-picker")
    if source:
        meta["labels"][POLICY_LABEL] = source["metadata"]["name"]
        meta["annotations"] = {POLICY_GENERATION_ANNOTATION: str(source["metadata"].get("generation", 0))}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {POLICY_FILE: header + yaml.safe_dump(body, sort_keys=False)}}


def service(pool: InferencePool, picker: str, port: int, config: OperatorConfig) -> Manifest:
    labels = _labels(pool, "endpoint-picker")
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(pool, picker, "endpoint-picker"),
        "spec": {
            "selector": {k: labels[k] for k in ("app.kubernetes.io/component", POOL_LABEL)},
            "ports": [
                {"name": "grpc-ext-proc", "port": port, "targetPort": config.picker_grpc_port,
                 "protocol": "TCP", "appProtocol": "http2"},
                {"name": "metrics", "port": config.picker_metrics_port, "targetPort": config.picker_metrics_port,
                 "protocol": "TCP"},
            ],
        },
    }


RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
"""A container securityContext that passes Pod Security ``restricted``."""


def gateway_service(pool: InferencePool, picker: str, config: OperatorConfig) -> Manifest:
    """The pool's gateway: Envoy beside its picker, where clients and the pool's sidecars (chunks) send requests.

    Named after the pool (``config.gateway_service``), so the sidecars' default chunk URL always names it,
    whatever the picker is called; one per pool, so each pool's chunks meet its own picker and key.
    """
    labels = _labels(pool, "endpoint-picker")
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(pool, config.gateway_service_name(pool.metadata.name), "gateway"),
        "spec": {
            "selector": {k: labels[k] for k in ("app.kubernetes.io/component", POOL_LABEL)},
            "ports": [{"name": "http", "port": config.gateway_port, "targetPort": "gateway", "protocol": "TCP"}],
        },
    }


def fail_open(pool: InferencePool) -> bool:
    ref = pool.spec.endpoint_picker_ref
    return ref is not None and ref.failure_mode == "FailOpen"


def endpoints_service(pool: InferencePool) -> Manifest:
    """A FailOpen pool's own pods, headless: its gateway resolves the name to every ready pod and routes to them
    round robin while the picker is unreachable (``tokenslice picker --envoy-fail-open``)."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(pool, endpoints_service_name(pool.metadata.name), "pool-endpoints"),
        "spec": {
            "clusterIP": "None",
            "selector": pool.selector(),
            "ports": [{"name": f"target-{n}", "port": n, "targetPort": n, "protocol": "TCP"}
                      for n in pool.target_ports()],
        },
    }


def _identity_args(pool: InferencePool, config: OperatorConfig) -> tuple[list[str], list[Manifest], list[Manifest]]:
    """The picker's who-is-the-client flags (``tokenslice.identity``), with the API-keys Secret's volume + mount."""
    args: list[str] = []
    volumes: list[Manifest] = []
    mounts: list[Manifest] = []
    secret = config.api_keys_secret_of(pool.metadata.name)
    if secret:
        key = config.picker_api_keys_key
        args += ["--api-keys-file", f"{API_KEYS_MOUNT}/{key}"]
        volumes.append({"name": "api-keys", "secret": {"secretName": secret, "items": [{"key": key, "path": key}]}})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    if config.picker_trusted_proxies:
        args += ["--trusted-proxies", ",".join(config.picker_trusted_proxies)]
    if config.picker_identity_header:
        args += ["--identity-header", config.picker_identity_header]
    return args, volumes, mounts


def deployment(pool: InferencePool, picker: str, config: OperatorConfig) -> Manifest:
    """One pod of the pool's picker and its gateway (Envoy -> ext_proc on the pod's loopback).

    One replica: the picker holds the pool's scheduling state (queues, fair-share counters).  The
    gateway's Envoy bootstrap is written by the picker image itself (``--print-envoy-config``) into an
    emptyDir, so the running proxy is the one the picker's own tests exercise.
    """
    m = pool.metadata
    labels = _labels(pool, "endpoint-picker")
    selector = {k: labels[k] for k in ("app.kubernetes.io/component", POOL_LABEL)}
    args = [PICKER_COMMAND, "--grpc-host", "0.0.0.0", "--grpc-port", str(config.picker_grpc_port),
            "--metrics-host", "0.0.0.0", "--metrics-port", str(config.picker_metrics_port),
            "--policy", f"{POLICY_MOUNT}/{POLICY_FILE}", "--signing-key-file", f"{SIGNING_MOUNT}/{SIGNING_KEY_FILE}",
            "--kube", "--pool", m.name, "--namespace", m.namespace]
    if config.picker_max_slice_tokens is not None:  # else the picker's own default: long slices
        args += ["--max-slice-tokens", str(config.picker_max_slice_tokens)]
    if config.kv_residency:
        args.append("--kv-residency")
    if config.kv_offload_tokens:
        args += ["--kv-offload-tokens", str(config.kv_offload_tokens)]
    identity, identity_volumes, identity_mounts = _identity_args(pool, config)
    args += identity
    container = {
        "name": "picker",
        "image": config.picker_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": args,
        "ports": [{"name": "grpc-ext-proc", "containerPort": config.picker_grpc_port, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": config.picker_metrics_port, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": config.picker_grpc_port}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": config.picker_grpc_port}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "policy", "mountPath": POLICY_MOUNT, "readOnly": True},
                         {"name": "signing", "mountPath": SIGNING_MOUNT, "readOnly": True}, *identity_mounts],
    }
    envoy_file = f"{GATEWAY_MOUNT}/envoy.yaml"
    render = [PICKER_COMMAND, "--print-envoy-config", "--grpc-port", str(config.picker_grpc_port),
              "--envoy-listen-address", "0.0.0.0", "--envoy-listen-port", str(config.gateway_port),
              "--envoy-admin-address", "127.0.0.1", "--envoy-admin-port", str(config.gateway_admin_port),
              "--envoy-ext-proc-host", "127.0.0.1"]
    if fail_open(pool):
        host = f"{endpoints_service_name(m.name)}.{m.namespace}.svc"
        render += ["--envoy-fail-open", ",".join(f"{host}:{n}" for n in pool.target_ports())]
    gateway_config = {
        "name": "gateway-config",
        "image": config.picker_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["sh", "-c", f'exec tokenslice "$@" > {envoy_file}', "render-envoy-config"],
        "args": render,
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "gateway", "mountPath": GATEWAY_MOUNT}],
    }
    gateway = {
        "name": "gateway",
        "image": config.gateway_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["envoy"],
        "args": ["-c", envoy_file, "--log-level", "warn", "--disable-hot-restart"],
        "ports": [{"name": "gateway", "containerPort": config.gateway_port, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": config.gateway_port}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {**RESTRICTED, "runAsUser": ENVOY_UID},
        "volumeMounts": [{"name": "gateway", "mountPath": GATEWAY_MOUNT, "readOnly": True}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(pool, picker, "endpoint-picker"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # never two pickers scheduling one pool
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": picker,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [gateway_config],
                    "containers": [container, gateway],
                    "volumes": [
                        {"name": "policy", "configMap": {"name": policy_configmap_name(picker)}},
                        {"name": "signing", "secret": {"secretName": signing_secret_name(m.name)}},
                        {"name": "gateway", "emptyDir": {}},
                        *identity_volumes,
                    ],
                },
            },
        },
    }
