"""The picker objects of a pool (tokenslice_operator.children) are what the picker accepts.

The picker's command line and policy file are parsed by the real ``tokenslice`` argument parser and policy
loader -- so a renamed flag on either side fails here instead of in a cluster.
"""

from __future__ import annotations

import pytest

from tokenslice import policy
from tokenslice.cli import build_parser
from tokenslice.inferencepool import InferencePool
from tokenslice_operator import children
from tokenslice_operator.config import OperatorConfig

pytestmark = pytest.mark.k8s
POOL = InferencePool.parse({
    "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
    "metadata": {"name": "llama", "namespace": "serving", "uid": "u-1"},
    "spec": {"selector": {"matchLabels": {"app": "llama"}}, "targetPorts": [{"number": 8000}],
             "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002}}}})


def test_picker_args_parse_with_the_gateway_cli() -> None:
    container = children.deployment(POOL, "llama-epp", OperatorConfig())["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.command == "gateway" and args.kube and args.pool == "llama" and args.namespace == "serving"
    assert args.grpc_port == 9002 and str(args.policy) == "/etc/tokenslice/policy/policy.yaml"
    assert str(args.signing_key_file) == "/var/run/tokenslice/signing/key"


def test_published_policy_file_loads_in_the_gateway(tmp_path) -> None:
    spec = policy.SchedulingPolicySpec.model_validate({
        "poolRef": {"name": "llama"}, "chunkSize": 24,
        "priorityClasses": [{"name": "gold", "priority": 10}, {"name": "bronze", "priority": 1}],
        "tenants": [{"name": "a", "allowedClasses": ["gold"], "defaultClass": "gold"}]})
    source = {"metadata": {"name": "llama", "generation": 3}}
    cm = children.policy_configmap(POOL, "llama-epp", spec, source)
    (tmp_path / "policy.yaml").write_text(cm["data"]["policy.yaml"])
    assert policy.load_policy(tmp_path / "policy.yaml") == spec
    assert cm["metadata"]["annotations"]["tokenslice.io/policy-generation"] == "3"
