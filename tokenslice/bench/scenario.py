"""A benchmark scenario: who sends what, when, and what they expect -- one pydantic model, YAML-loadable.

A scenario is data, not code, so that the same arrival trace can be replayed
against every system in one run (the baselines and tokenslice) and so that a
user can write their own in YAML (``tokenslice bench run --scenario my.yaml``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenslice.local.stack import Mode
from tokenslice.policy import SchedulingPolicySpec


@dataclass(frozen=True, slots=True)
class System:
    """One kind of system a benchmark compares: what runs in front of the engines, on which engines,
    and how its curves are drawn. The one place these facts live (runner, report and plots read them)."""

    name: str
    mode: Mode
    """The data plane in front of the engines (``tokenslice.local.stack.DataPlane``)."""
    engine_policy: Literal["fcfs", "priority"]
    """vLLM's ``--scheduling-policy`` for the engines it runs on."""
    color: str | None
    """Fixed plot colour; None = spread over a colormap (the tokenslice sweep)."""
    linestyle: str
    description: str
    picker_args: tuple[str, ...] = ()
    """Picker flags that make this system (after the scenario's own ``picker_args``, so they win)."""


PER_SLICE_ARGS = ("--max-slice-tokens", "0")
"""The picker's per-slice mode: a new vLLM request every chunk-size tokens (the default before issue 12)."""

SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("vllm-fcfs", "direct", "fcfs", "tab:red", "-", "(a) vLLM direct, FCFS"),
    System("vllm-priority", "direct", "priority", "tab:orange", "-",
           "(b) vLLM direct with its priority scheduling"),
    System("chunked", "chunked", "fcfs", "tab:brown", "--",
           "(c) chunking without the scheduler: each sidecar straight to its own vLLM"),
    System("no-affinity", "chunked-rr", "fcfs", "tab:gray", "--",
           "chunking through a round-robin gateway: no KV affinity"),
    System("tokenslice", "tokenslice", "fcfs", None, "-",
           "(d) tokenslice, the default policy: sidecars, gateway and picker; long slices cut on demand, the "
           "chunk size is the fairness quantum"),
    System("tokenslice-per-slice", "tokenslice", "fcfs", "tab:purple", "-.",
           "(d') tokenslice per slice: a slice end (a new vLLM request) every chunk-size tokens -- the old "
           "default, for comparison", picker_args=PER_SLICE_ARGS),
)}
SystemName = Literal["vllm-fcfs", "vllm-priority", "chunked", "tokenslice", "tokenslice-per-slice"]
"""The systems a scenario lists (no-affinity is switched on by ``no_affinity``)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthDist(_Model):
    """A distribution of token counts; ``fixed`` uses ``mean``, others clip to [min, max]."""

    kind: Literal["fixed", "uniform", "lognormal", "exponential"] = "fixed"
    mean: float = Field(default=64, gt=0)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=4096, ge=1)
    sigma: float = Field(default=0.5, gt=0, description="lognormal: sigma of the underlying normal")

    @model_validator(mode="after")
    def _bounds(self) -> LengthDist:
        if self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.mean
        elif self.kind == "uniform":
            value = rng.uniform(self.min, self.max)
        elif self.kind == "exponential":
            value = rng.expovariate(1.0 / self.mean)
        else:  # lognormal with the requested mean
            mu = math.log(self.mean) - self.sigma ** 2 / 2
            value = rng.lognormvariate(mu, self.sigma)
        return int(min(self.max, max(self.min, round(value))))


class Arrivals(_Model):
    """Open-loop arrivals: a Poisson process, or Poisson-timed bursts of ``burst_size`` requests."""

    process: Literal["poisson", "bursty"] = "poisson"
    rate: float = Field(gt=0, description="mean requests per second (bursty: counting every request)")
    burst_size: int = Field(default=4, ge=1, description="bursty: requests per burst")
    start_s: float = Field(default=0.0, ge=0, description="first possible arrival, seconds into the run")
    stop_s: float | None = Field(default=None, gt=0, description="last possible arrival; default: the window")


class Stream(_Model):
    """One kind of traffic: a tenant sending requests of one priority class."""

    name: str = Field(min_length=1)
    tenant: str
    priority_class: str
    arrivals: Arrivals
    prompt_tokens: LengthDist = LengthDist(mean=32)
    output_tokens: LengthDist = LengthDist(mean=64)
    ignore_eos: bool = True
    slo_ttft_s: float | None = Field(default=None, gt=0)
    slo_tpot_s: float | None = Field(default=None, gt=0)
    drain: bool = Field(
        default=False,
        description="at the end of the window wait for this stream's requests to finish (up to drain_s) "
        "instead of cancelling them -- for the latency-critical stream whose tail we report")


class Calibration(_Model):
    """Offer a multiple of what this machine's vLLM (FCFS) can serve, measured in the same run first."""

    multiple: float = Field(default=1.3, gt=0, description="offered output tokens/s over the measured capacity")
    seconds: float = Field(default=20.0, gt=0, description="how long the capacity is measured (after warm-up)")
    warmup_s: float = Field(default=5.0, ge=0, description="closed-loop ramp-up not counted")
    streams: list[str] | None = Field(
        default=None, description="streams whose arrival rates are scaled; default all but the latency probe "
        "(the unloaded stream and draining streams keep their rates)")


