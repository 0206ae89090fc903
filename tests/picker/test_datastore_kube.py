"""Kubernetes mode against a REAL kube-apiserver (tests/fixtures/kube.py): the pool's endpoints are the
Ready pods matching the InferencePool's selector, followed by a watch; the policy follows its CR.

There is no kubelet, so the test plays it: it creates pods and writes their status (podIP, Ready)
through the API's status subresource, exactly what a kubelet would write.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.kube import ADMIN_TOKEN
from tests.picker.conftest import until
from tokenslice.paths import REPO_ROOT
from tokenslice.policy import SchedulingPolicySpec
from tokenslice_picker.server import start_picker

pytestmark = pytest.mark.k8s


class Api:
    def __init__(self, cluster) -> None:
        self.server = cluster.server
        self.ssl = ssl.create_default_context(cafile=str(cluster.ca.cert_path))
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    async def call(self, method: str, path: str, body: dict | None = None, patch: bool = False) -> dict:
        headers = {"Content-Type": "application/merge-patch+json"} if patch else {}
        async with self.session.request(method, self.server + path, json=body, headers=headers, ssl=self.ssl) as r:
            data = await r.json()
            assert r.status < 300, json.dumps(data)
            return data


def _pod(name: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "example.invalid/none"}]}}


async def test_pool_endpoints_follow_ready_pods_and_policy_follows_cr(kube_cluster):
    cluster = kube_cluster
    for crd in ("inference.networking.k8s.io_inferencepools.yaml", "tokenslice.io_schedulingpolicies.yaml"):
        cluster.install_crds(REPO_ROOT / "crds" / crd)  # as the v1.20 test server takes it (no CEL)
    ns = f"gw-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    api = Api(cluster)
    try:
        await _wait_crds(api)
        await api.call("POST", f"/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools", {
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "pool"},
            "spec": {"selector": {"matchLabels": {"app": "llm"}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "picker", "port": {"number": 9002}}}})
        await api.call("POST", f"/apis/tokenslice.io/v1alpha1/namespaces/{ns}/schedulingpolicies", {
            "apiVersion": "tokenslice.io/v1alpha1", "kind": "SchedulingPolicy", "metadata": {"name": "policy"},
            "spec": {"poolRef": {"name": "pool"}, "slotsPerEndpoint": 3}})
        for name, labels in (("p1", {"app": "llm"}), ("p2", {"app": "llm"}), ("other", {"app": "web"})):
            await api.call("POST", f"/api/v1/namespaces/{ns}/pods", _pod(name, labels))

        async def ready(name: str, ip: str, status: str = "True") -> None:
            await api.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": status}]}}, patch=True)

        await ready("p1", "10.1.0.1")
        await ready("other", "10.1.0.9")
        # no --policy file and no --policy-name: the SchedulingPolicy whose poolRef names this pool
        gw = await start_picker(signing_key=b"k" * 32, kube=True, pool="pool", namespace=ns,
                                 kubeconfig=cluster.kubeconfig, scrape_interval_s=0)
        try:
            ds = gw.datastore
            await until(lambda: ds.addresses() == ["10.1.0.1:8000"], what="p1 in the pool")
            await until(lambda: gw.policy.slots_per_endpoint == 3, what="policy from the CR")
            await ready("p2", "10.1.0.2")
            await until(lambda: ds.addresses() == ["10.1.0.1:8000", "10.1.0.2:8000"], what="p2 joins")
            # a pod relabelled out of the selector leaves the pool (and comes back when relabelled in)
            await api.call("PATCH", f"/api/v1/namespaces/{ns}/pods/p2", {"metadata": {"labels": {"app": "web"}}},
                           patch=True)
            await until(lambda: ds.addresses() == ["10.1.0.1:8000"], what="relabelled p2 leaves")
            await api.call("PATCH", f"/api/v1/namespaces/{ns}/pods/p2", {"metadata": {"labels": {"app": "llm"}}},
                           patch=True)
            await until(lambda: ds.addresses() == ["10.1.0.1:8000", "10.1.0.2:8000"], what="p2 is back")
            await ready("p1", "10.1.0.1", status="False")
            await until(lambda: ds.addresses() == ["10.1.0.2:8000"], what="unready p1 leaves")
            await api.call("DELETE", f"/api/v1/namespaces/{ns}/pods/p2")
            await until(lambda: ds.addresses() == [], what="deleted p2 leaves")
            await api.call("PATCH", f"/apis/tokenslice.io/v1alpha1/namespaces/{ns}/schedulingpolicies/policy",
                           {"spec": {"slotsPerEndpoint": 5}}, patch=True)
            await until(lambda: gw.policy.slots_per_endpoint == 5, what="CR change applied")
            # the pool's selector changes: its pods are the other ones now
            await api.call("PATCH", f"/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools/pool",
                           {"spec": {"selector": {"matchLabels": {"app": "web"}}}}, patch=True)
            await until(lambda: ds.addresses() == ["10.1.0.9:8000"], what="the re-selected pod joins")
        finally:
            await gw.stop(0)
    finally:
        await api.session.close()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def _wait_crds(api: Api, timeout_s: float = 30.0,
                     groups: tuple[str, ...] = ("/apis/inference.networking.k8s.io/v1", "/apis/tokenslice.io/v1alpha1"),
                     ) -> None:
    """Poll until the API groups are served (CRDs established), with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        statuses = []
        for path in groups:
            async with api.session.get(api.server + path, ssl=api.ssl) as r:
                statuses.append(r.status)
        if statuses == [200] * len(groups):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"CRDs not served: {statuses}")
        await asyncio.sleep(0.1)


