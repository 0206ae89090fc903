"""One benchmark run: the same trace against every system, on the same engines, one after another.

Engines are the slow part to start, so they are started once per vLLM
scheduling policy (FCFS for everything but baseline b, which needs an engine
started with ``--scheduling-policy priority``) and only the data plane in front
of them is swapped between systems.  Each system gets the trace with a
per-system salt in front of every prompt, so nothing is served from prefix
cache left behind by the previous system.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import aiohttp

from tokenslice import promtext
from tokenslice.bench import kvcache, preemption
from tokenslice.bench.breakdown import Observation
from tokenslice.bench.calibrate import Calibrated, measure_capacity, scale_to
from tokenslice.bench.loadgen import Target, replay
from tokenslice.bench.scenario import SYSTEMS, Scenario, System
from tokenslice.bench.stats import RequestResult
from tokenslice.bench.trace import TraceRequest, build_trace
from tokenslice.local.stack import DataPlane, Engine, EnginePool, Mode, RunDir
from tokenslice.policy import SchedulingPolicySpec
from tokenslice_picker.server import PickerSettings

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Plan:
    """One system to run: its label, which system, chunk size and which trace (full or unloaded)."""

    label: str
    system: System
    chunk_size: int | None
    unloaded: bool = False
    reserved: int = 0
    picker_args: tuple[str, ...] = ()
    """This plan's own picker flags (a scenario's ``picker_variants``), after the scenario's ``picker_args``."""
    vllm_args: tuple[str, ...] = ()
    """Extra vLLM flags of the engines it runs on (a scenario's ``engine_variants``): their own start."""

    @property
    def kind(self) -> str:
        return self.system.name

    @property
    def mode(self) -> Mode:
        return self.system.mode

    @property
    def engine_policy(self) -> str:
        return self.system.engine_policy


@dataclass
class SystemResult:
    plan: Plan
    results: list[RequestResult]
    cutoff: float
    started_at: float
    engine_counters: dict[str, float] = field(default_factory=dict)
    """Deltas over the run, summed over engines: prefix_cache_queries/hits (tokens)."""
    gateway_counters: dict[str, float] = field(default_factory=dict)
    """Deltas of the gateway's counters whose names mention preempt / migrat / shed."""
    reusable_tokens: float = 0.0
    """Tokens of continuation-chunk prefixes that vLLM *could* serve from cache (full blocks)."""
    reusable_tokens_max: float = 0.0
    """The same, also counting the chunk after the last token of every request cut off at a chunk boundary
    (it may or may not have reached vLLM before the cutoff): the two bracket the true value."""
    block_size: int = 0
    kv_tokens: int = 0
    """Each engine's KV cache in tokens (``num_gpu_blocks * block_size`` of ``vllm:cache_config_info``)."""
    observation: Observation = field(default_factory=Observation)
    """What the data plane's own metrics said, scraped before it was torn down (the per-chunk breakdown)."""
    preemption: dict[str, float | None] = field(default_factory=dict)
    """The picker's preemption numbers (tokenslice.bench.preemption.summarize); empty without a picker."""


def _slice_tag(picker_args: list[str] | tuple[str, ...]) -> str:
    """``q`` (the chunk size is the fairness quantum of long slices) or ``c`` (it is the slice: per-slice mode)."""
    return "q" if long_slices(list(picker_args)) else "c"


