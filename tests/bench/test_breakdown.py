"""The per-chunk breakdown: the runner's scrape hook reads a real sidecar; rows from counters."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenslice.bench.breakdown import Observation, breakdown, markdown
from tokenslice.bench.runner import observe
from tokenslice.local.stack import EXAMPLE_POLICY, DataPlane, RunDir
from tokenslice.policy import load_policy
from tokenslice.procs import ManagedProcess, free_port, spawn, wait_http


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ManagedProcess]]:
    """A real sidecar process (its vLLM need not exist: only /tokenslice/metrics is read)."""
    folder = tmp_path_factory.mktemp("breakdown")
    key = folder / "signing.key"
    key.write_text("k" * 64)
    port = free_port()
    proc = spawn("sidecar", [sys.executable, "-m", "tokenslice", "sidecar", "--host", "127.0.0.1", "--port",
                             str(port), "--vllm-url", "http://127.0.0.1:9", "--signing-key-file", str(key)],
                 folder / "sidecar.log")
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.stop_sync()


async def test_the_scrape_hook_reads_the_sidecars_of_a_running_plane(sidecar: tuple[str, ManagedProcess]) -> None:
    address, proc = sidecar
    await wait_http(f"http://{address}/tokenslice/metrics", 60, proc)
    run_dir = RunDir()
    try:
        plane = DataPlane([], load_policy(EXAMPLE_POLICY), run_dir, mode="chunked", sidecar_addresses=[address])
        raw, obs = await observe(plane, [])
    finally:
        run_dir.close()
    assert raw == []  # no engines, no picker in this plane
    assert obs.sidecar["tokenslice_sidecar_chunks_total"] == 0
    assert "tokenslice_sidecar_pause_seconds_count" in obs.sidecar
    assert not any(k.endswith("_bucket") for k in obs.sidecar)


def _obs(picker_prefix: str) -> Observation:
    return Observation(
        seconds=61.5,
        engine={"vllm:prompt_tokens_total": 4000.0, "vllm:prefix_cache_hits_total": 3000.0,
                "vllm:inter_token_latency_seconds_sum": 8.0, "vllm:inter_token_latency_seconds_count": 1000.0},
        sidecar={"tokenslice_sidecar_chunks_total": 10.0, "tokenslice_sidecar_chunk_tokens_sum": 320.0,
                 "tokenslice_sidecar_chunk_tokens_count": 10.0, "tokenslice_sidecar_chunk_seconds_sum": 3.2,
                 "tokenslice_sidecar_chunk_seconds_count": 10.0},
        picker={f"{picker_prefix}queue_wait_seconds_sum{{batch}}": 2.0,
                f"{picker_prefix}queue_wait_seconds_count{{batch}}": 4.0})


@pytest.mark.parametrize("prefix", ["tokenslice_picker_", "tokenslice_gateway_"])
def test_breakdown_rows_from_counters(prefix: str) -> None:
    row = breakdown("tokenslice-c32", _obs(prefix))
    assert row["vllm_prompt_tokens_cached"] == 3000
    assert row["vllm_prompt_tokens_computed"] == 1000
    assert row["vllm_itl_ms"] == pytest.approx(8.0)
    assert row["chunk_ms_per_token"] == pytest.approx(10.0)
    assert row["gw_queue_wait_batch_ms"] == pytest.approx(500.0)  # either name of the picker's metrics
    assert row["gw_queue_wait_interactive_ms"] is None
    table = markdown([row])
    assert table.splitlines()[2].startswith("| tokenslice-c32 | 10 | 32.0 |")


def test_the_gpu_scripts_no_longer_scan_processes() -> None:
    repo = Path(__file__).resolve().parents[2]
    script = (repo / "scripts" / "gpu" / "bench-gpu.sh").read_text()
    assert "observe.py" not in script and "-m tokenslice bench run" in script
