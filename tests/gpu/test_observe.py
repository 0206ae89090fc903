"""scripts/gpu/observe.py: the per-chunk breakdown the GPU benchmark adds to `tokenslice bench`.

The GPU run itself needs the lent H100 (docs/gpu.md); what can fail here without one is how the
observer finds the components by their command lines, reads their real metrics and turns them into
the breakdown rows, and whether it still recognises the benchmark's progress lines.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tokenslice.bench.loadgen import replay
from tokenslice.local.procs import free_port

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_observe", REPO / "scripts" / "gpu" / "observe.py")
observe = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = observe  # dataclasses look their module up while the file executes
assert spec.loader is not None
spec.loader.exec_module(observe)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory):
    """A real sidecar process (its vLLM need not exist: only /tokenslice/metrics is read)."""
    key = tmp_path_factory.mktemp("gpu-observe") / "signing.key"
    key.write_text("k" * 64)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tokenslice", "sidecar", "--host", "127.0.0.1", "--port",
                             str(port), "--vllm-url", "http://127.0.0.1:9", "--signing-key-file", str(key)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/tokenslice/metrics"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "sidecar exited during start"
            assert time.monotonic() < deadline, "sidecar not serving metrics after 60 s"
            time.sleep(0.1)  # polling readiness with a deadline
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


async def test_discovers_and_reads_a_real_sidecar(sidecar: str) -> None:
    found = observe.discover()
    assert sidecar in found.sidecars
    assert len(found.sidecars) == len(set(found.sidecars))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        metrics = await observe.scrape(session, [sidecar])
    assert metrics["tokenslice_sidecar_chunks_total"] == 0
    assert "tokenslice_sidecar_pause_seconds_count" in metrics


def test_breakdown_rows_from_counters() -> None:
    m = observe.SystemMetrics("tokenslice-c32", started=100.0, ended=161.5)
    m.engine_first = {"vllm:prompt_tokens_total": 1000.0, "vllm:prefix_cache_hits_total": 200.0,
                      "vllm:inter_token_latency_seconds_sum": 1.0, "vllm:inter_token_latency_seconds_count": 100.0}
    m.engine_last = {"vllm:prompt_tokens_total": 5000.0, "vllm:prefix_cache_hits_total": 3200.0,
                     "vllm:inter_token_latency_seconds_sum": 9.0, "vllm:inter_token_latency_seconds_count": 1100.0}
    m.sidecar = {"tokenslice_sidecar_chunks_total": 10.0, "tokenslice_sidecar_chunk_tokens_sum": 320.0,
                 "tokenslice_sidecar_chunk_tokens_count": 10.0, "tokenslice_sidecar_chunk_seconds_sum": 3.2,
                 "tokenslice_sidecar_chunk_seconds_count": 10.0}
    m.gateway = {"tokenslice_picker_queue_wait_seconds_sum{batch}": 2.0,
                 "tokenslice_picker_queue_wait_seconds_count{batch}": 4.0}
    row = observe.breakdown(m)
    assert row["vllm_prompt_tokens_cached"] == 3000      # deltas over the system, not totals
    assert row["vllm_prompt_tokens_computed"] == 1000
    assert row["vllm_itl_ms"] == pytest.approx(8.0)      # (9 - 1) s / (1100 - 100) tokens
    assert row["chunk_ms_per_token"] == pytest.approx(10.0)
    assert row["gw_queue_wait_batch_ms"] == pytest.approx(500.0)
    assert row["gw_queue_wait_interactive_ms"] is None
    table = observe.markdown([row])
    assert table.splitlines()[2].startswith("| tokenslice-c32 | 10 | 32.0 |")


async def test_recognises_the_benchmarks_progress_lines() -> None:
    """The observer keys on the runner's '== label (i/n)' and the load generator's '[label] done at'."""
    lines: list[str] = []
    await replay([], _target(), window_s=0.01, drain_s=0, draining=set(), progress=lines.append,
                              label="tokenslice-c16")
    assert any(observe.DONE_LINE.match(line) for line in lines), lines
    source = (REPO / "tokenslice" / "bench" / "runner.py").read_text()
    assert 'progress(f"== {plan.label} ({len(out) + 1}/{len(plans)})")' in source
    assert observe.SYSTEM_LINE.match("== tokenslice-c16 (1/7)").group(1) == "tokenslice-c16"
    assert not observe.DONE_LINE.match("[tokenslice-c16] t=  2.0s sent 3/261 finished 0")


def _target():
    from tokenslice.bench.loadgen import Target

    return Target("tokenslice-c16", "http://127.0.0.1:9", "m")