def plan_systems(scenario: Scenario) -> list[Plan]:
    """The run order: tokenslice sweep first (the default policy, then per slice), then the FCFS-engine
    baselines, then baseline (b).

    Labels say what the chunk size meant: ``tokenslice-q32`` -- long slices (the default), quantum 32;
    ``tokenslice-c32`` -- per-slice mode, a slice end every 32 tokens (``tokenslice-per-slice``, or the
    ``tokenslice`` system run with ``--max-slice-tokens 0``).
    """
    default = scenario.policy.chunk_size
    plans: list[Plan] = []
    # the policy's own reserve unless the scenario (or --reserved) sweeps it: never silently 0
    reserves = scenario.reserved_slots or [scenario.policy.reserved_slots_per_endpoint]
    variants = {"": (), **{f"-{k}": tuple(v) for k, v in scenario.picker_variants.items()}}
    engines = {"": ((), ()), **{f"-{k}": (tuple(v.vllm_args), tuple(v.picker_args))
                                for k, v in scenario.engine_variants.items()}}
    for name in ("tokenslice", "tokenslice-per-slice"):
        if name not in scenario.systems:
            continue
        system = SYSTEMS[name]
        for esuffix, eargs in engines.items():
            for n in scenario.chunk_sizes:
                for r in reserves:
                    for suffix, args in variants.items():
                        own = (*system.picker_args, *args, *eargs[1])
                        tag = _slice_tag([*scenario.picker_args, *own])
                        label = f"tokenslice-{tag}{n}" + (f"-r{r}" if r else "") + suffix + esuffix
                        if all(p.label != label for p in plans):  # per slice twice (an explicit 0): run once
                            plans.append(Plan(label, system, n, reserved=r, picker_args=own, vllm_args=eargs[0]))
    if "chunked" in scenario.systems:
        plans.append(Plan(f"chunked-c{default}", SYSTEMS["chunked"], default))
    if scenario.no_affinity:
        plans.append(Plan(f"no-affinity-c{default}", SYSTEMS["no-affinity"], default))
    if "vllm-fcfs" in scenario.systems:
        plans.append(Plan("vllm-fcfs", SYSTEMS["vllm-fcfs"], None))
    if scenario.unloaded_stream:
        tag = _slice_tag(scenario.picker_args)
        plans.append(Plan(f"unloaded-tokenslice-{tag}{default}", SYSTEMS["tokenslice"], default, unloaded=True))
    if "vllm-priority" in scenario.systems:
        plans.append(Plan("vllm-priority", SYSTEMS["vllm-priority"], None))
    return plans


ROUND_MARK = "#"
"""``tokenslice-q32#2``: the second round of ``tokenslice-q32`` (round 1 keeps the plain label)."""


def rounds_of(group: list[Plan], rounds: int) -> list[Plan]:
    """The group's plans ``rounds`` times, every other round in reverse (ABBA): drift hits every system alike."""
    out: list[Plan] = []
    for r in range(rounds):
        order = group if r % 2 == 0 else list(reversed(group))
        out += [p if r == 0 else replace(p, label=f"{p.label}{ROUND_MARK}{r + 1}") for p in order]
    return out


def base_label(label: str) -> str:
    return label.split(ROUND_MARK, 1)[0]


def sweep_policy(scenario: Scenario, chunk_size: int | None, reserved: int | None = None) -> SchedulingPolicySpec:
    """The scenario's policy with one chunk size for every class and one slot per vLLM sequence.

    slots = max-num-seqs so vLLM never queues a chunk behind the scheduler's back (its own queue is FCFS).
    """
    policy = scenario.policy
    update: dict[str, object] = {"slots_per_endpoint": scenario.max_num_seqs}
    if reserved is not None:
        update["reserved_slots_per_endpoint"] = reserved
    if chunk_size is not None:
        update["chunk_size"] = chunk_size
        update["priority_classes"] = [c.model_copy(update={"chunk_size": None}) for c in policy.priority_classes]
    return policy.model_copy(update=update)


def long_slices(picker_args: list[str]) -> bool:
    """Whether a picker started with these flags runs long slices: slices end at cuts, not every chunk-size
    tokens.  No ``--max-slice-tokens``: the picker's default (``PickerSettings``, long slices); the last one
    given wins, as in argparse; 0 is per-slice mode."""
    value: str | None = None
    for i, arg in enumerate(picker_args):
        if arg.startswith("--max-slice-tokens="):
            value = arg.split("=", 1)[1]
        elif arg == "--max-slice-tokens" and i + 1 < len(picker_args):
            value = picker_args[i + 1]
    if value is None:
        return PickerSettings.model_fields["max_slice_tokens"].default > 0
    return value.strip().isdigit() and int(value) > 0


