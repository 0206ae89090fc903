"""Shared state of the Kubernetes tests: CRDs installed, the operator running in-process.

The operator runs in a background thread (its own event loop, as kopf documents for embedding)
against the session's real kube-apiserver, *as a non-admin user bound to the chart's own
ClusterRole* -- so every operator test also proves the chart's RBAC is sufficient.  Its webhook
listens on a free loopback port with a certificate from the test CA and is registered with the
API server through a MutatingWebhookConfiguration.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import KUBE_BIN, OPERATOR_TOKEN, OPERATOR_USER, KubeCluster, free_port, wait_for
from tokenslice.paths import REPO_ROOT
from tokenslice_operator.app import RunOptions, run_operator
from tokenslice_operator.config import OperatorConfig

pytestmark = pytest.mark.k8s
CHART = REPO_ROOT / "charts" / "tokenslice"
CRDS = REPO_ROOT / "crds"
PICKER_API_KEYS_SECRET = "{pool}-api-keys"
PICKER_PROXIES = ["10.20.0.0/16"]


@dataclass
class OperatorThread:
    """One in-process operator replica; ``stop()`` ends it the way a SIGTERM would."""

    opts: RunOptions
    name: str = "operator"
    stop_flag: threading.Event = field(default_factory=threading.Event)
    ready_flag: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> OperatorThread:
        def main() -> None:
            try:
                asyncio.run(run_operator(self.opts, stop_flag=self.stop_flag, ready_flag=self.ready_flag))
            except BaseException as exc:  # noqa: BLE001 -- surfaced by wait_ready/stop
                self.error = exc

        self.thread = threading.Thread(target=main, name=self.name, daemon=True)
        self.thread.start()
        wait_for(lambda: self.ready_flag.is_set() or self.error, 60, f"{self.name} to start")
        if self.error:
            raise RuntimeError(f"{self.name} failed to start") from self.error
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        if self.thread:
            self.thread.join(timeout=60)
            assert not self.thread.is_alive(), f"{self.name} did not stop"


def chart_cluster_role() -> dict[str, Any]:
    """The operator ClusterRole exactly as the chart renders it."""
    out = subprocess.run([str(KUBE_BIN / "helm"), "template", "rbac-probe", str(CHART),
                          "--show-only", "templates/rbac.yaml"], capture_output=True, text=True, check=True).stdout
    return next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "ClusterRole")


@pytest.fixture(scope="session")
def crds(kube_cluster: KubeCluster) -> KubeCluster:
    """`kubectl apply -f crds/` (the documented install path) as the v1.20 test server takes it, until served.

    ``install_crds`` drops the InferencePool CRD's CEL rules and empty-string default for this old server only
    (``tests.fixtures.kube.for_test_server``); the rules are checked on a modern server in test_crd_cel.py.
    """
    kube_cluster.install_crds(CRDS)
    kube_cluster.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "tokenslice"}})
    return kube_cluster


@pytest.fixture(scope="session")
def operator_kubeconfig(crds: KubeCluster) -> Path:
    """Credentials of a plain user holding only the chart's operator ClusterRole."""
    role = chart_cluster_role()
    role["metadata"] = {"name": "tokenslice-test-operator"}
    crds.apply(role)
    crds.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "tokenslice-test-operator"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "tokenslice-test-operator"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}]})
    return crds.kubeconfig_for(OPERATOR_TOKEN, "operator")


def operator_options(cluster: KubeCluster, kubeconfig: Path, *, webhook: bool = True, priority: int = 100,
                     picker_image: str = "test/picker:a") -> RunOptions:
    cert, key = cluster.ca.issue("webhook", ["127.0.0.1"])
    config = OperatorConfig(picker_image=picker_image, sidecar_image="test/sidecar:1",
                            webhook_port=free_port() if webhook else 0,
                            webhook_cert=str(cert), webhook_key=str(key),
                            picker_api_keys_secret=PICKER_API_KEYS_SECRET, picker_trusted_proxies=PICKER_PROXIES)
    return RunOptions(kubeconfig=str(kubeconfig), config=config, webhook_host="127.0.0.1", priority=priority)


@pytest.fixture(scope="session")
def operator(crds: KubeCluster, operator_kubeconfig: Path) -> Iterator[OperatorThread]:
    """The session's operator (+ webhook registered with the API server)."""
    opts = operator_options(crds, operator_kubeconfig)
    op = OperatorThread(opts).start()
    crds.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "tokenslice-test-injector"},
        "webhooks": [{
            "name": "sidecar-injector.tokenslice.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 10,
            "clientConfig": {"url": f"https://127.0.0.1:{opts.config.webhook_port}/mutate-pods",
                             "caBundle": base64.b64encode(crds.ca.pem()).decode()},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
        }],
    })
    yield op
    crds.kubectl("delete", "mutatingwebhookconfiguration", "tokenslice-test-injector", "--ignore-not-found")
    op.stop()


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace per test, so tests never see each other's objects."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name


GPU = {"limits": {"nvidia.com/gpu": "1"}}


def vllm_pod(name: str, ns: str, labels: dict[str, str], *, resources: dict | None = None,
             annotations: dict[str, str] | None = None, args: list[str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations or {}},
        "spec": {"containers": [{
            "name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
            "args": args if args is not None else ["--model", "m", "--port", "8000"],
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
            "resources": resources if resources is not None else GPU,
        }]},
    }


def pool_manifest(name: str, namespace: str, *, managed: bool = True, target_port: int = 8000,
                  picker_port: int = 9002, labels: dict[str, str] | None = None,
                  failure_mode: str = "FailClose", more_ports: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"tokenslice.io/managed": "true"} if managed else {}},
        "spec": {"selector": {"matchLabels": labels or {"app": f"{name}-vllm"}},
                 "targetPorts": [{"number": p} for p in (target_port, *more_ports)],
                 "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": picker_port},
                                       "failureMode": failure_mode}},
    }


def policy_manifest(name: str, namespace: str, pool: str, **spec: Any) -> dict[str, Any]:
    body = {"poolRef": {"name": pool},
            "priorityClasses": [{"name": "interactive", "priority": 1000}, {"name": "batch", "priority": 10}],
            "tenants": [{"name": "chat", "allowedClasses": ["interactive", "batch"], "defaultClass": "interactive"}]}
    body.update(spec)
    return {"apiVersion": "tokenslice.io/v1alpha1", "kind": "SchedulingPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def condition(obj: dict[str, Any] | None, ctype: str, conditions: list[dict[str, Any]] | None = None
              ) -> dict[str, Any] | None:
    if conditions is None:
        conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == ctype), None)


def our_parent(pool: dict[str, Any] | None) -> dict[str, Any] | None:
    parents = ((pool or {}).get("status") or {}).get("parents") or []
    return next((p for p in parents if p.get("controllerName") == "tokenslice.io/operator"), None)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:3000]
