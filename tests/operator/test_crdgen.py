"""CRDs: generated from the pydantic model (never drifting), served by a real API server, rejecting bad CRs."""

from __future__ import annotations

import filecmp
import json
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import KubeCluster
from tests.operator.conftest import CHART, CRDS, policy_manifest, pool_manifest
from tokenslice import policy
from tokenslice_operator import crdgen

pytestmark = pytest.mark.k8s


def test_committed_crds_are_the_generated_ones() -> None:
    for name, render in ((crdgen.POLICY_CRD_FILE, crdgen.render_policy_crd),
                         (crdgen.INFERENCEPOOL_CRD_FILE, crdgen.render_pool_crd)):
        assert (CRDS / name).read_text() == render(), f"{name}: run `tokenslice operator crds` and commit crds/"
    for f in CRDS.glob("*.yaml"):
        assert filecmp.cmp(f, CHART / "crds" / f.name, shallow=False), f"charts/tokenslice/crds/{f.name} is stale"


def _walk(node: Any, where: str = "") -> list[str]:
    """Constructs a structural schema must not contain."""
    bad: list[str] = []
    if isinstance(node, dict):
        for key in ("$ref", "anyOf", "oneOf", "allOf", "additionalProperties", "title", "x-kubernetes-validations"):
            if key in node and not (key == "additionalProperties" and where.endswith("matchLabels")):
                bad.append(f"{where}/{key}")
        if "properties" in node or "items" in node:
            if "type" not in node:
                bad.append(f"{where}: no type")
        for k, v in node.items():
            bad += _walk(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            bad += _walk(v, f"{where}[{i}]")
    return bad


def test_schemas_are_structural_and_only_the_pool_crd_has_cel() -> None:
    """SchedulingPolicy installs on the v1.20 test server as it is; the InferencePool CRD carries the API's CEL
    rules (exercised in test_crd_cel.py) and is otherwise structural too."""
    for f in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            bad = _walk(v["schema"]["openAPIV3Schema"])
            if f.name == crdgen.INFERENCEPOOL_CRD_FILE:
                bad = [b for b in bad if not b.endswith("/x-kubernetes-validations")]
            assert bad == [], f.name


def test_generated_schema_mirrors_the_model() -> None:
    spec = crdgen.spec_schema()
    model_fields = {f.alias or n for n, f in policy.SchedulingPolicySpec.model_fields.items()}
    assert set(spec["properties"]) == model_fields
    pc = spec["properties"]["priorityClasses"]
    assert pc["x-kubernetes-list-type"] == "map" and pc["minItems"] == 1
    assert pc["default"] == [{"name": "standard", "priority": 100, "preemptible": True, "starvationSeconds": 30.0}]
    ttft = pc["items"]["properties"]["ttftSeconds"]
    assert ttft == {"type": "number", "minimum": 0, "exclusiveMinimum": True, "nullable": True,
                    "description": "Time-to-first-token objective."}
    assert spec["properties"]["chunkSize"] == {"default": 32, "description": "Default decode tokens per time slice.",
                                               "maximum": 8192, "minimum": 1, "type": "integer"}
    assert "poolRef" in spec["required"]


def test_crds_are_served_with_defaults(crds: KubeCluster, namespace: str) -> None:
    crds.apply(policy_manifest("defaults", namespace, "nowhere"))
    obj = crds.get("schedulingpolicy", "defaults", namespace)
    s = obj["spec"]
    assert s["chunkSize"] == 32 and s["tenantHeader"] == "x-tenant-id"
    assert s["fairness"] == {"input": 1, "output": 2}
    assert s["queue"]["maxQueuedChunks"] == 10_000
    assert s["priorityClasses"][0]["preemptible"] is True
    # what the API server stored is exactly what the gateway's model accepts
    policy.SchedulingPolicySpec.model_validate(s)

    crds.apply(pool_manifest("served", namespace))
    pool = crds.get("inferencepool", "served", namespace)
    assert pool["spec"]["appProtocol"] == "http"
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
    assert pool["spec"]["endpointPickerRef"]["kind"] == "Service"
    assert crds.get("infpool", "served", namespace)["metadata"]["name"] == "served"  # the API's short name


def _rejected(cluster: KubeCluster, manifest: dict[str, Any]) -> str:
    # --validate=false: the API server itself must reject it (not kubectl's client-side check)
    proc = cluster.kubectl("apply", "--validate=false", "-f", "-", input=json.dumps(manifest), check=False)
    assert proc.returncode != 0, f"accepted: {manifest}"
    return proc.stderr


@pytest.mark.parametrize(("change", "message"), [
    ({"chunkSize": 0}, "spec.chunkSize: Invalid value: 0: spec.chunkSize in body should be greater than or equal to 1"),
    ({"priorityClasses": []}, "spec.priorityClasses in body should have at least 1 items"),
    ({"tenantHeader": "X Tenant"}, "spec.tenantHeader in body should match"),
    ({"priorityClasses": [{"name": "a", "priority": 1}, {"name": "a", "priority": 2}]},
     'spec.priorityClasses[1]: Duplicate value: map[string]interface {}{"name":"a"}'),
    ({"tenants": [{"name": "t", "weight": 0}]}, "spec.tenants.weight in body should be greater than 0"),
    ({"priorityClasses": [{"name": "Gold", "priority": 1}]}, "spec.priorityClasses.name in body should match"),
    ({"poolRef": None}, "spec.poolRef: Required value"),
])
def test_invalid_policies_are_rejected_by_the_api_server(crds: KubeCluster, namespace: str,
                                                         change: dict[str, Any], message: str) -> None:
    manifest = policy_manifest("bad", namespace, "p")
    manifest["spec"].update(change)
    if change.get("poolRef", 0) is None:
        del manifest["spec"]["poolRef"]
    assert message in _rejected(crds, manifest)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda p: p["spec"].update(targetPorts=[]), "spec.targetPorts in body should have at least 1 items"),
    (lambda p: p["spec"]["endpointPickerRef"].update(failureMode="Maybe"),
     'spec.endpointPickerRef.failureMode: Unsupported value: "Maybe"'),
    (lambda p: p["spec"].update(appProtocol="grpc"), 'spec.appProtocol: Unsupported value: "grpc"'),
    (lambda p: p["spec"]["selector"].update(matchLabels={}),
     "spec.selector.matchLabels in body should have at least 1 properties"),
    (lambda p: p["spec"].pop("selector"), "spec.selector: Required value"),
])
def test_invalid_pools_are_rejected_by_the_api_server(crds: KubeCluster, namespace: str, mutate: Any,
                                                      message: str) -> None:
    manifest = pool_manifest("bad", namespace)
    mutate(manifest)
    assert message in _rejected(crds, manifest)
