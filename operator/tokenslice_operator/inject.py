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
    kv_offload_gib: float = 0.0
    """vLLM's native CPU KV offload for the vLLM container (GiB); 0: leave vLLM's flags alone."""


OFFLOAD_FLAGS = ("--kv-offloading-size", "--kv-transfer-config")
"""A vLLM command line with one of these configures its own offload: injection adds none."""


def _add_offload(vllm: Manifest, gib: float) -> None:
    """Turn on vLLM's native CPU offload (paused requests' KV survives GPU eviction) unless the pod set its own."""
    if any(flag in arg for arg in _command(vllm) for flag in OFFLOAD_FLAGS):
        return
    vllm["args"] = list(vllm.get("args") or []) + ["--kv-offloading-size", f"{gib:g}",
                                                   "--kv-offloading-backend", "native"]


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


def _ports_in_args(args: list[str]) -> list[int]:
    """Every ``--port N`` / ``--port=N`` in a command line (also inside shell strings)."""
    out = []
    for i, a in enumerate(args):
        if a == "--port" and i + 1 < len(args) and args[i + 1].isdigit():
            out.append(int(args[i + 1]))
        out += [int(m.group(2)) for m in _PORT_ARG.finditer(a)]
    return out


def _rewrite_port_args(args: list[str], old: int, new: int) -> tuple[list[str], bool]:
    """The command line with ``--port old`` (every spelling) turned into ``--port new``; other ports kept."""
    out, changed, skip = [], False, False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == "--port" and i + 1 < len(args) and args[i + 1] == str(old):
            out += ["--port", str(new)]
            changed = skip = True
            continue
        rewritten = _PORT_ARG.sub(lambda m: f"{m.group(1)}{new}" if m.group(2) == str(old) else m.group(0), a)
        changed = changed or rewritten != a
        out.append(rewritten)
    return out, changed


def _command(c: Manifest) -> list[str]:
    return (c.get("command") or []) + (c.get("args") or [])


def _vllm_container(pod: Manifest, target: int, gpu_resource: str, first: bool) -> Manifest | None:
    """The container serving ``target``: by containerPort, else by ``--port``; for the first target port
    only, else the GPU container or the first one (vLLM's default port 8000 is then implied)."""
    containers = pod["spec"]["containers"]
    for c in containers:
        if any(p.get("containerPort") == target for p in c.get("ports") or []):
            return c
    for c in containers:
        if target in _ports_in_args(_command(c)):
            return c
    if not first:
        return None
    for c in containers:
        if _requests_gpu({"spec": {"containers": [c]}}, gpu_resource):
            return c
    return containers[0]


def _rewire_probe(probe: Manifest | None, target: int, name: str | None, new: int) -> None:
    for kind in ("httpGet", "tcpSocket"):
        handler = (probe or {}).get(kind)
        if handler and handler.get("port") in (target, name):
            handler["port"] = new


def _move_vllm(vllm: Manifest, target: int, new_port: int, vllm_port_name: str) -> str | None:
    """Move the vLLM serving ``target`` to ``new_port`` (its --port, containerPort, probes); the port's old name."""
    port_name = None
    for p in vllm.get("ports") or []:
        if p.get("containerPort") == target:
            port_name = p.pop("name", None)
            p["containerPort"] = new_port
            p["name"] = vllm_port_name
    changed = False
    for key in ("args", "command"):
        if vllm.get(key):
            vllm[key], hit = _rewrite_port_args(vllm[key], target, new_port)
            changed = changed or hit
    if not changed:
        vllm["args"] = list(vllm.get("args") or []) + ["--port", str(new_port)]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        _rewire_probe(vllm.get(probe), target, port_name, new_port)
    return port_name


def _sidecar_container(name: str, target: int, vllm_port: int, port_name: str | None,
                       sidecar: SidecarSpec) -> Manifest:
    return {
        "name": name,
        "image": sidecar.image,
        "imagePullPolicy": sidecar.pull_policy,
        "args": ["sidecar", "--host", "0.0.0.0", "--port", str(target),
                 "--vllm-url", f"http://127.0.0.1:{vllm_port}",
                 "--chunk-url", sidecar.chunk_url, "--chunk-size", str(sidecar.chunk_size),
                 "--advertise", f"$(POD_IP):{target}",
                 "--signing-key-file", f"{SIGNING_MOUNT}/{SIGNING_KEY_FILE}"],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "TOKENSLICE_CHUNK_URL", "value": sidecar.chunk_url},
            {"name": contract.KEY_FILE_ENV, "value": f"{SIGNING_MOUNT}/{SIGNING_KEY_FILE}"},
        ],
        "ports": [{"name": port_name or ("http" if name == SIDECAR_NAME else f"http-{target}"),
                   "containerPort": target, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": target}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        # Pod Security "restricted": no escalation, non-root, all capabilities dropped, RuntimeDefault seccomp
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": SIGNING_VOLUME, "mountPath": SIGNING_MOUNT, "readOnly": True}],
    }


def inject(pod: Manifest, pool: InferencePool, sidecar: SidecarSpec) -> Manifest:
    """The pod with a sidecar in front of the vLLM of every target port (pod must pass ``skip_reason``).

    Each target port is a distinct endpoint (``podIP:port``), so each gets its own sidecar, named
    ``tokenslice-sidecar`` for the first port and ``tokenslice-sidecar-<port>`` for the others.  A further
    port that no container declares (containerPort or ``--port``) is left as it is.
    """
    pod = copy.deepcopy(pod)
    targets = pool.target_ports()
    used = set(targets) | {p.get("containerPort") for c in pod["spec"]["containers"] for p in c.get("ports") or []}
    used |= {port for c in pod["spec"]["containers"] for port in _ports_in_args(_command(c))}
    added: list[Manifest] = []
    for i, target in enumerate(targets):
        vllm = _vllm_container(pod, target, sidecar.gpu_resource, first=i == 0)
        if vllm is None:
            continue
        new_port = next(p for p in range(target + 1, 65536) if p not in used)
        used.add(new_port)
        port_name = _move_vllm(vllm, target, new_port, "vllm" if i == 0 else f"vllm-{target}")
        if sidecar.kv_offload_gib:
            _add_offload(vllm, sidecar.kv_offload_gib)
        name = SIDECAR_NAME if i == 0 else f"{SIDECAR_NAME}-{target}"
        added.append(_sidecar_container(name, target, new_port, port_name, sidecar))

    spec = pod["spec"]
    if sidecar.native:
        for container in added:
            container["restartPolicy"] = "Always"
        spec["initContainers"] = added + list(spec.get("initContainers") or [])
    else:
        spec["containers"] += added
    spec["volumes"] = list(spec.get("volumes") or []) + [
        {"name": SIGNING_VOLUME, "secret": {"secretName": signing_secret_name(pool.metadata.name)}}]
    meta = pod.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), INJECTED_ANNOTATION: pool.metadata.name}
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
