"""The local stack's parts that need no engine: process groups, configs, the CLI's argument handling."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from pathlib import Path

import pytest

from tokenslice.local import cli
from tokenslice.local.procs import pid_alive, spawn, wait_http
from tokenslice.local.stack import EXAMPLE_POLICY, LocalConfig, RunDir, _round_robin_config
from tokenslice.policy import load_policy


async def _gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (alive := [p for p in pids if pid_alive(p)]) and loop.time() < deadline:
        await asyncio.sleep(0.05)  # polling a condition with a deadline
    return alive


async def test_stop_takes_down_the_whole_process_group(tmp_path: Path) -> None:
    # a child that starts a grandchild and ignores SIGTERM: stop() must still leave nothing behind
    script = "trap '' TERM; sleep 300 & echo $! > grandchild.pid; wait"
    proc = await spawn("stubborn", ["sh", "-c", script], tmp_path / "stubborn.log", cwd=tmp_path)
    pidfile = tmp_path / "grandchild.pid"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    grandchild = int(pidfile.read_text())
    assert pid_alive(proc.pid) and pid_alive(grandchild)
    await proc.stop(timeout_s=0.5)
    assert await _gone([proc.pid, grandchild]) == []


async def test_wait_http_fails_fast_with_the_log_when_the_child_dies(tmp_path: Path) -> None:
    proc = await spawn("broken", ["sh", "-c", "echo cannot start: port taken; exit 3"], tmp_path / "b.log")
    with pytest.raises(RuntimeError, match="port taken"):
        await wait_http(proc, "http://127.0.0.1:9/health", timeout_s=30)
    await proc.stop()


def test_round_robin_envoy_config_is_valid_for_the_real_envoy(tmp_path: Path) -> None:
    from tokenslice_picker.envoy import envoy_binary

    config = _round_robin_config(18080, 18081, ["127.0.0.1:9001", "127.0.0.1:9002"])
    endpoints = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [9001, 9002]
    import yaml

    path = tmp_path / "rr.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_example_policy_and_overrides() -> None:
    policy = load_policy(EXAMPLE_POLICY)
    assert {c.name for c in policy.priority_classes} >= {"interactive", "standard", "batch"}
    assert policy.tenant("batch-a").weight == 2 * policy.tenant("batch-b").weight  # type: ignore[union-attr]
    assert policy.resolve("batch-a", "interactive")[1].name == "batch"   # never escalates
    cfg = LocalConfig(chunk_size=7)
    assert cfg.resolved_policy().chunk_size == 7


def test_run_dir_is_removed_on_close() -> None:
    rd = RunDir()
    (rd.path / "signing.key").write_text("x")
    rd.close()
    assert not rd.path.exists()


def test_local_up_cli_passes_vllm_args_and_rejects_bad_policy(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["up", "--engines", "2", "--chunk-size", "16", "--", "--max-model-len", "2048"])
    assert args.engines == 2 and args.chunk_size == 16
    assert args.vllm_args[-2:] == ["--max-model-len", "2048"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("priorityClasses: [{name: a, priority: 1}, {name: a, priority: 2}]\n")
    assert cli.run(parser.parse_args(["up", "--policy", str(bad)])) == 2