def salted(trace: list[TraceRequest], label: str) -> list[TraceRequest]:
    salt = hashlib.sha256(label.encode()).hexdigest()[:8]
    return [replace(r, prompt=f"{salt} {r.prompt}") for r in trace]


def reusable_tokens(prompt_tokens: int, generated: int, chunk_size: int, block_size: int,
                    finished: bool = True) -> int:
    """Prefix tokens vLLM can serve from cache over a request's continuation chunks.

    Chunk k >= 1 starts with context L = prompt + k*chunk; vLLM caches only full blocks and always
    recomputes the last token, so at most floor((L-1)/block)*block of it can hit.  For a request cut
    off mid-way (``finished=False``) the chunk after the last delivered token counts too: the driver
    issues it at once, so vLLM has usually looked it up already.
    """
    total, k = 0, 1
    while k * chunk_size < generated or (not finished and k * chunk_size == generated):
        context = prompt_tokens + k * chunk_size
        total += (context - 1) // block_size * block_size
        k += 1
    return total


async def _tokenize_counts(engine: Engine, prompts: list[str]) -> list[int]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        sem = asyncio.Semaphore(8)

        async def one(prompt: str) -> int:
            async with sem, session.post(f"{engine.url}/tokenize",
                                         json={"model": engine.model, "prompt": prompt}) as resp:
                resp.raise_for_status()
                return int((await resp.json())["count"])
        return list(await asyncio.gather(*(one(p) for p in prompts)))


