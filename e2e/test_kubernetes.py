"""End to end on the Kubernetes path, following docs/kubernetes.md's quick start command by command: a real API
server, the chart installed with the real helm, the operator running with the chart's RBAC and settings, the
docs' pool and policy applied with kubectl, two vLLM pods injected by its webhook -- and streamed requests
through the pool's gateway (Envoy) scheduled by the pool's picker.

There is no kubelet, scheduler, controller-manager, kube-proxy or DNS here, so ``tests/fixtures/kubelet.py``
stands in for them: it creates the pod a Deployment would get, runs each pod's containers as their spec states
them (command, args, env, mounted ConfigMap/Secret content) as local processes bound to the pod's own loopback
IP, and writes the pod's IP and readiness to its status; its docstring lists every translation it makes.

The operator runs in-process (``tokenslice_operator.app.run_operator``, the chart's defaults, as a user bound
to the ClusterRole the chart installed), its webhook registered by URL with a test certificate: the API server
validates Endpoints and refuses loopback addresses, so the chart's Service-referenced webhook cannot reach a
"pod" on this machine.  Everything else is the real thing: kube-apiserver + etcd, helm, kubectl, the picker,
Envoy, the sidecars and vLLM.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import shlex
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kube import (
    OPERATOR_TOKEN,
    OPERATOR_USER,
    KubeCluster,
    chart_for_test_server,
    free_port,
    running_cluster,
    wait_for,
)
from tests.fixtures.kubelet import Kubelet, RunningPod, kubelet
from tests.operator.conftest import OperatorThread
from tokenslice import contract
from tokenslice.engine import layout
from tokenslice.engine.server import check_built, vllm_command, vllm_env
from tokenslice.envoy import envoy_binary
from tokenslice.paths import REPO_ROOT
from tokenslice_operator.app import RunOptions
from tokenslice_operator.config import OperatorConfig

pytestmark = [pytest.mark.k8s, pytest.mark.engine, pytest.mark.envoy, pytest.mark.timeout(900)]
NS = "serving"
TOKENSLICE = ["tokenslice"]  # the ENTRYPOINT of docker/{operator,picker,sidecar}.Dockerfile
IMAGES = {"ghcr.io/tokenslice/operator:0.1.0": TOKENSLICE, "ghcr.io/tokenslice/picker:0.1.0": TOKENSLICE,
          "ghcr.io/tokenslice/sidecar:0.1.0": TOKENSLICE, "docker.io/envoyproxy/envoy:v1.40.0": ["envoy"],
          "vllm/vllm-openai:cpu": []}
IN_CLUSTER = {"ghcr.io/tokenslice/operator:0.1.0", "ghcr.io/tokenslice/picker:0.1.0"}

def vllm_pod(name: str) -> dict:
    """A user's vLLM pod (what a Deployment's template would hold): the tiny offline model on the CPU engine."""
    env = {k: v for k, v in vllm_env().items() if os.environ.get(k) != v}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "llama-vllm"}},
        "spec": {"containers": [{
            "name": "vllm", "image": "vllm/vllm-openai:cpu",
            "command": vllm_command(model_dir=check_built(), port=8000, max_num_seqs=16),  # >= slotsPerEndpoint
            "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
            "resources": {"limits": {"nvidia.com/gpu": "1"}},
        }]},
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """An API server of its own: the operator here is the chart's, and no other test's may act on it."""
    with running_cluster(tmp_path_factory.mktemp("kube-e2e")) as c:
        yield c


def start_operator(cluster: KubeCluster) -> OperatorThread:
    """The operator with the chart's defaults, as a user holding the ClusterRole the chart installed."""
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "e2e-operator-user"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": "tokenslice-operator"},
                   "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}]})
    cert, key = cluster.ca.issue("e2e-webhook", ["127.0.0.1"])
    config = OperatorConfig(webhook_port=free_port(), webhook_cert=str(cert), webhook_key=str(key))
    opts = RunOptions(kubeconfig=str(cluster.kubeconfig_for(OPERATOR_TOKEN, "e2e-operator")), config=config,
                      webhook_host="127.0.0.1", priority=100)
    op = OperatorThread(opts, name="e2e-operator").start()
    cluster.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "e2e-sidecar-injector"},
        "webhooks": [{
            "name": "sidecar-injector.tokenslice.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 10,
            "clientConfig": {"url": f"https://127.0.0.1:{config.webhook_port}/mutate-pods",
                             "caBundle": base64.b64encode(cluster.ca.pem()).decode()},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            "objectSelector": {"matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "NotIn",
                                                     "values": ["operator", "endpoint-picker"]}]},
        }],
    })
    return op


