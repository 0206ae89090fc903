"""The operator's reconciler against a real kube-apiserver: children, status, policies, drift, deletion."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from tests.fixtures.kube import KubeCluster, wait_for
from tests.operator.conftest import (
    PICKER_API_KEYS_SECRET,
    PICKER_PROXIES,
    OperatorThread,
    condition,
    dump,
    our_parent,
    policy_manifest,
    pool_manifest,
    vllm_pod,
)
from tokenslice.cli import build_parser
from tokenslice_operator.children import PICKER_COMMAND

pytestmark = pytest.mark.k8s
CHILDREN = [("deployment", "{p}-epp"), ("service", "{p}-epp"), ("configmap", "{p}-epp-policy"),
            ("serviceaccount", "{p}-epp"), ("role", "{p}-epp"), ("rolebinding", "{p}-epp"),
            ("secret", "{p}-tokenslice-signing")]


def _children(cluster: KubeCluster, ns: str, pool: str) -> dict[str, dict | None]:
    return {kind: cluster.get(kind, name.format(p=pool), ns) for kind, name in CHILDREN}


def _wait_children(cluster: KubeCluster, ns: str, pool: str) -> dict[str, dict]:
    return wait_for(lambda: (c := _children(cluster, ns, pool)) and all(c.values()) and c, 30,
                    f"the picker objects of pool {ns}/{pool}")


def _policy_file(cluster: KubeCluster, ns: str, pool: str) -> dict:
    cm = cluster.get("configmap", f"{pool}-epp-policy", ns)
    return yaml.safe_load(cm["data"]["policy.yaml"]) if cm else {}


def _wait_condition(cluster: KubeCluster, kind: str, name: str, ns: str, ctype: str, status: str,
                    reason: str | None = None, timeout: float = 30) -> dict:
    def check() -> dict | None:
        c = condition(cluster.get(kind, name, ns), ctype)
        return c if c and c["status"] == status and (reason is None or c["reason"] == reason) else None
    return wait_for(check, timeout, f"{kind} {ns}/{name} {ctype}={status} ({reason}); "
                                    f"now: {dump((cluster.get(kind, name, ns) or {}).get('status'))}")


def test_managed_pool_gets_picker_objects_owned_by_the_pool(kube_cluster: KubeCluster, operator: OperatorThread,
                                                            namespace: str) -> None:
    kube_cluster.apply(pool_manifest("alpha", namespace))
    kids = _wait_children(kube_cluster, namespace, "alpha")
    pool = kube_cluster.get("inferencepool", "alpha", namespace)
    for kind, obj in kids.items():
        owners = obj["metadata"].get("ownerReferences") or []
        assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("InferencePool", "alpha",
                                                                       pool["metadata"]["uid"])], kind
        assert obj["metadata"]["labels"]["tokenslice.io/pool"] == "alpha"

    dep = kids["deployment"]["spec"]["template"]["spec"]
    args = dep["containers"][0]["args"]
    assert dep["containers"][0]["image"] == "test/picker:a"
    assert args[:1] == [PICKER_COMMAND] and "--kube" in args
    assert args[args.index("--pool") + 1] == "alpha" and args[args.index("--namespace") + 1] == namespace
    assert dep["serviceAccountName"] == "alpha-epp"
    volumes = {v["name"]: v for v in dep["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == "alpha-epp-policy"
    assert volumes["signing"]["secret"]["secretName"] == "alpha-tokenslice-signing"

    ports = {p["name"]: p for p in kids["service"]["spec"]["ports"]}
    assert ports["grpc-ext-proc"]["port"] == 9002 and ports["grpc-ext-proc"]["targetPort"] == 9002
    # the pool's gateway: the Service its sidecars' chunk URL names, selecting the picker pod's Envoy
    gateway = wait_for(lambda: kube_cluster.get("service", "alpha-gateway", namespace), 30, "the gateway Service")
    assert gateway["spec"]["ports"][0]["port"] == 8080 and gateway["spec"]["ports"][0]["targetPort"] == "gateway"
    assert gateway["spec"]["selector"] == kids["deployment"]["spec"]["selector"]["matchLabels"]
    assert gateway["metadata"]["ownerReferences"][0]["uid"] == pool["metadata"]["uid"]
    assert [c["name"] for c in dep["containers"]] == ["picker", "gateway"]
    rules = kids["role"]["rules"]
    assert all(set(r["verbs"]) == {"get", "list", "watch"} for r in rules), "picker Role must be read-only"
    assert sorted(r for rule in rules for r in rule["resources"]) == ["inferencepools", "pods",
                                                                       "schedulingpolicies"]
    assert len(base64.b64decode(kids["secret"]["data"]["key"])) == 64
    assert _policy_file(kube_cluster, namespace, "alpha")["chunkSize"] == 32  # defaults: no policy yet

    # readiness lives in our own status.parents entry; no controller-manager here, so the picker is unavailable
    _wait = lambda: our_parent(kube_cluster.get("inferencepool", "alpha", namespace))  # noqa: E731
    ours = wait_for(_wait, 30, "the operator's status.parents entry")
    assert ours["parentRef"]["kind"] == "EndpointPicker"
    assert condition(None, "ResolvedRefs", ours["conditions"])["status"] == "True"
    ready = condition(None, "Ready", ours["conditions"])
    assert (ready["status"], ready["reason"]) == ("False", "PickerUnavailable")


def test_the_pickers_api_keys_and_trusted_proxies_are_wired(kube_cluster: KubeCluster, operator: OperatorThread,
                                                            namespace: str) -> None:
    """The session operator runs with --picker-api-keys-secret '{pool}-api-keys' and --picker-trusted-proxies."""
    kube_cluster.apply(pool_manifest("omega", namespace))
    pod = _wait_children(kube_cluster, namespace, "omega")["deployment"]["spec"]["template"]["spec"]
    picker = pod["containers"][0]
    args = build_parser().parse_args(picker["args"])
    assert str(args.api_keys_file) == "/var/run/tokenslice/api-keys/api-keys.yaml"
    assert args.trusted_proxies == ",".join(PICKER_PROXIES) and args.identity_header is None
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == PICKER_API_KEYS_SECRET.format(pool="omega")
    assert volume["secret"]["items"] == [{"key": "api-keys.yaml", "path": "api-keys.yaml"}]
    mount = next(m for m in picker["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": "/var/run/tokenslice/api-keys", "readOnly": True}


def test_fail_open_pool_gets_a_headless_service_of_its_pods_for_its_gateway(kube_cluster: KubeCluster,
                                                                            operator: OperatorThread,
                                                                            namespace: str) -> None:
    kube_cluster.apply(pool_manifest("phi", namespace, failure_mode="FailOpen", more_ports=(8002,)))
    kids = _wait_children(kube_cluster, namespace, "phi")
    svc = wait_for(lambda: kube_cluster.get("service", "phi-endpoints", namespace), 30, "the endpoints Service")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"app": "phi-vllm"}
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8000, 8000), (8002, 8002)]
    pool = kube_cluster.get("inferencepool", "phi", namespace)
    assert svc["metadata"]["ownerReferences"][0]["uid"] == pool["metadata"]["uid"]
    init = build_parser().parse_args(kids["deployment"]["spec"]["template"]["spec"]["initContainers"][0]["args"])
    host = f"phi-endpoints.{namespace}.svc"
    assert init.envoy_fail_open == f"{host}:8000,{host}:8002"

    kube_cluster.kubectl("patch", "inferencepool", "phi", "-n", namespace, "--type=merge",
                         "-p", '{"spec": {"endpointPickerRef": {"failureMode": "FailClose"}}}')
    wait_for(lambda: kube_cluster.get("service", "phi-endpoints", namespace) is None, 30,
             "the endpoints Service of a pool that is FailClose again to go")

    def fail_open_arg() -> str:
        dep = kube_cluster.get("deployment", "phi-epp", namespace)
        return build_parser().parse_args(dep["spec"]["template"]["spec"]["initContainers"][0]["args"]).envoy_fail_open
    wait_for(lambda: fail_open_arg() == "", 30, "the gateway to be FailClose")


def test_unmanaged_pool_is_left_alone(kube_cluster: KubeCluster, operator: OperatorThread, namespace: str) -> None:
    kube_cluster.apply(pool_manifest("plain", namespace, managed=False))
    kube_cluster.apply(policy_manifest("plain", namespace, "plain"))
    _wait_condition(kube_cluster, "schedulingpolicy", "plain", namespace, "Accepted", "False", "PoolNotManaged")
    assert not any(_children(kube_cluster, namespace, "plain").values())
    assert our_parent(kube_cluster.get("inferencepool", "plain", namespace)) is None


def test_invalid_picker_ref_is_reported_not_deployed(kube_cluster: KubeCluster, operator: OperatorThread,
                                                     namespace: str) -> None:
    pool = pool_manifest("noport", namespace)
    del pool["spec"]["endpointPickerRef"]["port"]
    kube_cluster.apply(pool)
    ours = wait_for(lambda: our_parent(kube_cluster.get("inferencepool", "noport", namespace)), 30, "status")
    resolved = condition(None, "ResolvedRefs", ours["conditions"])
    assert (resolved["status"], resolved["reason"]) == ("False", "InvalidExtensionRef")
    assert "port is required" in resolved["message"]
    assert kube_cluster.get("deployment", "noport-epp", namespace) is None


def test_h2c_pool_is_declined_and_its_pods_are_left_alone(kube_cluster: KubeCluster, operator: OperatorThread,
                                                          namespace: str) -> None:
    pool = pool_manifest("htwo", namespace, labels={"app": "htwo"})
    pool["spec"]["appProtocol"] = "kubernetes.io/h2c"
    kube_cluster.apply(pool)
    ours = wait_for(lambda: our_parent(kube_cluster.get("inferencepool", "htwo", namespace)), 30, "status")
    resolved = condition(None, "ResolvedRefs", ours["conditions"])
    assert (resolved["status"], resolved["reason"]) == ("False", "UnsupportedAppProtocol"), resolved
    assert kube_cluster.get("deployment", "htwo-epp", namespace) is None
    pod = vllm_pod("htwo-0", namespace, {"app": "htwo"})
    kube_cluster.apply(pod)
    assert [c["name"] for c in kube_cluster.get("pod", "htwo-0", namespace)["spec"]["containers"]] == ["vllm"]


def test_policy_is_published_and_programmed(kube_cluster: KubeCluster, operator: OperatorThread,
                                            namespace: str) -> None:
    kube_cluster.apply(pool_manifest("beta", namespace))
    kube_cluster.apply(policy_manifest("beta", namespace, "beta", chunkSize=16))
    c = _wait_condition(kube_cluster, "schedulingpolicy", "beta", namespace, "Programmed", "True")
    assert c["observedGeneration"] == 1
    assert _wait_condition(kube_cluster, "schedulingpolicy", "beta", namespace, "Accepted", "True")
    published = _policy_file(kube_cluster, namespace, "beta")
    assert published["chunkSize"] == 16
    assert [p["name"] for p in published["priorityClasses"]] == ["interactive", "batch"]
    # server-side defaults from the generated schema reached the file too
    assert published["fairness"] == {"input": 1.0, "output": 2.0}

    # an update is re-published and Programmed follows the generation
    kube_cluster.kubectl("patch", "schedulingpolicy", "beta", "-n", namespace, "--type=merge",
                         "-p", '{"spec": {"chunkSize": 64}}')
    wait_for(lambda: _policy_file(kube_cluster, namespace, "beta")["chunkSize"] == 64, 30, "re-published policy")
    wait_for(lambda: condition(kube_cluster.get("schedulingpolicy", "beta", namespace), "Programmed")
             ["observedGeneration"] == 2, 30, "Programmed at generation 2")
    printed = kube_cluster.kubectl("get", "schedulingpolicies", "-n", namespace).stdout
    assert "POOL" in printed and "PROGRAMMED" in printed and "beta" in printed


def test_policy_validated_beyond_the_schema(kube_cluster: KubeCluster, operator: OperatorThread,
                                            namespace: str) -> None:
    kube_cluster.apply(pool_manifest("gamma", namespace))
    kube_cluster.apply(policy_manifest("gamma", namespace, "gamma", chunkSize=8))
    _wait_condition(kube_cluster, "schedulingpolicy", "gamma", namespace, "Programmed", "True")

    bad = policy_manifest("gamma", namespace, "gamma", chunkSize=99,
                          tenants=[{"name": "chat", "allowedClasses": ["gold"]},
                                   {"name": "none", "allowedClasses": []}])
    kube_cluster.apply(bad)
    c = _wait_condition(kube_cluster, "schedulingpolicy", "gamma", namespace, "Accepted", "False", "Invalid")
    assert "unknown class 'gold'" in c["message"] and "still serving generation 1" in c["message"]
    assert "tenant 'none' has an empty allowedClasses" in c["message"]  # once a 500 on every request
    assert condition(kube_cluster.get("schedulingpolicy", "gamma", namespace), "Programmed")["status"] == "False"
    # the invalid edit did not replace the working policy
    assert _policy_file(kube_cluster, namespace, "gamma")["chunkSize"] == 8


def test_policy_waits_for_its_pool_and_conflicts_are_reported(kube_cluster: KubeCluster, operator: OperatorThread,
                                                              namespace: str) -> None:
    kube_cluster.apply(policy_manifest("first", namespace, "later"))
    c = _wait_condition(kube_cluster, "schedulingpolicy", "first", namespace, "Accepted", "False", "PoolNotFound")
    assert "later" in c["message"]
    kube_cluster.apply(policy_manifest("second", namespace, "later", chunkSize=7))
    kube_cluster.apply(pool_manifest("later", namespace))
    _wait_condition(kube_cluster, "schedulingpolicy", "first", namespace, "Programmed", "True")
    c = _wait_condition(kube_cluster, "schedulingpolicy", "second", namespace, "Accepted", "False", "Conflicted")
    assert "first" in c["message"]
    assert _policy_file(kube_cluster, namespace, "later")["chunkSize"] == 32

    # the governing policy goes away: the other one takes over
    kube_cluster.kubectl("delete", "schedulingpolicy", "first", "-n", namespace)
    _wait_condition(kube_cluster, "schedulingpolicy", "second", namespace, "Programmed", "True")
    assert _policy_file(kube_cluster, namespace, "later")["chunkSize"] == 7


def test_drift_is_repaired_and_the_key_is_never_rotated(kube_cluster: KubeCluster, operator: OperatorThread,
                                                        namespace: str) -> None:
    kube_cluster.apply(pool_manifest("delta", namespace))
    kids = _wait_children(kube_cluster, namespace, "delta")
    key = kids["secret"]["data"]["key"]

    kube_cluster.kubectl("delete", "service", "delta-epp", "delta-gateway", "-n", namespace)
    kube_cluster.kubectl("set", "image", "deployment/delta-epp", "picker=evil/image:1", "-n", namespace)
    kube_cluster.kubectl("patch", "configmap", "delta-epp-policy", "-n", namespace, "--type=merge",
                         "-p", '{"data": {"policy.yaml": "chunkSize: 4096\\n"}}')
    kube_cluster.kubectl("delete", "role", "delta-epp", "-n", namespace)
    wait_for(lambda: kube_cluster.get("service", "delta-epp", namespace), 30, "the Service to come back")
    wait_for(lambda: kube_cluster.get("service", "delta-gateway", namespace), 30, "the gateway to come back")
    wait_for(lambda: kube_cluster.get("role", "delta-epp", namespace), 30, "the Role to come back")
    wait_for(lambda: kube_cluster.get("deployment", "delta-epp", namespace)["spec"]["template"]["spec"]
             ["containers"][0]["image"] == "test/picker:a", 30, "the picker image to be restored")
    wait_for(lambda: _policy_file(kube_cluster, namespace, "delta").get("chunkSize") == 32, 30,
             "the policy file to be restored")
    # fields the operator does not own are left to whoever set them
    kube_cluster.kubectl("annotate", "deployment", "delta-epp", "-n", namespace, "team=serving")
    kube_cluster.kubectl("label", "inferencepool", "delta", "-n", namespace, "touch=1")  # forces a reconcile
    wait_for(lambda: our_parent(kube_cluster.get("inferencepool", "delta", namespace)), 30, "status")
    assert kube_cluster.get("deployment", "delta-epp", namespace)["metadata"]["annotations"]["team"] == "serving"
    assert kube_cluster.get("secret", "delta-tokenslice-signing", namespace)["data"]["key"] == key


def test_foreign_status_parents_are_preserved(kube_cluster: KubeCluster, operator: OperatorThread,
                                              namespace: str) -> None:
    kube_cluster.apply(pool_manifest("eps", namespace))
    wait_for(lambda: our_parent(kube_cluster.get("inferencepool", "eps", namespace)), 30, "our status entry")
    pool = kube_cluster.get("inferencepool", "eps", namespace)
    gateway_entry = {"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
                     "controllerName": "example.net/gateway-controller",
                     "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                     "message": "routes attached",
                                     "lastTransitionTime": "2025-01-01T00:00:00Z"}]}
    # a gateway controller writes its entry (replacing the whole atomic list, as such controllers do)
    kube_cluster.kubectl("patch", "inferencepool", "eps", "-n", namespace, "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"parents": [gateway_entry]}}))
    # ... we put ours back without dropping theirs
    def both() -> bool:
        parents = kube_cluster.get("inferencepool", "eps", namespace)["status"]["parents"]
        return {p.get("controllerName") for p in parents} == {"example.net/gateway-controller",
                                                              "tokenslice.io/operator"}
    wait_for(both, 30, "both status.parents entries")
    assert pool["metadata"]["generation"] == kube_cluster.get("inferencepool", "eps", namespace)["metadata"][
        "generation"]


def test_pool_deletion_removes_children(kube_cluster: KubeCluster, operator: OperatorThread, namespace: str) -> None:
    kube_cluster.apply(pool_manifest("zeta", namespace))
    kube_cluster.apply(policy_manifest("zeta", namespace, "zeta"))
    _wait_children(kube_cluster, namespace, "zeta")
    _wait_condition(kube_cluster, "schedulingpolicy", "zeta", namespace, "Programmed", "True")
    kube_cluster.kubectl("delete", "inferencepool", "zeta", "-n", namespace)
    wait_for(lambda: not any(_children(kube_cluster, namespace, "zeta").values()), 30, "children to be removed")
    wait_for(lambda: kube_cluster.get("service", "zeta-gateway", namespace) is None, 30, "the gateway to go")
    _wait_condition(kube_cluster, "schedulingpolicy", "zeta", namespace, "Accepted", "False", "PoolNotFound")


def test_unlabelled_pool_is_released(kube_cluster: KubeCluster, operator: OperatorThread, namespace: str) -> None:
    kube_cluster.apply(pool_manifest("lambda", namespace))
    _wait_children(kube_cluster, namespace, "lambda")
    wait_for(lambda: our_parent(kube_cluster.get("inferencepool", "lambda", namespace)), 30, "our status entry")
    kube_cluster.kubectl("label", "inferencepool", "lambda", "-n", namespace, "tokenslice.io/managed-")
    wait_for(lambda: not any(_children(kube_cluster, namespace, "lambda").values()), 30, "children to be removed")
    wait_for(lambda: our_parent(kube_cluster.get("inferencepool", "lambda", namespace)) is None, 30,
             "our status entry to be removed")


def test_the_operator_reads_no_secret(kube_cluster: KubeCluster, operator: OperatorThread,
                                      operator_kubeconfig, namespace: str) -> None:
    """The chart's ClusterRole once let the operator read (and delete) every Secret in the cluster.

    Now it may create its pools' signing Secrets and delete them with their pool, and read none --
    not even its own -- while everything above still works with exactly that role.
    """
    kube_cluster.apply(pool_manifest("omega", namespace))
    _wait_children(kube_cluster, namespace, "omega")
    as_operator = ["--kubeconfig", str(operator_kubeconfig)]
    for verb in ("get", "list", "watch"):
        out = kube_cluster.kubectl("auth", "can-i", verb, "secrets", "-n", namespace, *as_operator, check=False)
        assert out.stdout.strip() == "no", verb
    assert kube_cluster.kubectl("auth", "can-i", "create", "secrets", "-n", namespace, *as_operator,
                                check=False).stdout.strip() == "yes"