async def wait_idle(engines: list[Engine], timeout_s: float = 120.0) -> None:
    """Poll until no engine runs or queues a request (cancelled work of the previous system has drained)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        scraped = await promtext.scrape_all(f"{e.url}/metrics" for e in engines)
        busy = sum(promtext.total(s, promtext.RUNNING) + promtext.total(s, promtext.WAITING) for s in scraped)
        if busy == 0 or loop.time() > deadline:
            return
        await asyncio.sleep(0.2)  # polling a condition with a deadline


def _engine_counters(scraped: list[list[promtext.Sample]]) -> dict[str, float]:
    return {"prefix_cache_queries": sum(promtext.total(s, promtext.PREFIX_QUERIES) for s in scraped),
            "prefix_cache_hits": sum(promtext.total(s, promtext.PREFIX_HITS) for s in scraped),
            **kvcache.engine_kv_counters(scraped)}


def _gateway_counters(samples: list[promtext.Sample]) -> dict[str, float]:
    out: dict[str, float] = {}
    for fragment in ("preempt", "migrat", "shed", "residency"):
        out.update(promtext.totals_matching(samples, fragment))
    for s in samples:  # the scheduler's own view of service per tenant, to cross-check the client's
        if s.name.endswith("tokens_served_total") and "tenant" in s.labels:
            key = f"tokens_served:{s.labels['tenant']}"
        elif s.name.endswith("continuation_residency_total") and "tier" in s.labels:
            key = f"residency:{s.labels['tier']}"  # the picker's estimate, per tier (--kv-residency)
        elif s.name.endswith("queue_wait_seconds_sum") or s.name.endswith("queue_wait_seconds_count"):
            # how long chunks waited for a slot, per class: the pause the scheduler imposed
            key = f"{s.name.rsplit('_', 1)[1]}_queue_wait:{s.labels.get('class', '')}"
        else:
            continue
        out[key] = out.get(key, 0.0) + s.value
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _summed(scraped: list[list[promtext.Sample]], by_label: str | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for samples in scraped:
        for k, v in promtext.flatten(samples, by_label).items():
            out[k] = out.get(k, 0.0) + v
    return out


async def observe(plane: DataPlane, engines: list[Engine]) -> tuple[list[list[promtext.Sample]], Observation]:
    """The scrape hook: every part of a running system -- engines, the picker, the sidecars -- at once.

    Called once before the trace and once after it, *before* the data plane is torn down, so the
    numbers of each system are read from the system itself (no process scanning from outside).
    Returns the engines' and the picker's raw samples (in that order) and the flattened totals.
    """
    engine_urls = [f"{e.url}/metrics" for e in engines]
    picker_urls = [plane.picker_metrics_url] if plane.picker_metrics_url else []
    sidecar_urls = [f"http://{a}/tokenslice/metrics" for a in plane.sidecar_addresses]
    scraped = await promtext.scrape_all(engine_urls + picker_urls + sidecar_urls)
    n, m = len(engine_urls), len(engine_urls) + len(picker_urls)
    obs = Observation(engine=_summed(scraped[:n]), picker=_summed(scraped[n:m], by_label="class"),
                      sidecar=_summed(scraped[m:]))
    return scraped[:m], obs


async def run_system(plan: Plan, scenario: Scenario, engines: list[Engine], run_dir: RunDir,
                     trace: list[TraceRequest], progress: Progress) -> SystemResult:
    policy = sweep_policy(scenario, plan.chunk_size, plan.reserved if plan.mode == "tokenslice" else None)
    picker_args = [*scenario.picker_args, *plan.picker_args]
    trace = salted(trace, plan.label)
    prompt_counts = await _tokenize_counts(engines[0], [r.prompt for r in trace])
    await wait_idle(engines)
    draining = {s.name for s in scenario.streams if s.drain}
    async with DataPlane(engines, policy, run_dir, mode=plan.mode, progress=progress, log_level="WARNING",
                         name=f"{plan.label}-", picker_args=picker_args) as plane:
        gw_urls = [plane.picker_metrics_url] if plane.picker_metrics_url else []
        before, first = await observe(plane, engines)
        block = int(promtext.label(before[0], promtext.CACHE_CONFIG, "block_size") or 0)
        blocks = promtext.label(before[0], promtext.CACHE_CONFIG, "num_gpu_blocks") or ""
        target = Target(
            plan.label, plane.url, engines[0].model,
            tenant_header=policy.tenant_header, class_header=policy.class_header,
            priorities={s.name: scenario.vllm_priority(s) for s in scenario.streams}
            if plan.kind == "vllm-priority" else {})
        started = time.time()
        results, cutoff = await replay(trace, target, window_s=scenario.window_s, drain_s=scenario.drain_s,
                                       draining=draining, progress=progress)
        after, last = await observe(plane, engines)
    n = len(engines)
    last.engine = _delta(last.engine, first.engine)
    last.seconds = time.time() - started
    result = SystemResult(plan, results, cutoff, started,
                          engine_counters=_delta(_engine_counters(after[:n]), _engine_counters(before[:n])),
                          gateway_counters=_delta(_gateway_counters(after[n]), _gateway_counters(before[n]))
                          if gw_urls else {}, block_size=block, observation=last,
                          kv_tokens=int(blocks) * block if blocks.isdigit() else 0)
    if gw_urls:
        waiter = next((s.priority_class for s in scenario.streams
                       if s.name == scenario.unloaded_stream or s.drain), None)
        result.preemption = preemption.summarize(after[n], last.seconds, waiter)
    for r, count in zip(results, prompt_counts):
        r.prompt_tokens = r.prompt_tokens or count
    if plan.chunk_size and plan.kind != "vllm-fcfs" and block and (plan.mode != "tokenslice"
                                                                    or not long_slices(picker_args)):
        # chunk k starts at prompt + k x chunk: true only when every slice ends at the chunk size. With long
        # slices a continuation starts wherever a cut landed, which the client cannot see: no figure then
        result.reusable_tokens = float(sum(
            reusable_tokens(r.prompt_tokens, r.completion_tokens, plan.chunk_size, block) for r in results))
        result.reusable_tokens_max = float(sum(
            reusable_tokens(r.prompt_tokens, r.completion_tokens, plan.chunk_size, block, finished=r.status == "ok")
            for r in results))
    return result


def _announce(scenario: Scenario, trace: list[TraceRequest], plans: list[Plan], progress: Progress) -> None:
    progress(f"scenario {scenario.name}: {len(trace)} requests over {scenario.window_s:.0f}s "
             f"({', '.join(f'{s.name}: {sum(r.stream == s.name for r in trace)}' for s in scenario.streams)}); "
             f"systems: {', '.join(p.label for p in plans)}")


async def calibrate_on(engines: list[Engine], scenario: Scenario, progress: Progress) -> tuple[Scenario, Calibrated]:
    """Measure the engines' FCFS capacity closed-loop, then scale the scenario's background load to it."""
    targets = [Target(f"calibrate-{e.name}", e.url, e.model) for e in engines]
    capacity = await measure_capacity(targets, scenario, progress=progress)
    scaled, calibrated = scale_to(scenario, capacity)
    progress(f"calibration: {calibrated.describe()}")
    await wait_idle(engines)
    return scaled, calibrated


async def run_benchmark(scenario: Scenario, *, progress: Progress = _stderr, model_dir=None,
                        on_result: Callable[[SystemResult], None] | None = None,
                        keep_run_dir: bool = False,
                        on_calibrated: Callable[[Scenario, Calibrated], None] | None = None,
                        isolate_cpus: bool = False) -> list[SystemResult]:
    """Run every planned system; ``on_result`` sees each result as soon as it exists (partial reports).

    With ``scenario.calibrate`` the first engines (FCFS unless only vLLM priority runs) first measure
    their capacity and every system then replays the trace of the scaled scenario (``on_calibrated``).
    ``isolate_cpus``: each engine core on a CPU of its own while its engines run (:mod:`tokenslice.engine.cpus`).
    """
    plans = plan_systems(scenario)
    trace = build_trace(scenario)
    unloaded = build_trace(scenario, [scenario.unloaded_stream]) if scenario.unloaded_stream else []
    if scenario.calibrate is None:
        _announce(scenario, trace, plans, progress)
    else:
        progress(f"scenario {scenario.name}: calibrating the load first; systems: {', '.join(p.label for p in plans)}")
    calibrated: Calibrated | None = None
    out: list[SystemResult] = []
    run_dir = RunDir(keep=keep_run_dir)
    try:
        # one engine start per (scheduling policy, extra vLLM flags): FCFS first, variants in plan order
        starts = sorted(dict.fromkeys((p.engine_policy, p.vllm_args) for p in plans),
                        key=lambda k: k[0] != "fcfs")
        for n_start, (engine_policy, extra) in enumerate(starts):
            group = [p for p in plans if (p.engine_policy, p.vllm_args) == (engine_policy, extra)]
            async with EnginePool(scenario.engines, run_dir=run_dir, model_dir=model_dir,
                                  max_num_seqs=scenario.max_num_seqs, scheduling_policy=engine_policy,
                                  vllm_args=[*scenario.vllm_args, *extra], progress=progress,
                                  tag=f"engine-{engine_policy}" + (f"-{n_start}" if extra else ""),
                                  isolate_cpus=isolate_cpus) as engines:
                if scenario.calibrate is not None and calibrated is None:
                    scenario, calibrated = await calibrate_on(engines, scenario, progress)
                    trace = build_trace(scenario)
                    unloaded = build_trace(scenario, [scenario.unloaded_stream]) if scenario.unloaded_stream else []
                    _announce(scenario, trace, plans, progress)
                    if on_calibrated:
                        on_calibrated(scenario, calibrated)
                for plan in rounds_of(group, scenario.rounds):
                    progress(f"== {plan.label} ({len(out) + 1}/{len(plans) * scenario.rounds})")
                    try:
                        result = await run_system(plan, scenario, engines, run_dir,
                                                  unloaded if plan.unloaded else trace, progress)
                    except Exception as exc:  # one broken system must not cost the others' numbers
                        progress(f"!! {plan.label} failed: {type(exc).__name__}: {str(exc)[:2000]}")
                        continue
                    out.append(result)
                    if on_result:
                        on_result(result)
    finally:
        run_dir.close()
    return out

