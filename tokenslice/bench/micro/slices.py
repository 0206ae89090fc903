"""What a slice end costs when nobody waits, and what a cut costs when someone does (real vLLM).

One real vLLM engine (the tiny model on CPU unless ``--model``), ``--slots`` sequence slots, and several
data planes over it, measured interleaved round by round so that load drift on the machine hits all alike:

* ``direct``  -- straight to vLLM (no sidecar, no picker): the reference throughput;
* ``cN``      -- tokenslice with slices of N tokens (a slice end every N tokens, nobody waiting);
* ``long``    -- tokenslice with long slices (``--max-slice-tokens 4096``, quantum 32): one slice per request.

Part ``slices``: ``--slots`` concurrent greedy streams of ``--tokens`` tokens (``ignore_eos``); aggregate
output tokens/s per plane and round.  Part ``cut`` (needs a worker sidecar that acts on cuts): on the
``long`` plane, ``--slots`` low-priority streams fill every slot and a high-priority request arrives; its
time to first token, compared with the same request when one slot is free.

    tokenslice bench micro slices --parts slices,cut --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import aiohttp
import openai

from tokenslice import promtext
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


async def cut_ttft(plane: DataPlane, model: str, slots: int, tokens: int, low: dict[str, str],
                   high: dict[str, str], busy: int) -> float:
    """TTFT of a 8-token high-priority request while ``busy`` low streams run (``busy == slots``: all full)."""
    client = openai.AsyncOpenAI(base_url=plane.openai_base_url, api_key="unused", max_retries=0)
    started = [asyncio.Event() for _ in range(busy)]
    lows = [asyncio.create_task(stream(client, model, tokens, low, started[i])) for i in range(busy)]
    await asyncio.gather(*(e.wait() for e in started))
    _, ttft = await stream(client, model, 8, high)
    await asyncio.gather(*lows)
    return ttft


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokenslice bench micro slices", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="slices", help="comma list of slices,cut")
    ap.add_argument("--chunk-sizes", default="16,64", help="the cN planes")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="local model directory (default: the tiny model)")
    return asyncio.run(_run(ap.parse_args(argv)))


async def _run(args: argparse.Namespace) -> int:
    parts = set(args.parts.split(","))
    base = LocalConfig().resolved_policy()
    policy = base.model_copy(update={"slots_per_endpoint": args.slots, "reserved_slots_per_endpoint": 0})
    low = {policy.tenant_header: "batch-a", policy.class_header: "batch"}
    high = {policy.tenant_header: "web", policy.class_header: "interactive"}
    run_dir = RunDir()
    quiet = lambda _: None  # noqa: E731
    try:
        async with EnginePool(1, run_dir=run_dir, model_dir=args.model, max_num_seqs=args.slots,
                              progress=quiet) as engines:
            model = engines[0].model
            planes: dict[str, DataPlane] = {"direct": DataPlane(engines, policy, run_dir, mode="direct", name="d-",
                                                                progress=quiet)}
            for c in map(int, args.chunk_sizes.split(",")):
                planes[f"c{c}"] = DataPlane(engines, policy.model_copy(update={"chunk_size": c}), run_dir,
                                            name=f"c{c}-", progress=quiet)
            planes["long"] = DataPlane(engines, policy.model_copy(update={"chunk_size": 32}), run_dir, name="long-",
                                       progress=quiet, picker_args=["--max-slice-tokens", "4096"])
            for p in planes.values():
                await p.start()
            try:
                if "slices" in parts:
                    rates: dict[str, list[float]] = {name: [] for name in planes}
                    for r in range(args.rounds):
                        for name, p in planes.items():
                            rates[name].append(await throughput(p, model, args.slots, args.tokens, low))
                        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
                              file=sys.stderr, flush=True)
                    ref = statistics.median(rates["direct"])
                    print(f"\n== {args.slots} greedy streams x {args.tokens} tokens, nobody else waiting; "
                          f"median of {args.rounds} rounds (output tokens/s)")
                    print("| plane | tokens/s (median) | rounds | vs direct |\n|---|---:|---|---:|")
                    for name, v in rates.items():
                        med = statistics.median(v)
                        print(f"| {name} | {med:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {med / ref:.1%} |")
                if "cut" in parts:
                    p = planes["long"]
                    full, free = [], []
                    for _ in range(args.rounds):
                        free.append(await cut_ttft(p, model, args.slots, args.tokens, low, high, args.slots - 1))
                        full.append(await cut_ttft(p, model, args.slots, args.tokens, low, high, args.slots))
                    async with aiohttp.ClientSession() as session:
                        samples = await promtext.scrape(session, p.picker_metrics_url or "")
                    cuts = sum(s.value for s in samples if s.name == "tokenslice_picker_preemptions_total")
                    fails = sum(s.value for s in samples if s.name == "tokenslice_picker_cut_failures_total")
                    print(f"\n== high-priority TTFT on the long-slice plane ({args.rounds} rounds; ms)")
                    print(f"free slot: {', '.join(f'{x * 1e3:.0f}' for x in free)}  (median "
                          f"{statistics.median(free) * 1e3:.0f})")
                    print(f"by a cut:  {', '.join(f'{x * 1e3:.0f}' for x in full)}  (median "
                          f"{statistics.median(full) * 1e3:.0f}); cuts sent {cuts:g}, failed {fails:g}")
            finally:
                for p in planes.values():
                    await p.stop()
    finally:
        run_dir.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
