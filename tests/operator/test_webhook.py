"""Sidecar injection through the real API server's MutatingAdmissionWebhook (tokenslice_operator.webhook)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.kube import KubeCluster, wait_for
from tests.operator.conftest import OperatorThread, pool_manifest, vllm_pod

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def gpu_pool(kube_cluster: KubeCluster, operator: OperatorThread) -> str:
    ns = "webhook-tests"
    kube_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    kube_cluster.apply(pool_manifest("llm", ns, labels={"app": "llm"}))
    wait_for(lambda: kube_cluster.get("secret", "llm-tokenslice-signing", ns), 30, "the pool's signing secret")
    return ns


def _create(cluster: KubeCluster, pod: dict[str, Any]) -> dict[str, Any]:
    cluster.apply(pod)
    return cluster.get("pod", pod["metadata"]["name"], pod["metadata"]["namespace"])


def test_gpu_vllm_pod_in_a_managed_pool_gets_the_sidecar(kube_cluster: KubeCluster, gpu_pool: str) -> None:
    pod = _create(kube_cluster, vllm_pod("gpu-0", gpu_pool, {"app": "llm"}))
    spec = pod["spec"]
    names = [c["name"] for c in spec["containers"]]
    assert names == ["vllm", "tokenslice-sidecar"], "1.20 has no native sidecars: a plain container"
    assert not spec.get("initContainers")
    vllm, sidecar = spec["containers"]
    # vLLM moved behind the sidecar; the sidecar took the pool's target port (and its port name)
    assert vllm["args"] == ["--model", "m", "--port", "8001"]
    assert [(p["name"], p["containerPort"]) for p in vllm["ports"]] == [("vllm", 8001)]
    assert vllm["readinessProbe"]["httpGet"]["port"] == 8001
    assert [(p["name"], p["containerPort"]) for p in sidecar["ports"]] == [("http", 8000)]
    args = sidecar["args"]
    assert args[0] == "sidecar"
    assert args[args.index("--port") + 1] == "8000"
    assert args[args.index("--vllm-url") + 1] == "http://127.0.0.1:8001"
    assert args[args.index("--chunk-url") + 1] == f"http://llm-gateway.{gpu_pool}.svc:8080"
    assert kube_cluster.get("service", "llm-gateway", gpu_pool), "the chunk URL names a Service that exists"
    assert args[args.index("--chunk-size") + 1] == "32"
    assert args[args.index("--advertise") + 1] == "$(POD_IP):8000"
    assert args[args.index("--signing-key-file") + 1] == "/var/run/tokenslice/signing/key"
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["TOKENSLICE_CHUNK_URL"]["value"] == f"http://llm-gateway.{gpu_pool}.svc:8080"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["tokenslice-signing"]["secret"]["secretName"] == "llm-tokenslice-signing"
    assert pod["metadata"]["annotations"]["tokenslice.io/injected"] == "llm"


@pytest.mark.parametrize("case", ["no-gpu", "other-pool", "opted-out", "already"])
def test_other_pods_are_left_untouched(kube_cluster: KubeCluster, gpu_pool: str, case: str) -> None:
    pod = {
        "no-gpu": vllm_pod("plain-cpu", gpu_pool, {"app": "llm"}, resources={}),
        "other-pool": vllm_pod("other", gpu_pool, {"app": "something-else"}),
        "opted-out": vllm_pod("optout", gpu_pool, {"app": "llm"}, annotations={"tokenslice.io/inject": "false"}),
        "already": vllm_pod("already", gpu_pool, {"app": "llm"}, annotations={"tokenslice.io/injected": "llm"}),
    }[case]
    created = _create(kube_cluster, pod)
    assert [c["name"] for c in created["spec"]["containers"]] == ["vllm"]
    assert created["spec"]["containers"][0]["args"] == ["--model", "m", "--port", "8000"]
    assert not any(v["name"] == "tokenslice-signing" for v in created["spec"].get("volumes") or [])


def test_opt_in_label_injects_without_gpu_and_default_port(kube_cluster: KubeCluster, gpu_pool: str) -> None:
    pod = vllm_pod("optin", gpu_pool, {"app": "llm", "tokenslice.io/inject": "true"}, resources={},
                   args=["--model", "m"])  # vLLM's default port 8000: the sidecar adds an explicit --port
    created = _create(kube_cluster, pod)
    vllm, sidecar = created["spec"]["containers"]
    assert vllm["args"] == ["--model", "m", "--port", "8001"] and sidecar["name"] == "tokenslice-sidecar"


def test_policy_chunk_size_reaches_the_sidecar(kube_cluster: KubeCluster, operator: OperatorThread) -> None:
    ns = "webhook-policy"
    kube_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    kube_cluster.apply(pool_manifest("sized", ns, labels={"app": "sized"}))
    kube_cluster.apply({"apiVersion": "tokenslice.io/v1alpha1", "kind": "SchedulingPolicy",
                        "metadata": {"name": "sized", "namespace": ns},
                        "spec": {"poolRef": {"name": "sized"}, "chunkSize": 48}})
    wait_for(lambda: "chunkSize: 48" in (kube_cluster.get("configmap", "sized-epp-policy", ns) or {})
             .get("data", {}).get("policy.yaml", ""), 30, "the published policy")
    args = _create(kube_cluster, vllm_pod("sized-0", ns, {"app": "sized"}))["spec"]["containers"][1]["args"]
    assert args[args.index("--chunk-size") + 1] == "48"
