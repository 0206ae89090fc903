"""The Helm chart with the real helm v4: lint, template, schema validation, install against the real API server."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.fixtures.kube import KubeCluster, chart_for_test_server, wait_for
from tests.operator.conftest import CHART, OperatorThread, condition
from tokenslice.cli import build_parser

pytestmark = pytest.mark.k8s
FULL = ["--set", "example.enabled=true", "--set", "gateway.port=80", "--set", "operator.replicas=2"]
CUSTOM_KINDS = {"InferencePool", "SchedulingPolicy", "ClusterKopfPeering"}
# a current Kubernetes release whose OpenAPI schemas ship offline in kubernetes-validate
K8S_VERSION = kubernetes_validate.utils.latest_version()


def _template(cluster: KubeCluster, *args: str) -> list[dict[str, Any]]:
    out = cluster.helm("template", "ts", str(CHART), "--namespace", "tokenslice-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint(kube_cluster: KubeCluster) -> None:
    out = kube_cluster.helm("lint", "--strict", str(CHART)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    kube_cluster.helm("lint", "--strict", str(CHART), *FULL)


def test_values_schema_rejects_bad_values(kube_cluster: KubeCluster) -> None:
    proc = kube_cluster.helm("template", "ts", str(CHART), "--set", "webhook.failurePolicy=Sometimes", check=False)
    assert proc.returncode != 0 and "failurePolicy" in proc.stderr
    proc = kube_cluster.helm("template", "ts", str(CHART), "--set", "gateway.enabled=true", check=False)
    assert proc.returncode != 0 and "enabled" in proc.stderr, "the chart deploys no Envoy of its own any more"
    proc = kube_cluster.helm("template", "ts", str(CHART), "--set", "gateway.port=0", check=False)
    assert proc.returncode != 0 and "/gateway/port" in proc.stderr


@pytest.mark.parametrize("args", [[], FULL], ids=["defaults", "everything"])
def test_rendered_manifests_validate_against_kubernetes_schemas(kube_cluster: KubeCluster, args: list[str]) -> None:
    docs = _template(kube_cluster, *args)
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "MutatingWebhookConfiguration",
            "Secret", "Service", "ClusterKopfPeering"} <= set(kinds)
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises with the offending path
    # custom resources: validated by the real API server against the CRDs (server-side dry run)
    custom = [d for d in docs if d["kind"] in CUSTOM_KINDS]
    if args:
        assert {d["kind"] for d in custom} == CUSTOM_KINDS


def test_custom_resources_in_the_chart_pass_server_side_validation(crds: KubeCluster) -> None:
    docs = [d for d in _template(crds, *FULL) if d["kind"] in CUSTOM_KINDS]
    crds.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tokenslice-system"}})
    text = "\n---\n".join(json.dumps(d) for d in docs)
    out = crds.kubectl("apply", "--dry-run=server", "-f", "-", input=text).stdout
    assert "inferencepool.inference.networking.k8s.io/example-pool created (server dry run)" in out


def test_operator_args_name_the_gateway_settings(kube_cluster: KubeCluster) -> None:
    """gateway.* reaches the operator, which gives every pool its gateway; no chunk URL unless one is set."""
    op = next(d for d in _template(kube_cluster, *FULL) if d["kind"] == "Deployment")
    args = op["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--gateway-image=docker.io/envoyproxy/envoy:v1.40.0" in args and "--gateway-port=80" in args
    assert "--gateway-service={pool}-gateway" in args and not any(a.startswith("--chunk-url") for a in args)
    op = next(d for d in _template(kube_cluster, "--set", "operator.chunkURL=http://gw.x.svc:81")
              if d["kind"] == "Deployment")
    assert "--chunk-url=http://gw.x.svc:81" in op["spec"]["template"]["spec"]["containers"][0]["args"]


def test_kv_values_reach_the_operator(kube_cluster: KubeCluster) -> None:
    """kv.* (residency, CPU offload) become operator flags; none of them by default."""
    def args(*sets: str) -> list[str]:
        op = next(d for d in _template(kube_cluster, *sets) if d["kind"] == "Deployment")
        return op["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--kv-") for a in args())
    on = args("--set", "kv.residency=true", "--set", "kv.offloadGiB=8", "--set", "kv.offloadTokens=65536")
    assert {"--kv-residency", "--kv-offload-gib=8", "--kv-offload-tokens=65536"} <= set(on)
    parsed = build_parser().parse_args(on)
    assert parsed.kv_residency and parsed.kv_offload_gib == 8 and parsed.kv_offload_tokens == 65536


def test_picker_identity_values_reach_the_operator(kube_cluster: KubeCluster) -> None:
    """picker.* (API keys Secret, trusted proxies, identity header) become operator flags; none by default."""
    def args(*sets: str) -> list[str]:
        op = next(d for d in _template(kube_cluster, *sets) if d["kind"] == "Deployment")
        return op["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--picker-") and not a.startswith("--picker-image") for a in args())
    on = args("--set-json", "picker.apiKeysSecret=\"{pool}-keys\"", "--set", "picker.apiKeysSecretKey=keys.yaml",
              "--set", "picker.trustedProxies={10.0.0.0/8,192.168.0.0/16}", "--set", "picker.identityHeader=x-user")
    parsed = build_parser().parse_args(on)
    assert (parsed.picker_api_keys_secret, parsed.picker_api_keys_key) == ("{pool}-keys", "keys.yaml")
    assert parsed.picker_trusted_proxies == "10.0.0.0/8,192.168.0.0/16" and parsed.picker_identity_header == "x-user"
    proc = kube_cluster.helm("template", "ts", str(CHART), "--set", "picker.trustedProxies={evil proxy}", check=False)
    assert proc.returncode != 0 and "trustedProxies" in proc.stderr


def test_picker_max_slice_tokens_reaches_the_operator_only_when_set(kube_cluster: KubeCluster) -> None:
    """Unset (null): no flag, every picker runs its default (long slices); 0 (per-slice mode) is passed, not dropped."""
    def args(*sets: str) -> list[str]:
        op = next(d for d in _template(kube_cluster, *sets) if d["kind"] == "Deployment")
        return op["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--picker-max-slice-tokens") for a in args())
    per_slice = args("--set", "picker.maxSliceTokens=0")
    assert "--picker-max-slice-tokens=0" in per_slice
    assert build_parser().parse_args(per_slice).picker_max_slice_tokens == 0
    proc = kube_cluster.helm("template", "ts", str(CHART), "--set", "picker.maxSliceTokens=-1", check=False)
    assert proc.returncode != 0 and "maxSliceTokens" in proc.stderr


def test_helm_install_upgrade_uninstall(kube_cluster: KubeCluster, operator: OperatorThread, tmp_path: Path) -> None:
    ns, release = "tokenslice-system", "ts"
    args = ["--namespace", ns, "--create-namespace", *FULL]
    install = [*args, "--server-side=false"]  # Helm 4: chart crds/ skip existing CRDs only this way (docs)
    pools_crd = "inferencepools.inference.networking.k8s.io"
    # an InferencePool CRD already there, as a Gateway API Inference Extension install leaves it -- of another
    # release than the chart's (a different description), so re-applying the chart's would change it
    kube_cluster.kubectl("annotate", "crd", pools_crd, "installed-by=gateway-api-inference-extension", "--overwrite")
    kube_cluster.kubectl("patch", "crd", pools_crd, "--type=json", "-p", json.dumps([{
        "op": "replace", "path": "/spec/versions/0/schema/openAPIV3Schema/description",
        "value": "InferencePool of another Inference Extension release."}]))
    before = kube_cluster.get("crd", pools_crd, None)["spec"]
    chart = chart_for_test_server(CHART, tmp_path / "chart")
    try:
        out = kube_cluster.helm("install", release, str(chart), *install).stdout
        assert "STATUS: deployed" in out
        # the CRDs were already installed: Helm left them alone, so an existing upstream install coexists
        crd = kube_cluster.get("crd", pools_crd, None)
        assert "meta.helm.sh/release-name" not in (crd["metadata"].get("annotations") or {})
        assert crd["spec"] == before, "the chart must not rewrite an existing CRD"
        assert crd["metadata"]["annotations"]["installed-by"] == "gateway-api-inference-extension"
        op = kube_cluster.get("deployment", "ts-tokenslice-operator", ns)
        assert op["spec"]["replicas"] == 2
        assert "--peering-name=ts-tokenslice" in op["spec"]["template"]["spec"]["containers"][0]["args"]
        assert kube_cluster.get("clusterkopfpeering", "ts-tokenslice", None)
        # the example pool and policy are live: the (in-process) operator serves them
        wait_for(lambda: kube_cluster.get("deployment", "example-pool-epp", ns), 30, "the example picker")
        wait_for(lambda: (condition(kube_cluster.get("schedulingpolicy", "example-pool", ns), "Programmed") or {})
                 .get("status") == "True", 30, "the example policy to be Programmed")

        hook = kube_cluster.get("mutatingwebhookconfiguration", "ts-tokenslice-sidecar-injector", None)
        ca = hook["webhooks"][0]["clientConfig"]["caBundle"]
        secret = kube_cluster.get("secret", "ts-tokenslice-webhook-tls", ns)
        assert base64.b64decode(ca) == base64.b64decode(secret["data"]["ca.crt"])
        kube_cluster.helm("upgrade", release, str(chart), *args)
        hook = kube_cluster.get("mutatingwebhookconfiguration", "ts-tokenslice-sidecar-injector", None)
        assert hook["webhooks"][0]["clientConfig"]["caBundle"] == ca, "upgrade must keep the webhook certificate"
        assert kube_cluster.get("crd", pools_crd, None)["spec"] == before
    finally:
        kube_cluster.helm("uninstall", release, "--namespace", ns, check=False)
    assert kube_cluster.get("mutatingwebhookconfiguration", "ts-tokenslice-sidecar-injector", None) is None


def test_helm_install_on_an_empty_cluster_installs_the_crds(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A cluster without any of our CRDs: `helm install` alone brings them (chart crds/) and the CRs.

    The chart's crds/ go through ``for_test_server`` first: the InferencePool CRD (CEL rules, an
    empty-string default) cannot be installed on this v1.20 test server; test_crd_cel.py installs it unchanged.
    """
    from tests.fixtures.kube import running_cluster

    work = tmp_path_factory.mktemp("fresh-kube")
    chart = chart_for_test_server(CHART, work / "chart")
    with running_cluster(work) as fresh:
        assert fresh.get("crd", "inferencepools.inference.networking.k8s.io", None) is None
        fresh.helm("install", "ts", str(chart), "--namespace", "tokenslice-system", "--create-namespace", *FULL,
                   "--server-side=false")
        for crd in ("inferencepools.inference.networking.k8s.io", "schedulingpolicies.tokenslice.io",
                    "clusterkopfpeerings.kopf.dev"):
            assert fresh.get("crd", crd, None), crd
        assert fresh.get("inferencepool", "example-pool", "tokenslice-system")["spec"]["endpointPickerRef"][
            "failureMode"] == "FailClose"
        assert fresh.get("schedulingpolicy", "example-pool", "tokenslice-system")["spec"]["chunkSize"] == 32
        assert fresh.get("clusterkopfpeering", "ts-tokenslice", None)