class EngineVariant(_Model):
    """Engines started with extra vLLM flags (their own start), plus the picker flags that go with them."""

    vllm_args: list[str] = Field(min_length=1)
    picker_args: list[str] = Field(default_factory=list)


class Scenario(_Model):
    """A whole benchmark: traffic, engine shape, the systems to compare and the policy tokenslice runs."""

    name: str
    description: str = ""
    seed: int = 0
    window_s: float = Field(default=30.0, gt=0, description="arrivals happen in [0, window_s)")
    warmup_s: float = Field(default=5.0, ge=0, description="fairness/throughput windows start here")
    drain_s: float = Field(default=60.0, ge=0, description="longest wait for draining streams after the window")
    streams: list[Stream] = Field(min_length=1)
    engines: int = Field(default=1, ge=1, le=8)
    max_num_seqs: int = Field(default=4, ge=1)
    vllm_args: list[str] = Field(default_factory=list, description="extra vLLM flags for every engine")
    picker_args: list[str] = Field(default_factory=list,
                                   description="extra `tokenslice picker` flags for the tokenslice systems, "
                                   "e.g. [--max-slice-tokens, '0'] (per-slice mode instead of the default long "
                                   "slices)")
    picker_variants: dict[str, list[str]] = Field(
        default_factory=dict, description="also run every tokenslice plan with these extra picker flags, one "
        "run per entry, labelled with its key -- e.g. {kvres: [--kv-residency]}: a feature on and off side by side")
    engine_variants: dict[str, EngineVariant] = Field(
        default_factory=dict, description="also run every tokenslice plan (picker variants included) on engines "
        "started with these extra vLLM flags, one engine start per entry, labelled with its key -- e.g. "
        "{offload: {vllm_args: [--kv-offloading-size, '8', --kv-offloading-backend, native]}}")
    systems: list[SystemName] = Field(
        default_factory=lambda: ["vllm-fcfs", "vllm-priority", "chunked", "tokenslice"])
    chunk_sizes: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256], description=(
        "one tokenslice run each, the policy's chunkSize for every class: with the default long slices the "
        "fairness quantum, in per-slice mode (tokenslice-per-slice) the slice"))
    reserved_slots: list[int] | None = Field(
        default=None,
        description="tokenslice runs once per value: slots of the engine kept for non-preemptible classes "
        "(overriding the policy's reservedSlotsPerEndpoint; batch then uses max_num_seqs minus it). "
        "Unset: one run with the policy's own value")
    unloaded_stream: str | None = Field(
        default=None, description="also run this stream alone through tokenslice: the unloaded reference")
    no_affinity: bool = Field(
        default=False, description="also run tokenslice chunking through a plain round-robin Envoy (no KV "
        "affinity) to show the prefix-cache drop; meaningful with engines >= 2")
    calibrate: Calibration | None = Field(
        default=None, description="scale the background load to this machine (tokenslice.bench.calibrate)")
    rounds: int = Field(
        default=1, ge=1, le=10, description="run the systems of each engine start this many times, in "
        "alternating order (ABBA), the same trace each time: the targets are then judged pooled over the "
        "rounds too (tokenslice.bench.report.pooled_markdown), so one slow window on a noisy machine does not "
        "decide a ratio")
    policy: SchedulingPolicySpec

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ValueError("stream names must be unique")
        if self.calibrate and self.calibrate.streams and not set(self.calibrate.streams) <= set(names):
            raise ValueError(f"calibrate.streams {self.calibrate.streams} are not all streams")
        for s in self.streams:
            if self.policy.klass(s.priority_class) is None:
                raise ValueError(f"stream {s.name!r}: class {s.priority_class!r} is not in the policy")
        if self.unloaded_stream is not None and self.unloaded_stream not in names:
            raise ValueError(f"unloaded_stream {self.unloaded_stream!r} is not a stream")
        if any(r < 0 or r >= self.max_num_seqs for r in self.reserved_slots or ()):
            raise ValueError("reserved_slots must be in [0, max_num_seqs)")
        if self.warmup_s >= self.window_s:
            raise ValueError("warmup_s must be shorter than window_s")
        return self

    def stream(self, name: str) -> Stream:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)

    def vllm_priority(self, stream: Stream) -> int:
        """vLLM's per-request priority for baseline (b): lower runs first, so the negated class priority."""
        klass = self.policy.klass(stream.priority_class)
        assert klass is not None
        return -klass.priority


def load_scenario(path: str | Path) -> Scenario:
    return Scenario.model_validate(yaml.safe_load(Path(path).read_text()))


BUILTIN_DIR = Path(__file__).parent / "scenarios"


def builtin_scenarios() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def resolve_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name (``headline``, ``demo``, ...) or a YAML file path."""
    builtins = builtin_scenarios()
    if name_or_path in builtins:
        return load_scenario(builtins[name_or_path])
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"no scenario {name_or_path!r}: not a file and not one of {', '.join(builtins) or '(none)'}")
    return load_scenario(path)
