"""The picker objects of a pool (tokenslice_operator.children) are what the picker accepts.

The picker's command line and policy file are parsed by the real ``tokenslice`` argument parser and policy
loader -- so a renamed flag on either side fails here instead of in a cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokenslice import policy
from tokenslice.cli import build_parser
from tokenslice.envoy import FAIL_OPEN_CLUSTER, envoy_binary
from tokenslice.inferencepool import InferencePool
from tokenslice_operator import children
from tokenslice_operator.config import OperatorConfig
from tokenslice_picker.server import PickerSettings

pytestmark = pytest.mark.k8s
POOL = InferencePool.parse({
    "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
    "metadata": {"name": "llama", "namespace": "serving", "uid": "u-1"},
    "spec": {"selector": {"matchLabels": {"app": "llama"}}, "targetPorts": [{"number": 8000}],
             "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002}}}})


def test_picker_args_parse_with_the_picker_cli() -> None:
    container = children.deployment(POOL, "llama-epp", OperatorConfig())["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.command == children.PICKER_COMMAND and args.kube
    assert args.pool == "llama" and args.namespace == "serving"
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


def _pod(config: OperatorConfig | None = None) -> dict:
    return children.deployment(POOL, "llama-epp", config or OperatorConfig())["spec"]["template"]["spec"]


def test_the_pools_gateway_is_envoy_beside_the_picker_with_a_config_the_picker_renders(tmp_path) -> None:
    """The init container's command line renders the bootstrap with the real CLI; Envoy reads that file."""
    pod = _pod()
    init, = pod["initContainers"]
    assert init["command"][:2] == ["sh", "-c"] and init["command"][2].endswith("> /etc/tokenslice/gateway/envoy.yaml")
    args = build_parser().parse_args(init["args"])
    assert args.print_envoy_config and args.envoy_listen_port == 8080 and args.grpc_port == 9002
    assert args.envoy_ext_proc_host == "127.0.0.1", "Envoy reaches the picker on the pod's loopback"
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    assert gateway["image"] == OperatorConfig().gateway_image and gateway["command"] == ["envoy"]
    assert gateway["args"][:2] == ["-c", "/etc/tokenslice/gateway/envoy.yaml"]
    assert {"name": "gateway", "containerPort": 8080, "protocol": "TCP"} in gateway["ports"]
    assert {"name": "gateway", "emptyDir": {}} in pod["volumes"]


def test_the_gateway_service_is_named_for_the_pool_and_is_what_sidecars_are_told() -> None:
    config = OperatorConfig()
    svc = children.gateway_service(POOL, "llama-epp", config)
    assert svc["metadata"]["name"] == "llama-gateway"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "gateway", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == children.deployment(POOL, "llama-epp", config)["spec"]["selector"]["matchLabels"]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert config.chunk_url_of("llama", "serving") == "http://llama-gateway.serving.svc:8080"
    custom = OperatorConfig(gateway_service="{pool}-gw", gateway_port=80)
    assert custom.chunk_url_of("llama", "serving") == "http://llama-gw.serving.svc:80"
    assert OperatorConfig(chunk_url="http://x/{pool}").chunk_url_of("llama", "serving") == "http://x/llama"


def test_picker_pod_passes_pod_security_restricted() -> None:
    pod = _pod()
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for c in pod["initContainers"] + pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["runAsNonRoot"], c["name"]