@pytest.fixture(scope="module")
def node(cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubelet]:
    path = [str(Path(sys.executable).parent), str(Path(envoy_binary()).parent)]
    with kubelet(cluster, tmp_path_factory.mktemp("pods"), IMAGES, IN_CLUSTER, path) as k:
        yield k


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if re.fullmatch(rf"{name}(\{{.*\}})?", k))


def _sidecar(pod: RunningPod, name: str) -> float:
    return _sum(_scrape(f"http://{pod.ip}:8000{contract.SIDECAR_METRICS_PATH}"), name)


def _worker_chunks(pod: RunningPod) -> float:
    """Chunks this pod's sidecar executed (as a worker)."""
    return _sidecar(pod, "tokenslice_sidecar_worker_chunks_total")


def _driver_chunks(pod: RunningPod) -> float:
    """Chunks this pod's sidecar issued (as the driver of a client request)."""
    return _sidecar(pod, "tokenslice_sidecar_chunks_total")


def stream(gateway: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """One streamed completion through the gateway: (the text as the client receives it, tokens generated)."""
    body = {"model": layout.MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    req = urllib.request.Request(f"http://{gateway}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    text, finish, usage = "", None, None
    with urllib.request.urlopen(req, timeout=240) as resp:
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                for choice in event.get("choices") or []:
                    text += choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
                usage = event.get("usage") or usage
    assert finish == "length" and text, (finish, text)
    return text, usage["completion_tokens"]


def doc_commands() -> list[list[str]]:
    """Every command line of the ``sh`` blocks of docs/kubernetes.md (continuations joined, comments dropped)."""
    text = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    lines = "".join(re.findall(r"```sh\n(.*?)```", text, re.S)).replace("\\\n", " ").splitlines()
    return [argv for line in lines if (argv := shlex.split(line, comments=True))]


STATUS_COMMAND = next(c for c in doc_commands() if c[:3] == ["kubectl", "get", "inferencepool"])


def quickstart() -> list[list[str]]:
    """The commands of docs/kubernetes.md's quick start, in order (continuations joined, comments dropped)."""
    text = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    block = re.search(r"<!-- quickstart.*?-->\n```sh\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
    return [argv for line in block.splitlines() if (argv := shlex.split(line, comments=True))]


def doc_files(workdir: Path) -> None:
    """The YAML blocks of docs/kubernetes.md that start ``# <name>.yaml``, saved as files (a user's copy-paste)."""
    text = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    for block in re.findall(r"```yaml\n(# ([\w.-]+\.yaml)\n.*?)```", text, re.S):
        (workdir / block[1]).write_text(block[0])
    # the chart as the v1.20 test server can install it: its crds/ without CEL rules and empty-string defaults
    chart_for_test_server(REPO_ROOT / "charts" / "tokenslice", workdir / "charts" / "tokenslice")


def test_the_docs_quick_start_on_kubernetes(cluster: KubeCluster, node: Kubelet, tmp_path: Path) -> None:
    """docs/kubernetes.md's quick start, command by command; then a deleted pod gets no chunks."""
    doc_files(tmp_path)
    commands = quickstart()
    assert [c[:2] for c in commands] == [["helm", "install"], ["kubectl", "create"], ["kubectl", "apply"],
                                         ["kubectl", "apply"], ["kubectl", "get"], ["kubectl", "get"],
                                         ["kubectl", "port-forward"], ["curl", "-N"], ["kubectl", "patch"]]
    run = lambda argv: cluster.run(argv[0], *argv[1:], cwd=tmp_path).stdout  # noqa: E731
    operator = None
    try:
        assert "STATUS: deployed" in run(commands[0])  # helm install: CRDs, RBAC, the operator's Deployment
        operator = start_operator(cluster)
        run(commands[1])  # kubectl create namespace serving
        run(commands[2])  # the pool (+ the docs' vLLM Deployment: a GPU model this machine cannot run, see below)
        run(commands[3])  # the policy
        wait_for(lambda: cluster.get("deployment", "llama-epp", NS) and cluster.get("service", "llama-gateway", NS),
                 60, "the operator to create the pool's picker and gateway")
        wait_for(lambda: run(commands[4]).count("True") == 2, 60, "the policy to be Accepted and Programmed")

        # the pods a kubelet would run: the picker's (from the operator's Deployment), and two vLLM pods of the
        # tiny offline model labelled like the docs' Deployment, injected by the operator's webhook
        picker = node.run(NS, node.create_pod_of(NS, "llama-epp"))
        gateway = node.resolve_service(NS, "llama-gateway", 8080)
        for name in ("llama-vllm-a", "llama-vllm-b"):
            cluster.apply(vllm_pod(name))
            spec = cluster.get("pod", name, NS)["spec"]
            assert [c["name"] for c in spec["containers"]] == ["vllm", "tokenslice-sidecar"], \
                f"the webhook did not inject {name}"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda n: node.run(NS, n), ["llama-vllm-a", "llama-vllm-b"])
        status = run(STATUS_COMMAND)  # the docs' "Pool status" command
        assert '"type":"ResolvedRefs"' in status.replace(" ", "") and '"status":"True"' in status, status
        pods = run(commands[5])
        assert "llama-epp-" in pods and "llama-vllm-a" in pods and "llama-vllm-b" in pods, pods
        picker_metrics = f"http://{picker.ip}:9090/metrics"
        endpoints = lambda: {k for k in _scrape(picker_metrics) if "endpoint_slots_granted" in k}  # noqa: E731
        wait_for(lambda: len(endpoints()) == 2, 60, f"the picker to list both pods (log: {picker.dir})")

        # port-forward + curl: the same request, sent to the gateway's pod (no kubelet to forward to)
        body = json.loads(commands[7][commands[7].index("-d") + 1])
        drivers = lambda: sum(_driver_chunks(p) for p in (a, b))  # noqa: E731
        issued = drivers()
        text, tokens = stream(gateway, body["prompt"], body["max_tokens"])
        # the default policy: one long slice (per slice it was two of the policy's 32)
        assert tokens == 64 and drivers() - issued == 1, "64 tokens in one time slice: nobody waited"

        # chunks of concurrent requests ran on both pods
        before = {p.name: _worker_chunks(p) for p in (a, b)}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: stream(gateway, f"Request {i} about mountains", 64), range(6)))
        assert [n for _, n in results] == [64] * 6
        ran = {p.name: _worker_chunks(p) - before[p.name] for p in (a, b)}
        assert all(n > 0 for n in ran.values()) and sum(ran.values()) >= 6, f"chunks per pod: {ran}"

        # kubectl patch: the picker reloads the policy, whose chunkSize (the fairness quantum) is now 16
        reloads = lambda: _sum(_scrape(picker_metrics), "tokenslice_picker_policy_reloads_total")  # noqa: E731
        seen = reloads()
        run(commands[8])
        wait_for(lambda: reloads() > seen, 60, "the picker to reload the edited policy (ConfigMap -> mounted file)")
        issued = drivers()
        assert stream(gateway, body["prompt"], 64)[1] == 64
        assert drivers() - issued == 1, "still one long slice: the quantum is not a slice end"

        # beyond the docs: a pod that leaves the pool stops getting chunks (its processes still run, as during
        # a termination grace period)
        cluster.kubectl("delete", "pod", "llama-vllm-b", "-n", NS, "--wait=false")
        wait_for(lambda: not any(b.ip in k for k in endpoints()), 30, "the picker to drop the deleted pod")
        before = {p.name: _worker_chunks(p) for p in (a, b)}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda i: stream(gateway, f"After the deletion {i}", 32), range(3)))
        assert [n for _, n in results] == [32] * 3
        assert _worker_chunks(b) == before[b.name], "the deleted pod still got chunks"
        assert _worker_chunks(a) - before[a.name] >= 3
    finally:
        if operator is not None:
            operator.stop()  # the pods' processes stop with the kubelet fixture
