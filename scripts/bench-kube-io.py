"""Kubernetes I/O of the picker, one checkout against another: import time, start-up, RSS, watch latency.

    .venv/bin/python scripts/bench-kube-io.py NAME=CHECKOUT [NAME=CHECKOUT ...] [--pods 200] [--changes 30]

Each CHECKOUT is a source tree with its own ``.venv`` (``make setup``): e.g. ``main=/work/main`` (the
hand-written aiohttp client) and ``branch=.`` (kubernetes_asyncio).  One real etcd + kube-apiserver
(tests/fixtures/kube.py, ``make kube``) holds an InferencePool and ``--pods`` Ready pods; for each checkout,
rounds alternating, it measures

* import time of ``tokenslice_picker.datastore.kube`` and ``tokenslice_operator.app`` (fresh interpreter,
  median of 5),
* start-up: ``tokenslice picker --kube`` spawned until its /metrics counts every pod (imports + credentials +
  first list),
* RSS (VmRSS) of that picker once it holds the pool, and after the changes below,
* watch latency: a pod's status is patched Ready, until the picker's /metrics counts it (polled every 2 ms),
  ``--changes`` times, one at a time,
* the operator (``tokenslice operator run --webhook-port 0``, the chart's peering object): RSS once it has
  converged a new managed pool, and the time from creating that pool to its status written by the operator.

Prints a table; nothing passes or fails on a number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fixtures.kube import KubeCluster, free_port, running_cluster  # noqa: E402

IMPORTS = ("tokenslice_picker.datastore.kube", "tokenslice_operator.app")


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "llm"}},
            "spec": {"containers": [{"name": "c", "image": "example.invalid/none"}]}}


def _ready(cluster: KubeCluster, ns: str, name: str, ip: str) -> None:
    cluster.api("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": {
        "phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})


def _endpoints(metrics_url: str) -> int | None:
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("tokenslice_picker_endpoints "):
                    return int(float(line.split()[1]))
    except OSError:
        return None
    return None


def _until(predicate, timeout_s: float, what: str) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(what)
        time.sleep(0.002)  # polling interval of the measurement
    return time.perf_counter() - start


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def import_time(checkout: Path, module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([str(checkout / ".venv/bin/python"), "-c", code], cwd=checkout, check=True,
                                 capture_output=True, text=True).stdout) for _ in range(5)]
    return statistics.median(runs)


def picker_round(cluster: KubeCluster, checkout: Path, ns: str, pods: int, changes: list[str], first_ip: int,
                 work: Path) -> dict[str, float]:
    metrics_port, grpc_port = free_port(), free_port()
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    (work / "key").write_bytes(b"k" * 32)
    (work / "policy.yaml").write_text("{}\n")
    argv = [str(checkout / ".venv/bin/python"), "-m", "tokenslice", "picker", "--kube", "--pool", "pool",
            "--namespace", ns, "--kubeconfig", str(cluster.kubeconfig), "--policy", str(work / "policy.yaml"),
            "--signing-key-file", str(work / "key"), "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--scrape-interval", "0",
            "--log-level", "warning"]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=checkout, stdout=subprocess.DEVNULL, stderr=open(work / "picker.log", "ab"))  # noqa: SIM115
    try:
        _until(lambda: _endpoints(metrics) == pods, 120, "picker holds the pool")
        out = {"startup_s": time.perf_counter() - start, "rss_ready_mib": _rss_mib(proc.pid)}
        lat = []
        for i, name in enumerate(changes):
            _ready(cluster, ns, name, f"10.2.{(first_ip + i) // 250}.{(first_ip + i) % 250 + 1}")
            t0 = time.perf_counter()
            _until(lambda n=pods + i + 1: _endpoints(metrics) == n, 30, f"{name} counted")
            lat.append((time.perf_counter() - t0) * 1000)
        out.update(latency_p50_ms=statistics.median(lat), latency_max_ms=max(lat),
                   rss_after_mib=_rss_mib(proc.pid))
        return out
    finally:
        proc.terminate()
        proc.wait(15)


def operator_round(cluster: KubeCluster, checkout: Path, ns: str, pool: str, work: Path) -> dict[str, float]:
    health = free_port()
    argv = [str(checkout / ".venv/bin/python"), "-m", "tokenslice", "operator", "run", "--kubeconfig",
            str(cluster.kubeconfig), "--webhook-port", "0", "--health-port", str(health),
            "--health-host", "127.0.0.1", "--log-level", "WARNING"]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=checkout, stdout=subprocess.DEVNULL, stderr=open(work / "operator.log", "ab"))  # noqa: SIM115

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def converged() -> bool:
        obj = cluster.get("inferencepool", pool, ns) or {}
        return any(p.get("controllerName") == "tokenslice.io/operator"
                   for p in (obj.get("status") or {}).get("parents") or [])

    try:
        _until(healthy, 120, "operator healthy")
        out = {"operator_startup_s": time.perf_counter() - start}
        cluster.apply({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                       "metadata": {"name": pool, "namespace": ns, "labels": {"tokenslice.io/managed": "true"}},
                       "spec": {"selector": {"matchLabels": {"app": pool}}, "targetPorts": [{"number": 8000}],
                                "endpointPickerRef": {"name": f"{pool}-epp", "port": {"number": 9002}}}})
        t0 = time.perf_counter()
        _until(converged, 120, "the operator wrote the pool's status")
        out.update(operator_converge_s=time.perf_counter() - t0, operator_rss_mib=_rss_mib(proc.pid))
        return out
    except TimeoutError:
        print((work / "operator.log").read_text()[-3000:], cluster.get("inferencepool", pool, ns), file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", help="NAME=PATH of a checkout with its own .venv")
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    checkouts = {n: Path(p).resolve() for n, p in (c.split("=", 1) for c in args.checkouts)}
    rows: list[tuple[str, str, float]] = []
    for name, checkout in checkouts.items():
        for module in IMPORTS:
            rows.append((name, f"import {module} (s)", import_time(checkout, module)))
    with tempfile.TemporaryDirectory() as tmp, running_cluster(Path(tmp)) as cluster:
        cluster.kubectl("apply", "-f", str(REPO / "crds"))
        _until(lambda: cluster.kubectl("get", "clusterkopfpeerings", check=False).returncode == 0, 60, "CRDs")
        cluster.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "tokenslice"}})
        ns = "bench"
        cluster.kubectl("create", "namespace", ns)
        _until(lambda: cluster.kubectl("get", "inferencepools", "-n", ns, check=False).returncode == 0, 60, "CRD")
        cluster.apply({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                       "metadata": {"name": "pool", "namespace": ns},
                       "spec": {"selector": {"matchLabels": {"app": "llm"}}, "targetPorts": [{"number": 8000}],
                                "endpointPickerRef": {"name": "picker", "port": {"number": 9002}}}})
        for i in range(args.pods):
            cluster.api("POST", f"/api/v1/namespaces/{ns}/pods", _pod(f"p{i}"))
            _ready(cluster, ns, f"p{i}", f"10.1.{i // 250}.{i % 250 + 1}")
        pods, ip = args.pods, 0
        for r in range(args.rounds):
            for name, checkout in checkouts.items():
                changes = [f"r{r}-{name}-{i}" for i in range(args.changes)]
                for c in changes:
                    cluster.api("POST", f"/api/v1/namespaces/{ns}/pods", _pod(c))
                res = picker_round(cluster, checkout, ns, pods, changes, ip, Path(tmp))
                pods, ip = pods + args.changes, ip + args.changes
                res.update(operator_round(cluster, checkout, ns, f"op-{r}-{name}", Path(tmp)))
                rows += [(name, f"{k} (round {r + 1})", v) for k, v in res.items()]
    print(f"{'checkout':<10} {'measure':<58} {'value':>10}")
    for name, measure, value in rows:
        print(f"{name:<10} {measure:<58} {value:>10.3f}")
    print(f"(kube-apiserver: {os.environ.get('TOKENSLICE_CACHE', '.cache')}/kube; pods at start: {args.pods})")


if __name__ == "__main__":
    main()
