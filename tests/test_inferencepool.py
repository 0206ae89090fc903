"""The one InferencePool model (tokenslice/inferencepool.py): upstream v1 defaults, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import yaml

from tokenslice import inferencepool
from tokenslice.inferencepool import InferencePool, PoolError
from tokenslice.paths import REPO_ROOT

POOL = {
    "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
    "metadata": {"name": "llama", "namespace": "serving", "uid": "u-1", "labels": {"tokenslice.io/managed": "true"}},
    "spec": {"selector": {"matchLabels": {"app": "llama", "tier": "gpu"}},
             "targetPorts": [{"number": 8000}, {"number": 8001}],
             "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002}}},
    "status": {"parents": [{"parentRef": {"name": "gw"}, "controllerName": "example.net/gw"}]},
}


def _with(change) -> dict:
    pool = copy.deepcopy(POOL)
    change(pool["spec"])
    return pool


def test_reads_selector_ports_and_picker_with_upstream_defaults() -> None:
    pool = InferencePool.parse(POOL)
    assert pool.selector() == {"app": "llama", "tier": "gpu"}
    assert pool.label_selector() == "app=llama,tier=gpu"
    assert pool.selects({"app": "llama", "tier": "gpu", "x": "y"}) and not pool.selects({"app": "llama"})
    assert pool.target_ports() == [8000, 8001]
    assert pool.picker_ref() == ("llama-epp", 9002)
    ref = pool.spec.endpoint_picker_ref
    assert (ref.group, ref.kind, ref.failure_mode, pool.spec.app_protocol) == ("", "Service", "FailClose", "http")
    assert pool.owner_reference() == {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                                      "name": "llama", "uid": "u-1", "controller": True, "blockOwnerDeletion": True}
    assert pool.status["parents"][0]["controllerName"] == "example.net/gw"
    assert inferencepool.path("serving", "llama", "status") == \
        "/apis/inference.networking.k8s.io/v1/namespaces/serving/inferencepools/llama/status"


def test_unknown_fields_of_a_newer_upstream_are_kept() -> None:
    pool = InferencePool.parse(_with(lambda s: s.update(somethingNew={"a": 1})))
    assert pool.spec.model_extra == {"somethingNew": {"a": 1}}


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update(targetPorts=[{"number": 8000}, {"number": 8000}]), "port number must be unique"),
    (lambda s: s["endpointPickerRef"].pop("port"), "port is required when kind is 'Service'"),
    (lambda s: s["endpointPickerRef"].update(kind="Deployment", group="apps"), "must be a core Service"),
    (lambda s: s.pop("endpointPickerRef"), "endpointPickerRef is not set"),
])
def test_upstream_cel_rules_and_our_picker_needs_are_checked(change, message) -> None:
    """The two CEL rules of the upstream CRD hold even where the API server does not enforce CEL."""
    with pytest.raises(PoolError, match=message):
        InferencePool.parse(_with(change)).picker_ref()


def test_h2c_pools_are_declined() -> None:
    """Gateways speak HTTP/2 cleartext to an h2c pool's ports; the sidecar taking them over speaks HTTP/1.1."""
    InferencePool.parse(POOL).check_supported()
    with pytest.raises(inferencepool.UnsupportedPool, match="kubernetes.io/h2c is not supported"):
        InferencePool.parse(_with(lambda s: s.update(appProtocol="kubernetes.io/h2c"))).check_supported()


@pytest.mark.parametrize("change", [
    lambda s: s.update(selector={"app": "llama"}),          # v1alpha2's plain map: not a v1 pool
    lambda s: s.update(selector={"matchLabels": {}}),
    lambda s: s.update(targetPorts=[]),
    lambda s: s.pop("targetPorts"),
    lambda s: s.update(appProtocol="grpc"),
    lambda s: s["endpointPickerRef"].update(failureMode="Maybe"),
])
def test_what_the_upstream_schema_refuses_the_model_refuses(change) -> None:
    with pytest.raises(PoolError, match="not a valid inference.networking.k8s.io/v1 pool"):
        InferencePool.parse(_with(change))


def test_model_fields_and_defaults_match_the_crd() -> None:
    """Every spec field and default of the committed CRD is in the model, with the same default."""
    crd = yaml.safe_load((REPO_ROOT / "crds" / f"{inferencepool.API_GROUP}_{inferencepool.PLURAL}.yaml").read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"], crd["spec"]["names"]["plural"]) == \
        (inferencepool.API_GROUP, inferencepool.KIND, inferencepool.PLURAL)
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    assert version["name"] == inferencepool.API_VERSION
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    aliases = {f.alias or n for n, f in inferencepool.InferencePoolSpec.model_fields.items()}
    assert set(spec) == aliases
    ref = spec["endpointPickerRef"]["properties"]
    model_ref = {f.alias or n: f for n, f in inferencepool.EndpointPickerRef.model_fields.items()}
    assert set(ref) == set(model_ref)
    for name, prop in ref.items():
        if "default" in prop:
            assert model_ref[name].default == prop["default"], name
    assert inferencepool.InferencePoolSpec.model_fields["app_protocol"].default == spec["appProtocol"]["default"]


READERS_REFUSE = [
    pytest.param(lambda s: s.update(targetPorts=[{"number": 8000}, {"number": 8000}]), id="duplicate-port"),
    pytest.param(lambda s: s["endpointPickerRef"].pop("port"), id="service-ref-without-port"),
    pytest.param(lambda s: s.pop("endpointPickerRef"), id="no-picker-ref"),
    pytest.param(lambda s: s.update(appProtocol="kubernetes.io/h2c"), id="h2c"),
    pytest.param(lambda s: s.update(selector={"app": "llama"}), id="v1alpha2-selector"),
]


@pytest.mark.parametrize("change", READERS_REFUSE)
def test_the_three_readers_refuse_the_same_pools(change) -> None:
    """The reconciler, the webhook and the picker decide by ``served``: a pool one of them refuses is neither
    given a picker, nor injected, nor served (before, the webhook injected pods of pools with duplicate ports
    or no picker, and the picker served h2c pools the operator declined)."""
    from tokenslice_operator.webhook import _valid_pools
    from tokenslice_picker.datastore.kube import KubeSources

    pool = _with(change)
    with pytest.raises(PoolError):
        inferencepool.served(pool)
    assert _valid_pools([pool, POOL]) == [InferencePool.parse(POOL)]
    picker = KubeSources(settings=None, datastore=None, set_policy=print, on_result=print)  # type: ignore[arg-type]
    assert picker._served(pool) is None
    assert picker._served(POOL) == InferencePool.parse(POOL)
