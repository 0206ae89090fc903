"""Load calibrated to the machine: the scaling arithmetic, and a capacity measured on the real vLLM."""

from __future__ import annotations

import pytest

from tokenslice.bench.calibrate import Capacity, measure_capacity, offered_tokens_per_s, scale_to, scaled_streams
from tokenslice.bench.loadgen import Target
from tokenslice.bench.scenario import Scenario, resolve_scenario


def _calibrated(**calibrate: object) -> Scenario:
    base = resolve_scenario("headline").model_dump()
    base["calibrate"] = {"multiple": 1.3, **calibrate}
    return Scenario.model_validate(base)


def test_background_is_scaled_to_a_multiple_of_the_capacity() -> None:
    sc = _calibrated()
    assert [s.name for s in scaled_streams(sc)] == ["batch-a", "batch-b"]  # the latency probe keeps its rate
    for capacity in (50.0, 400.0, 9000.0):  # a busy CPU, a quiet one, a GPU
        scaled, cal = scale_to(sc, Capacity(capacity, 8, 20, 100))
        assert offered_tokens_per_s(scaled.streams, scaled.window_s) == pytest.approx(1.3 * capacity, rel=1e-6)
        assert cal.offered_tokens_per_s == pytest.approx(1.3 * capacity, rel=1e-6)
        assert scaled.stream("hi").arrivals.rate == sc.stream("hi").arrivals.rate
        a, b = scaled.stream("batch-a").arrivals.rate, scaled.stream("batch-b").arrivals.rate
        assert a / b == pytest.approx(sc.stream("batch-a").arrivals.rate / sc.stream("batch-b").arrivals.rate)
    with pytest.raises(ValueError, match="calibrate.streams"):
        _calibrated(streams=["nope"])


@pytest.mark.engine
async def test_capacity_is_measured_on_the_real_engine(vllm) -> None:
    base = resolve_scenario("demo").model_dump()
    base.update(calibrate={"multiple": 1.3, "seconds": 3, "warmup_s": 1}, max_num_seqs=4)
    sc = Scenario.model_validate(base)
    cap = await measure_capacity([Target("calibrate", vllm.url, vllm.model)], sc)
    assert cap.tokens_per_s > 0 and cap.requests >= cap.concurrency == 8
    scaled, cal = scale_to(sc, cap)
    assert cal.offered_tokens_per_s == pytest.approx(1.3 * cap.tokens_per_s, rel=1e-6)
