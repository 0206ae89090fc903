"""Preemption numbers from the picker's real metrics registry, and histogram quantiles by hand."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from tokenslice import promtext
from tokenslice.bench import preemption
from tokenslice_picker.metrics import PickerMetrics, PickerSnapshot


class _Idle:
    """The picker's state source with nothing queued (only the histograms and counters matter here)."""

    def snapshot(self, now: float) -> PickerSnapshot:
        return PickerSnapshot({}, {}, [], 1.0, {}, {})


def test_histogram_quantile_by_hand() -> None:
    text = "\n".join([
        "# TYPE h histogram",
        'h_bucket{le="0.001"} 0', 'h_bucket{le="0.005"} 99', 'h_bucket{le="0.5"} 100', 'h_bucket{le="+Inf"} 100',
        "h_sum 1", "h_count 100", ""])
    samples = promtext.parse(text)
    assert promtext.histogram_quantile(samples, "h", 0.5) == pytest.approx(0.001 + 0.004 * 50 / 99)
    assert promtext.histogram_quantile(samples, "h", 0.99) == pytest.approx(0.005)
    assert promtext.histogram_quantile(samples, "h", 0.995) == pytest.approx(0.005 + 0.495 * 0.5)
    assert promtext.histogram_quantile(samples, "missing", 0.5) is None


def test_preemption_summary_from_the_pickers_registry() -> None:
    m = PickerMetrics()
    m.attach(_Idle())
    for _ in range(10):
        m.preemptions.labels("priority", "batch").inc()
    for _ in range(99):
        m.cut_to_free_seconds.observe(0.002)
    m.cut_to_free_seconds.observe(0.3)
    m.cut_tokens.labels("recomputed").inc(150)
    m.cut_tokens.labels("produced").inc(320)
    waits = m.queue_wait.child("interactive", "web")
    for _ in range(4):
        m.queue_wait.observe(waits, 0.004)
    m.queue_wait.observe(m.queue_wait.child("batch", "batch-a"), 20.0)  # another class: not the waiter's
    samples = promtext.parse(generate_latest(m.registry).decode())
    p = preemption.summarize(samples, seconds=20.0, waiter_class="interactive")
    assert p["preemptions"] == 10 and p["preemptions_per_s"] == pytest.approx(0.5)
    assert 0.001 < p["cut_to_free_p50_s"] <= 0.005 and p["cut_to_free_p99_s"] == pytest.approx(0.005)
    assert p["waiter_queue_p99_s"] <= 0.005  # the batch chunk's 20 s wait is not the waiter's
    assert p["recomputed_tokens_per_preemption"] == 15 and p["cut_chunk_tokens_per_preemption"] == 32
