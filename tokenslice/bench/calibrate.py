"""Load calibrated to the machine: measure vLLM FCFS's capacity first, then offer a fixed multiple of it.

A scenario with fixed arrival rates measures different things on different hardware: the
headline that saturated 2 CPU cores barely queued anything on an H200. With ``calibrate:``
in the scenario, the run first drives the (FCFS) engines closed-loop with the scenario's
own background requests, counts the output tokens per second they deliver at saturation,
and then scales the background streams' arrival rates so that everything offered comes
to ``multiple`` x that capacity -- so every scenario saturates whatever it runs on, and
"x better than FCFS" means the same thing on any machine.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from tokenslice.bench.loadgen import Target, _one
from tokenslice.bench.scenario import LengthDist, Scenario, Stream
from tokenslice.bench.stats import RequestResult
from tokenslice.bench.trace import TraceRequest, _prompt

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the engines delivered closed-loop at saturation (tokens counted inside the window only)."""

    tokens_per_s: float
    concurrency: int
    seconds: float
    requests: int


@dataclass(frozen=True, slots=True)
class Calibrated:
    """The outcome: the measured capacity, the scale applied to the background streams' rates, the load."""

    capacity: Capacity
    multiple: float
    scale: float
    offered_tokens_per_s: float
    streams: tuple[str, ...]

    def describe(self) -> str:
        return (f"offered load {self.offered_tokens_per_s:.0f} output tok/s = {self.multiple:g} x the measured "
                f"vLLM FCFS capacity {self.capacity.tokens_per_s:.0f} tok/s (closed loop, {self.capacity.concurrency} "
                f"streams, {self.capacity.seconds:g} s); arrival rates of {', '.join(self.streams)} scaled "
                f"x{self.scale:.3f}")

    def as_json(self) -> dict[str, object]:
        return {"capacity_tokens_per_s": self.capacity.tokens_per_s, "concurrency": self.capacity.concurrency,
                "seconds": self.capacity.seconds, "requests": self.capacity.requests, "multiple": self.multiple,
                "scale": self.scale, "offered_tokens_per_s": self.offered_tokens_per_s,
                "streams": list(self.streams)}


def mean_tokens(dist: LengthDist, samples: int = 20_000) -> float:
    """The expected draw of ``dist`` (clipping included), by sampling with a fixed seed."""
    rng = random.Random(0)
    return sum(dist.sample(rng) for _ in range(samples)) / samples


def offered_tokens_per_s(streams: list[Stream], window_s: float) -> float:
    """Output tokens per second the streams offer on average over the window (rate x mean length x active share)."""
    total = 0.0
    for s in streams:
        stop = min(s.arrivals.stop_s or window_s, window_s)
        active = max(0.0, stop - s.arrivals.start_s) / window_s
        total += s.arrivals.rate * mean_tokens(s.output_tokens) * active
    return total


def scaled_streams(scenario: Scenario) -> list[Stream]:
    """The streams whose rates calibration scales: the named ones, else all but the latency probe."""
    assert scenario.calibrate is not None
    names = scenario.calibrate.streams
    if names is None:
        probe = {scenario.unloaded_stream} | {s.name for s in scenario.streams if s.drain}
        return [s for s in scenario.streams if s.name not in probe]
    return [scenario.stream(n) for n in names]


def scale_to(scenario: Scenario, capacity: Capacity) -> tuple[Scenario, Calibrated]:
    """The scenario with its background rates scaled so the whole offered load is ``multiple`` x capacity."""
    cal = scenario.calibrate
    assert cal is not None
    scaled = scaled_streams(scenario)
    names = {s.name for s in scaled}
    fixed = offered_tokens_per_s([s for s in scenario.streams if s.name not in names], scenario.window_s)
    variable = offered_tokens_per_s(scaled, scenario.window_s)
    if variable <= 0:
        raise ValueError("calibration: the scaled streams offer no tokens")
    target = cal.multiple * capacity.tokens_per_s
    scale = max(0.01, (target - fixed) / variable)
    streams = [s.model_copy(update={"arrivals": s.arrivals.model_copy(update={"rate": s.arrivals.rate * scale})})
               if s.name in names else s for s in scenario.streams]
    out = type(scenario).model_validate({**scenario.model_dump(), "streams": [s.model_dump() for s in streams]})
    return out, Calibrated(capacity, cal.multiple, scale, offered_tokens_per_s(out.streams, out.window_s),
                           tuple(sorted(names)))


async def measure_capacity(targets: list[Target], scenario: Scenario, *, progress: Progress | None = None) -> Capacity:
    """Drive ``targets`` (the engines, FCFS, round robin) closed-loop with the scaled streams' requests.

    Concurrency is twice the engines' sequence slots, so vLLM always has a queue; tokens are counted
    only in ``[warmup_s, warmup_s + seconds)`` so ramp-up and the tail do not count.
    """
    cal = scenario.calibrate
    assert cal is not None
    streams = scaled_streams(scenario)
    concurrency = 2 * scenario.max_num_seqs * len(targets)
    rng = random.Random(f"{scenario.seed}:calibrate")
    counter = itertools.count()
    results: list[RequestResult] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + cal.warmup_s + cal.seconds
    robin = itertools.cycle(targets)

    async def worker(session: aiohttp.ClientSession) -> None:
        while loop.time() < end:
            stream = rng.choice(streams)
            n = next(counter)
            words = stream.prompt_tokens.sample(rng)
            req = TraceRequest(index=n, at=loop.time() - t0, stream=stream.name, tenant=stream.tenant,
                               priority_class=stream.priority_class,
                               prompt=_prompt(rng, words, f"calibrate-{scenario.seed}-{n}:"), prompt_words=words,
                               max_tokens=stream.output_tokens.sample(rng), ignore_eos=True)
            result = RequestResult(index=n, stream=stream.name, tenant=stream.tenant,
                                   priority_class=stream.priority_class, scheduled=req.at)
            results.append(result)
            await _one(session, next(robin), req, result, t0)

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        try:
            await asyncio.sleep(max(0.0, end - loop.time()))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    lo, hi = cal.warmup_s, cal.warmup_s + cal.seconds
    tokens = sum(c for r in results for t, c in zip(r.token_times, r.token_counts) if lo <= t < hi)
    errors = [r.error for r in results if r.status == "error"]
    if errors:
        raise RuntimeError(f"calibration: {len(errors)} requests failed, first: {errors[0]}")
    capacity = Capacity(tokens / cal.seconds, concurrency, cal.seconds, len(results))
    if progress:
        progress(f"calibration: vLLM FCFS delivered {capacity.tokens_per_s:.0f} output tok/s closed-loop "
                 f"({concurrency} streams, {len(results)} requests, {cal.seconds:g} s measured)")
    return capacity
