"""Sidecar injection: a pure function from (pod, pool) to the mutated pod.

The sidecar takes over the pool's target port (so the Gateway and the picker keep
addressing ``podIP:targetPort``) and vLLM moves to a free port behind it on loopback.
Everything else in the pod stays as the user wrote it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from tokenslice import contract
from tokenslice.inferencepool import InferencePool
from tokenslice_operator.config import (
    INJECT_KEY,
    INJECTED_ANNOTATION,
    SIDECAR_NAME,
    SIGNING_KEY_FILE,
    SIGNING_MOUNT,
    signing_secret_name,
)

Manifest = dict[str, Any]
SIGNING_VOLUME = "tokenslice-signing"


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    image: str
    chunk_url: str
    chunk_size: int
    native: bool
    """initContainer with restartPolicy Always (Kubernetes >= 1.29) instead of a plain container."""
    pull_policy: str = "IfNotPresent"
    gpu_resource: str = "nvidia.com/gpu"


def _requests_gpu(pod: Manifest, resource: str) -> bool:
    for c in pod.get("spec", {}).get("containers") or []:
        res = c.get("resources") or {}
        if resource in (res.get("limits") or {}) or resource in (res.get("requests") or {}):
            return True
    return False


def skip_reason(pod: Manifest, gpu_resource: str) -> str | None:
    """Why a pod selected by a managed pool is left alone (None: inject)."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if annotations.get(INJECT_KEY) == "false":
        return "opted out"
    spec = pod.get("spec") or {}
    if INJECTED_ANNOTATION in annotations or any(
            c.get("name") == SIDECAR_NAME for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])):
        return "already injected"
    if not _requests_gpu(pod, gpu_resource) and (meta.get("labels") or {}).get(INJECT_KEY) != "true":
        return f"requests no {gpu_resource} and has no {INJECT_KEY}=true label"
    return None


_PORT_ARG = re.compile(r"(--port(?:=|\s+))(\d+)")


def _port_in_args(args: list[str]) -> int | None:
    for i, a in enumerate(args):
        if a == "--port" and i + 1 < len(args) and args[i + 1].isdigit():
            return int(args[i + 1])
        m = _PORT_ARG.search(a)
        if m:
            return int(m.group(2))
    return None


def _rewrite_port_args(args: list[str], new: int) -> tuple[list[str], bool]:
    out, changed, skip = [], False, False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == "--port" and i + 1 < len(args):
            out += ["--port", str(new)]
            changed = skip = True
        elif _PORT_ARG.search(a):
            out.append(_PORT_ARG.sub(lambda m: f"{m.group(1)}{new}", a))
            changed = True
        else:
            out.append(a)
    return out, changed


def _vllm_container(pod: Manifest, target: int, gpu_resource: str) -> Manifest:
    containers = pod["spec"]["containers"]
    for c in containers:
        if any(p.get("containerPort") == target for p in c.get("ports") or []):
            return c
    for c in containers:
        if _port_in_args((c.get("command") or []) + (c.get("args") or [])) == target:
            return c
    for c in containers:
        if _requests_gpu({"spec": {"containers": [c]}}, gpu_resource):
            return c
    return containers[0]


def _free_port(pod: Manifest, avoid: int) -> int:
    used = {avoid} | {p.get("containerPort") for c in pod["spec"]["containers"] for p in c.get("ports") or []}
    port = avoid + 1
    while port in used:
        port += 1
    return port if port <= 65535 else 18000


def _rewire_probe(probe: Manifest | None, target: int, name: str | None, new: int) -> None:
    for kind in ("httpGet", "tcpSocket"):
        handler = (probe or {}).get(kind)
        if handler and handler.get("port") in (target, name):
            handler["port"] = new


def inject(pod: Manifest, pool: InferencePool, sidecar: SidecarSpec) -> Manifest:
    """The pod with the sidecar in front of vLLM (pod must already pass ``skip_reason``)."""
    pod = copy.deepcopy(pod)
    pool_name = pool.metadata.name
    target = pool.target_ports()[0]
    vllm = _vllm_container(pod, target, sidecar.gpu_resource)
    new_port = _free_port(pod, target)

    # vLLM moves behind the sidecar: its --port (explicit or vLLM's default 8000) and containerPort.
    port_name = None
    for p in vllm.get("ports") or []:
        if p.get("containerPort") == target:
            port_name = p.pop("name", None)
            p["containerPort"] = new_port
            p["name"] = "vllm"
    changed = False
    for key in ("args", "command"):
        if vllm.get(key):
            vllm[key], hit = _rewrite_port_args(vllm[key], new_port)
            changed = changed or hit
    if not changed:
        vllm["args"] = list(vllm.get("args") or []) + ["--port", str(new_port)]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        _rewire_probe(vllm.get(probe), target, port_name, new_port)

    container: Manifest = {
        "name": SIDECAR_NAME,
        "image": sidecar.image,
        "imagePullPolicy": sidecar.pull_policy,
        "args": ["sidecar", "--port", str(target), "--vllm-url", f"http://127.0.0.1:{new_port}",
                 "--chunk-url", sidecar.chunk_url, "--chunk-size", str(sidecar.chunk_size),
                 "--advertise", f"$(POD_IP):{target}",
                 "--signing-key-file", f"{SIGNING_MOUNT}/{SIGNING_KEY_FILE}"],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "TOKENSLICE_CHUNK_URL", "value": sidecar.chunk_url},
            {"name": contract.KEY_FILE_ENV, "value": f"{SIGNING_MOUNT}/{SIGNING_KEY_FILE}"},
        ],
        "ports": [{"name": port_name or "http", "containerPort": target, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": target}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": SIGNING_VOLUME, "mountPath": SIGNING_MOUNT, "readOnly": True}],
    }
    spec = pod["spec"]
    if sidecar.native:
        container["restartPolicy"] = "Always"
        spec["initContainers"] = [container] + list(spec.get("initContainers") or [])
    else:
        spec["containers"].append(container)
    spec["volumes"] = list(spec.get("volumes") or []) + [
        {"name": SIGNING_VOLUME, "secret": {"secretName": signing_secret_name(pool_name)}}]
    meta = pod.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), INJECTED_ANNOTATION: pool_name}
    return pod


def json_patch(before: Manifest, after: Manifest) -> list[Manifest]:
    """RFC 6902 ops turning ``before`` into ``after`` for the parts ``inject`` touches."""
    ops: list[Manifest] = []
    for parent, key in (("metadata", "annotations"), ("spec", "containers"), ("spec", "initContainers"),
                        ("spec", "volumes")):
        old, new = before.get(parent, {}).get(key), after.get(parent, {}).get(key)
        if old != new:
            ops.append({"op": "replace" if old is not None else "add", "path": f"/{parent}/{key}", "value": new})
    return ops
