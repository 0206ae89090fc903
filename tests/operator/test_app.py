"""The running operator (tokenslice_operator.app, .cli): restart convergence, kopf peering, the CLI entrypoint."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest

from tests.fixtures.kube import KubeCluster, free_port, wait_for
from tests.operator.conftest import OperatorThread, operator_options, our_parent, policy_manifest, pool_manifest
from tests.operator.test_reconcile import _policy_file, _wait_children, _wait_condition

pytestmark = pytest.mark.k8s


def test_restart_converges_changes_made_while_down(kube_cluster: KubeCluster, operator_kubeconfig, namespace: str,
                                                   operator: OperatorThread) -> None:
    """Stop a (second, standalone-peered) operator, change things, start a new one: it catches up."""
    kube_cluster.apply(pool_manifest("eta", namespace))
    kube_cluster.apply(policy_manifest("eta", namespace, "eta", chunkSize=10))
    _wait_condition(kube_cluster, "schedulingpolicy", "eta", namespace, "Programmed", "True")

    operator.stop()  # the session operator goes down ...
    try:
        kube_cluster.kubectl("delete", "configmap", "eta-epp-policy", "-n", namespace)
        kube_cluster.kubectl("patch", "schedulingpolicy", "eta", "-n", namespace, "--type=merge",
                             "-p", '{"spec": {"chunkSize": 20}}')
        kube_cluster.apply(pool_manifest("theta", namespace))
        assert kube_cluster.get("configmap", "eta-epp-policy", namespace) is None
    finally:  # ... and a new one (same webhook port and identity) takes its place
        _restart(operator)
    wait_for(lambda: _policy_file(kube_cluster, namespace, "eta").get("chunkSize") == 20, 60,
             "the policy changed while down to be published")
    _wait_children(kube_cluster, namespace, "theta")


def _restart(op: OperatorThread) -> None:
    op.stop_flag.clear()
    op.ready_flag.clear()
    op.start()


def test_two_replicas_do_not_fight(kube_cluster: KubeCluster, operator_kubeconfig, operator: OperatorThread,
                                   namespace: str) -> None:
    """A lower-priority replica (with a different picker image) stays paused while the leader lives,
    and takes over when the leader goes away."""
    standby = OperatorThread(operator_options(kube_cluster, operator_kubeconfig, webhook=False, priority=10,
                                              picker_image="test/picker:standby"), name="standby").start()

    def images() -> set[str]:
        return {(kube_cluster.get("deployment", f"iota{i}-epp", namespace) or {}).get("spec", {})
                .get("template", {}).get("spec", {}).get("containers", [{}])[0].get("image") for i in range(3)}

    def nudge(value: str) -> None:
        kube_cluster.kubectl("label", "inferencepool", "--all", "-n", namespace, f"nudge={value}", "--overwrite")

    try:
        for i in range(3):
            kube_cluster.apply(pool_manifest(f"iota{i}", namespace))
        for i in range(3):
            _wait_children(kube_cluster, namespace, f"iota{i}")
        nudge("1")
        wait_for(lambda: all(our_parent(kube_cluster.get("inferencepool", f"iota{i}", namespace))
                             for i in range(3)), 30, "status entries")
        assert images() == {"test/picker:a"}, "the paused standby replica acted"

        operator.stop()  # the leader goes away: the standby resumes and serves the next events
        try:
            nudge("2")
            wait_for(lambda: images() == {"test/picker:standby"}, 60, "the standby to take over")
        finally:
            standby.stop()
            _restart(operator)
        wait_for(lambda: images() == {"test/picker:a"}, 60, "the restarted leader to converge the pools")
    finally:
        if standby.thread and standby.thread.is_alive():
            standby.stop()


def test_cli_entrypoint_joins_the_peering_and_pauses(kube_cluster: KubeCluster, operator_kubeconfig,
                                                     operator: OperatorThread, namespace: str) -> None:
    """`tokenslice operator run` as the chart runs it: it starts, answers /healthz and yields to the leader."""
    port = free_port()
    log = kube_cluster.workdir / "cli-operator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tokenslice.cli", "operator", "run", "--log-level=INFO",
                                 f"--kubeconfig={operator_kubeconfig}", "--webhook-port=0", "--priority=1",
                                 f"--health-port={port}", "--picker-image=test/picker:cli"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200, 60,
                 f"the CLI operator's /healthz (log: {log})")
        peers = lambda: (kube_cluster.get("clusterkopfpeering", "tokenslice", None).get("status") or {})  # noqa
        wait_for(lambda: any(p.get("priority") == 1 for p in peers().values()), 60,
                 f"the CLI operator in the peering (log: {log})")
        kube_cluster.apply(pool_manifest("kappa", namespace))
        dep = _wait_children(kube_cluster, namespace, "kappa")["deployment"]
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "test/picker:a", "the CLI one acted"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None