FAIL_OPEN = InferencePool.parse({**POOL.model_dump(by_alias=True), "spec": {
    **POOL.model_dump(by_alias=True)["spec"], "targetPorts": [{"number": 8000}, {"number": 8002}],
    "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002}, "failureMode": "FailOpen"}}})


@pytest.mark.parametrize("pool", [POOL, FAIL_OPEN], ids=["FailClose", "FailOpen"])
def test_the_rendered_gateway_config_is_accepted_by_envoy(tmp_path, pool) -> None:
    """Run the init container's own command (its mount mapped to a temp dir); Envoy validates the file."""
    init, = children.deployment(pool, "llama-epp", OperatorConfig())["spec"]["template"]["spec"]["initContainers"]
    script = init["command"][2].replace("/etc/tokenslice/gateway", str(tmp_path))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([*init["command"][:2], script, *init["command"][3:], *init["args"]], check=True, env=env,
                   timeout=60)
    config = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 8080
    # FailOpen: Envoy may go on without the picker, to the pool's own pods behind their headless Service
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][-2]["typed_config"]["failure_mode_allow"] is (pool is FAIL_OPEN)
    fallback = [c for c in config["static_resources"]["clusters"] if c["name"] == FAIL_OPEN_CLUSTER]
    if pool is FAIL_OPEN:
        svc = children.endpoints_service(pool)
        name = svc["metadata"]["name"]
        assert [(e["endpoint"]["address"]["socket_address"]["address"],
                 e["endpoint"]["address"]["socket_address"]["port_value"])
                for e in fallback[0]["load_assignment"]["endpoints"][0]["lb_endpoints"]] == [
            (f"{name}.serving.svc", 8000), (f"{name}.serving.svc", 8002)]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"app": "llama"}
        assert [p["port"] for p in svc["spec"]["ports"]] == [8000, 8002]
    else:
        assert fallback == []
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_kv_settings_reach_the_picker_command_line() -> None:
    config = OperatorConfig(kv_residency=True, kv_offload_tokens=65536)
    container = children.deployment(POOL, "llama-epp", config)["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.kv_residency and args.kv_offload_tokens == 65536
    plain = children.deployment(POOL, "llama-epp", OperatorConfig())["spec"]["template"]["spec"]["containers"][0]
    assert not build_parser().parse_args(plain["args"]).kv_residency


def test_identity_settings_reach_the_picker_command_line() -> None:
    """API keys (a Secret per pool, mounted read-only) and an authenticating proxy; none of them by default."""
    plain = _pod()
    args = build_parser().parse_args(plain["containers"][0]["args"])
    assert args.api_keys_file is None and args.trusted_proxies == "" and args.identity_header is None
    assert all(v["name"] != "api-keys" for v in plain["volumes"])
    config = OperatorConfig(picker_api_keys_secret="{pool}-api-keys", picker_trusted_proxies=["10.0.0.0/8", "fd00::/8"],
                            picker_identity_header="x-auth-tenant")
    pod = _pod(config)
    picker = pod["containers"][0]
    args = build_parser().parse_args(picker["args"])
    assert str(args.api_keys_file) == "/var/run/tokenslice/api-keys/api-keys.yaml"
    assert args.trusted_proxies == "10.0.0.0/8,fd00::/8" and args.identity_header == "x-auth-tenant"
    keys = {"key": "api-keys.yaml", "path": "api-keys.yaml"}
    assert {"name": "api-keys", "secret": {"secretName": "llama-api-keys", "items": [keys]}} in pod["volumes"]
    assert {"name": "api-keys", "mountPath": "/var/run/tokenslice/api-keys", "readOnly": True} in picker["volumeMounts"]
    with pytest.raises(ValueError):
        OperatorConfig(picker_trusted_proxies=["not-a-cidr"])
    with pytest.raises(ValueError):
        OperatorConfig(picker_identity_header="x-auth")  # believed from whom?


def test_the_picker_runs_its_default_long_slices_unless_the_operator_sets_a_slice() -> None:
    """No flag by default, so the pool's picker runs the picker's one default (long slices); 0 opts out."""
    def picker_args(config: OperatorConfig) -> list[str]:
        return children.deployment(POOL, "llama-epp", config)["spec"]["template"]["spec"]["containers"][0]["args"]
    plain = picker_args(OperatorConfig())
    assert "--max-slice-tokens" not in plain
    assert build_parser().parse_args(plain).max_slice_tokens == PickerSettings.model_fields["max_slice_tokens"].default
    assert build_parser().parse_args(picker_args(OperatorConfig(picker_max_slice_tokens=0))).max_slice_tokens == 0


def test_a_bad_operator_flag_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Before, ``tokenslice operator run --picker-max-slice-tokens -1`` ended in a pydantic traceback."""
    args = build_parser().parse_args(["operator", "run", "--picker-max-slice-tokens", "-1"])
    assert args._run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenslice operator: --picker-max-slice-tokens:") and "Traceback" not in err
