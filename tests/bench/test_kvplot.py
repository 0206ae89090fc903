"""kv_overflow.png: what paused contexts cost (recomputed vs loaded from CPU offload), from a live run and
re-read from a stored results.json by `tokenslice bench kv`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.test_loadgen import _scenario, _system
from tokenslice.bench import plots
from tokenslice.bench.report import summarize, write_json


def _counters(prompt: float, cached: float, offloaded: float = 0.0) -> dict[str, float]:
    """vLLM counter deltas of one system (the first chunks' prompts are the requests' own, 0 here)."""
    return {"prompt_tokens": prompt, "prefix_cache_hits": cached, "offload_hits": offloaded,
            "kv_computed_count": 40.0, "kv_computed_le:16": 10.0}


def _run(off: dict[str, float], offload: dict[str, float]):  # type: ignore[no-untyped-def]
    sc = _scenario(window_s=30, warmup_s=8)
    results = [_system("tokenslice-c32-r1", "tokenslice", 0.3, 400, 200, chunk=32),
               _system("tokenslice-c32-r1-offload", "tokenslice", 0.2, 400, 200, chunk=32),
               _system("unloaded-tokenslice-c32", "tokenslice", 0.1, 0, 0, unloaded=True, chunk=32)]
    results[0].engine_counters, results[1].engine_counters = off, offload
    return sc, results, [summarize(r, sc) for r in results]


def test_an_overflowed_run_draws_what_its_continuations_recomputed_and_loaded(tmp_path: Path) -> None:
    sc, results, summaries = _run(_counters(10000, 2000), _counters(10000, 2000, offloaded=7500))
    bars = plots.kv_bars(results, summaries, sc)
    assert [(b.label, b.recomputed, b.offloaded) for b in bars] == [
        ("tokenslice-c32-r1", 8000.0, 0.0), ("tokenslice-c32-r1-offload", 500.0, 7500.0)]  # the unloaded run: none
    assert bars[0].focus_p99 is not None and bars[0].focus_p99 > bars[1].focus_p99  # type: ignore[operator]
    written = plots.write_all(results, summaries, sc, tmp_path)
    assert tmp_path / "kv_overflow.png" in written and (tmp_path / "kv_overflow.png").stat().st_size > 10_000

    # the same bars re-read from the stored run, and the CLI that draws them
    write_json(tmp_path / "results.json", sc, results, summaries, {"command": "test"})
    doc = json.loads((tmp_path / "results.json").read_text())
    assert plots.kv_bars_from_json(doc) == bars
    out = subprocess.run([sys.executable, "-m", "tokenslice", "bench", "kv", str(tmp_path / "results.json"),
                          "--out", str(tmp_path / "again.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_no_kv_plot_where_the_prefix_cache_held_the_paused_contexts(tmp_path: Path) -> None:
    sc, results, summaries = _run(_counters(10000, 9500), _counters(10000, 9600))  # 5% and 4% recomputed
    assert plots.kv_bars(results, summaries, sc) == []
    assert tmp_path / "kv_overflow.png" not in plots.write_all(results, summaries, sc, tmp_path)


def test_the_kv_plot_says_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"systems": []}')
    out = subprocess.run([sys.executable, "-m", "tokenslice", "bench", "kv", str(tmp_path / "results.json"),
                          "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot read" in out.stderr and not (tmp_path / "x.png").exists()