async def _health(port: int, service: str) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_alive_at_once_ready_only_after_the_first_listing_of_the_pool(kube_cluster):
    """The GIE health services: ``liveness`` SERVING at start, ``readiness`` (and the ext_proc service) only
    once the pool's pods were listed -- here the pool does not exist yet when the picker starts."""
    cluster = kube_cluster
    cluster.install_crds(REPO_ROOT / "crds" / "inference.networking.k8s.io_inferencepools.yaml")  # no CEL on 1.20
    ns = f"gw-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    api = Api(cluster)
    gw = await start_picker(signing_key=b"k" * 32, kube=True, pool="late", namespace=ns, policy=SchedulingPolicySpec(),
                             kubeconfig=cluster.kubeconfig, scrape_interval_s=0)
    try:
        assert await _health(gw.grpc_port, "liveness") == "SERVING"
        assert await _health(gw.grpc_port, "readiness") == "NOT_SERVING"
        assert await _health(gw.grpc_port, "envoy.service.ext_proc.v3.ExternalProcessor") == "NOT_SERVING"
        await _wait_crds(api, groups=("/apis/inference.networking.k8s.io/v1",))
        await api.call("POST", f"/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools", {
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "late"},
            "spec": {"selector": {"matchLabels": {"app": "llm"}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "picker", "port": {"number": 9002}}}})
        deadline = asyncio.get_running_loop().time() + 30
        while await _health(gw.grpc_port, "readiness") != "SERVING":
            assert asyncio.get_running_loop().time() < deadline, "never ready after the pool appeared"
            await asyncio.sleep(0.2)  # polling a condition with a deadline
        assert await _health(gw.grpc_port, "envoy.service.ext_proc.v3.ExternalProcessor") == "SERVING"
    finally:
        await gw.stop(0)
        await api.session.close()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def test_a_pool_the_operator_would_decline_is_not_served(kube_cluster):
    """The picker reads its pool by ``inferencepool.served``, the operator's rule: a pool edited into one
    tokenslice declines (appProtocol h2c) has no endpoints until edited back, and neither has a deleted one."""
    cluster = kube_cluster
    cluster.install_crds(REPO_ROOT / "crds" / "inference.networking.k8s.io_inferencepools.yaml")  # no CEL on 1.20
    ns = f"gw-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    api = Api(cluster)
    pools = f"/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"
    try:
        await _wait_crds(api, groups=("/apis/inference.networking.k8s.io/v1",))
        await api.call("POST", pools, {
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "pool"},
            "spec": {"selector": {"matchLabels": {"app": "llm"}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "picker", "port": {"number": 9002}}}})
        await api.call("POST", f"/api/v1/namespaces/{ns}/pods", _pod("p1", {"app": "llm"}))
        await api.call("PATCH", f"/api/v1/namespaces/{ns}/pods/p1/status", {"status": {
            "phase": "Running", "podIP": "10.1.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}, patch=True)
        gw = await start_picker(signing_key=b"k" * 32, kube=True, pool="pool", namespace=ns,
                                 policy=SchedulingPolicySpec(), kubeconfig=cluster.kubeconfig, scrape_interval_s=0)
        try:
            ds = gw.datastore
            await until(lambda: ds.addresses() == ["10.1.0.1:8000"], what="p1 in the pool")
            await api.call("PATCH", f"{pools}/pool", {"spec": {"appProtocol": "kubernetes.io/h2c"}}, patch=True)
            await until(lambda: ds.addresses() == [], what="an h2c pool is not served")
            await api.call("PATCH", f"{pools}/pool", {"spec": {"appProtocol": "http"}}, patch=True)
            await until(lambda: ds.addresses() == ["10.1.0.1:8000"], what="served again once http")
            await api.call("DELETE", f"{pools}/pool")
            await until(lambda: ds.addresses() == [], what="a deleted pool has no endpoints")
        finally:
            await gw.stop(0)
    finally:
        await api.session.close()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
