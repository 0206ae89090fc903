"""``tokenslice picker`` as a process: flags, key file, policy file, gRPC health, clean shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenslice.procs import free_port


async def test_cli_serves_health_and_metrics_then_stops(tmp_path):
    (tmp_path / "key").write_text("s" * 32 + "\n")
    (tmp_path / "policy.yaml").write_text("apiVersion: tokenslice.io/v1alpha1\nkind: SchedulingPolicy\n"
                                          "metadata: {name: p}\nspec: {chunkSize: 16}\n")
    grpc_port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tokenslice", "picker", "--grpc-host", "127.0.0.1",
                             "--grpc-port", str(grpc_port), "--metrics-host", "127.0.0.1", "--metrics-port",
                             str(metrics_port), "--policy", str(tmp_path / "policy.yaml"),
                             "--endpoints", "127.0.0.1:1", "--signing-key-file", str(tmp_path / "key"),
                             "--scrape-interval", "0"], stderr=subprocess.PIPE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status: list[int] = []

            async def probe() -> None:
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(
                        service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=1)
                    status.append(r.status)
                except grpc.aio.AioRpcError:
                    pass

            deadline = asyncio.get_running_loop().time() + 30
            while not status and asyncio.get_running_loop().time() < deadline and proc.poll() is None:
                await probe()
            assert status == [health_pb2.HealthCheckResponse.SERVING]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"picker started" in err  # structured JSON log line


def test_cli_rejects_bad_input_clearly(tmp_path):
    (tmp_path / "bad.yaml").write_text("slotsPerEndpoint: 0\n")
    (tmp_path / "key").write_text("k" * 32)
    (tmp_path / "weak").write_text("k" * 31)
    cases = [
        (["--endpoints", "127.0.0.1:1"], "no signing key"),
        (["--endpoints", "127.0.0.1:1", "--signing-key-file", str(tmp_path / "weak")], "at least 32 are required"),
        (["--endpoints", "db.local:1", "--signing-key-file", str(tmp_path / "key")], "must be an IP address"),
        (["--endpoints", "127.0.0.1:1", "--signing-key-file", str(tmp_path / "key"), "--policy",
          str(tmp_path / "bad.yaml")], "slotsPerEndpoint"),
        (["--signing-key-file", str(tmp_path / "key")], "--endpoints"),
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, "-m", "tokenslice", "picker", *args], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"}, timeout=60)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


@pytest.mark.parametrize("fail_open", ["", "llama-endpoints.serving.svc:8000,llama-endpoints.serving.svc:8002"])
def test_print_envoy_config_is_valid_for_envoy(tmp_path, envoy_bin, fail_open):
    r = subprocess.run([sys.executable, "-m", "tokenslice", "picker", "--print-envoy-config", "--grpc-port", "9002",
                        "--envoy-fail-open", fail_open], capture_output=True, text=True, check=True, timeout=60)
    assert ("failure_mode_allow: true" in r.stdout) == bool(fail_open)
    assert ("llama-endpoints.serving.svc" in r.stdout) == bool(fail_open)
    (tmp_path / "envoy.yaml").write_text(r.stdout)
    v = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr




def test_gateway_is_a_hidden_deprecated_alias(tmp_path):
    (tmp_path / "key").write_text("k" * 32)
    r = subprocess.run([sys.executable, "-m", "tokenslice", "gateway", "--signing-key-file", str(tmp_path / "key")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "deprecated, use `tokenslice picker`" in r.stderr and "--endpoints" in r.stderr
    listed = subprocess.run([sys.executable, "-m", "tokenslice", "--help"], capture_output=True, text=True, timeout=60)
    assert "picker" in listed.stdout and "gateway " not in listed.stdout
