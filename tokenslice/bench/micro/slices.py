"""What a slice end costs when nobody waits, and what a cut costs when someone does (real vLLM).

One real vLLM engine (the tiny model on CPU unless ``--model``), ``--slots`` sequence slots, and the data
planes a part needs over it, measured interleaved round by round so that load drift hits all alike:

* ``direct``  -- straight to vLLM (no sidecar, no picker): the reference throughput;
* ``cN``      -- tokenslice in per-slice mode (``--max-slice-tokens 0``), slices of N tokens (a slice end every
  N tokens, nobody waiting);
* ``long``    -- tokenslice with long slices (``--max-slice-tokens 4096``, quantum 32): one slice per request.

Part ``slices``: ``--slots`` concurrent greedy streams of ``--tokens`` tokens (``ignore_eos``); aggregate
output tokens/s per plane and round.  Parts ``cut`` (a waiter's first token by a cut vs from a free slot,
``--rounds`` rounds, with one decode step measured beside it) and ``cutrate`` (throughput with one cut every
``--cut-interval`` s vs none) run on the ``long`` plane; ``tokenslice/bench/micro/cuts.py`` says how.
Everything is printed as it goes and written to ``--out`` (``results.md``, ``results.json``, ``cut_ttft.png``).

    tokenslice bench micro slices --parts slices,cut --rounds 3
    tokenslice bench micro slices --parts cut,cutrate --rounds 60 --out results/cuts
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import openai

from tokenslice import contract
from tokenslice.bench.micro import cuts
from tokenslice.bench.scenario import PER_SLICE_ARGS
from tokenslice.local.stack import DataPlane, EnginePool, LocalConfig, RunDir

PROMPT = "a long batch job about rivers and mountains"


async def stream(client: openai.AsyncOpenAI, model: str, tokens: int, headers: dict[str, str],
                 first: asyncio.Event | None = None) -> tuple[int, float]:
    """One greedy streamed completion: (tokens received, seconds to the first one)."""
    t0 = time.perf_counter()
    ttft = float("nan")
    n = 0
    resp = await client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                           stream=True, extra_headers=headers, extra_body={"ignore_eos": True})
    async for event in resp:
        if event.choices and event.choices[0].text:
            if not n:
                ttft = time.perf_counter() - t0
                if first is not None:
                    first.set()
            n += 1  # the tiny model's tokens arrive one per event
    return n, ttft


async def throughput(plane: DataPlane, model: str, streams: int, tokens: int, headers: dict[str, str]) -> float:
    client = openai.AsyncOpenAI(base_url=plane.openai_base_url, api_key="unused", max_retries=0)
    t0 = time.perf_counter()
    await asyncio.gather(*(stream(client, model, tokens, headers) for _ in range(streams)))
    return streams * tokens / (time.perf_counter() - t0)  # ignore_eos: every stream yields exactly ``tokens``


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokenslice bench micro slices", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="slices", help="comma list of slices,cut,cutrate")
    ap.add_argument("--chunk-sizes", default="16,64", help="the cN planes (part slices)")
    ap.add_argument("--slots", type=int, default=4, help="vLLM --max-num-seqs = the picker's slots per endpoint")
    ap.add_argument("--tokens", type=int, default=256,
                    help="tokens per stream (slices); per background stream, restarted as it ends (cut, cutrate)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of part slices and of part cut (a pair each)")
    ap.add_argument("--waiter-tokens", type=int, default=8, help="cut: the interactive waiter's max_tokens")
    ap.add_argument("--filler-tokens", type=int, default=64,
                    help="cut: the stream that fills the last slot before the waiter comes (the picker cuts it)")
    ap.add_argument("--streams", type=int, default=None, help="cutrate: background streams (default --slots)")
    ap.add_argument("--cutrate-rounds", type=int, default=4, help="cutrate: rounds, each one period per case")
    ap.add_argument("--period", type=float, default=10.0, help="cutrate: seconds per period")
    ap.add_argument("--settle", type=float, default=1.0, help="cutrate: first seconds of a period not counted")
    ap.add_argument("--cut-interval", type=float, default=0.5, help="cutrate: seconds between cuts")
    ap.add_argument("--block-size", type=int, default=16,
                    help="cutrate: KV block size for the recompute estimate when vLLM does not report its own")
    ap.add_argument("--model", default=None, help="local model directory (default: the tiny model)")
    ap.add_argument("--vllm-args", default="", help="extra vLLM flags, one string (later flags win)")
    ap.add_argument("--vllm-args-from", default=None,
                    help="a scenario (name or YAML) whose vllm_args to use first, e.g. scripts/gpu/headline-gpu.yaml")
    ap.add_argument("--picker-args", default="",
                    help="extra picker flags for the long plane, one string (e.g. --no-preemption)")
    ap.add_argument("--out", type=Path, default=None, help="write results.md, results.json, cut_ttft.png here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the run directory with every component's log")
    args = ap.parse_args(argv)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - {"slices", "cut", "cutrate"}:
        ap.error(f"--parts takes slices, cut, cutrate; got {args.parts!r}")
    if args.slots < 2 and "cut" in parts:
        ap.error("part cut needs --slots >= 2 (one slot free in the reference case)")
    return asyncio.run(_run(args, parts))


def _vllm_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if args.vllm_args_from:
        from tokenslice.bench.scenario import resolve_scenario

        out += list(resolve_scenario(args.vllm_args_from).vllm_args)
    return out + shlex.split(args.vllm_args)


async def _run(args: argparse.Namespace, parts: set[str]) -> int:
    base = LocalConfig().resolved_policy()
    policy = base.model_copy(update={"slots_per_endpoint": args.slots, "reserved_slots_per_endpoint": 0})
    low = {policy.tenant_header: "batch-a", policy.class_header: "batch"}
    high = {policy.tenant_header: "web", policy.class_header: "interactive"}
    command = "tokenslice bench micro slices " + " ".join(shlex.quote(a) for a in sys.argv[4:]) \
        if sys.argv[1:4] == ["bench", "micro", "slices"] else "tokenslice bench micro slices (from Python)"
    doc: dict[str, object] = {"meta": {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime()),
                                       "host": platform.node(), "cpus": len(os.sched_getaffinity(0)),
                                       "args": vars(args) | {"out": str(args.out)}}}
    sections = [f"# tokenslice bench micro slices\n\n`{command}`\n"]

    def emit(section: str, key: str, value: object) -> None:
        print("\n" + section, flush=True)
        sections.append(section)
        doc[key] = value
        if args.out:
            cuts.write_results(args.out, sections, doc)

    run_dir = RunDir(keep=args.keep_logs)
    progress = cuts._stderr
    quiet = lambda _: None  # noqa: E731
    try:
        async with EnginePool(1, run_dir=run_dir, model_dir=args.model, max_num_seqs=args.slots,
                              vllm_args=_vllm_args(args), progress=progress) as engines:
            model = engines[0].model
            planes: dict[str, DataPlane] = {}
            if "slices" in parts:
                planes["direct"] = DataPlane(engines, policy, run_dir, mode="direct", name="d-", progress=quiet)
                for c in map(int, args.chunk_sizes.split(",")):
                    planes[f"c{c}"] = DataPlane(engines, policy.model_copy(update={"chunk_size": c}), run_dir,
                                                name=f"c{c}-", progress=quiet, picker_args=list(PER_SLICE_ARGS))
            planes["long"] = DataPlane(engines, policy.model_copy(update={"chunk_size": 32}), run_dir, name="long-",
                                       progress=quiet, picker_args=["--max-slice-tokens", "4096",
                                                                    *shlex.split(args.picker_args)])
            for p in planes.values():
                await p.start()
            progress(f"planes ready: {', '.join(planes)}")
            try:
                if "slices" in parts:
                    emit(*await _slices(planes, model, args, low))
                if "cut" in parts:
                    summary = await cuts.cut_part(planes["long"], engines[0].url + "/metrics", model,
                                                  slots=args.slots, rounds=args.rounds,
                                                  tokens=args.tokens, waiter_tokens=args.waiter_tokens,
                                                  filler_tokens=args.filler_tokens, low=low, high=high)
                    emit(cuts.cut_markdown(summary, slots=args.slots, waiter_tokens=args.waiter_tokens), "cut",
                         summary)
                    if args.out and (png := cuts.plot_cut(summary, args.out / "cut_ttft.png")):
                        progress(f"wrote {png}")
                if "cutrate" in parts:
                    key = contract.load_key(key_file=run_dir.path / "signing.key")
                    summary = await cuts.cutrate_part(
                        planes["long"], engines[0].url + "/metrics", key, model, streams=args.streams or args.slots,
                        rounds=args.cutrate_rounds, tokens=args.tokens, period_s=args.period,
                        interval=args.cut_interval, settle_s=args.settle, low=low, default_block=args.block_size)
                    emit(cuts.cutrate_markdown(summary, period_s=args.period, settle_s=args.settle), "cutrate",
                         summary)
            finally:
                for p in planes.values():
                    await p.stop()
    finally:
        run_dir.close()
    if args.out:
        progress(f"results in {args.out}/ (results.md, results.json, cut_ttft.png)")
    return 0


async def _slices(planes: dict[str, DataPlane], model: str, args: argparse.Namespace,
                  low: dict[str, str]) -> tuple[str, str, object]:
    rates: dict[str, list[float]] = {name: [] for name in planes}
    for r in range(args.rounds):
        for name, p in planes.items():
            rates[name].append(await throughput(p, model, args.slots, args.tokens, low))
        print(f"[slices] round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
              file=sys.stderr, flush=True)
    ref = statistics.median(rates["direct"])
    lines = [f"## slices: {args.slots} greedy streams x {args.tokens} tokens, nobody else waiting; "
             f"median of {args.rounds} rounds (output tokens/s)", "",
             "| plane | tokens/s (median) | rounds | vs direct |", "|---|---:|---|---:|"]
    for name, v in rates.items():
        med = statistics.median(v)
        lines.append(f"| {name} | {med:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {med / ref:.1%} |")
    return "\n".join(lines) + "\n", "slices", rates


if __name__ == "__main__":
    sys.exit(main())
