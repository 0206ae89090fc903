"""Measure the engine on this machine: startup, decode speed, and chunked-continuation fidelity.

``tokenslice engine bench`` starts its own vLLM (or uses ``--url``) and prints one
table; docs/engine.md records its output.  Numbers, not pass/fail: the
machine is shared and timings move.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tokenslice.engine import layout
from tokenslice.engine.server import start_vllm


@dataclass
class Completion:
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_s: float = 0.0
    total_s: float = 0.0


async def complete(session: aiohttp.ClientSession, url: str, prompt: str | list[int], max_tokens: int,
                   model: str = layout.MODEL_NAME, **extra: Any) -> Completion:
    """One streamed greedy /v1/completions request, with the generated token ids of every event."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, **extra}
    out = Completion()
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                if not out.ids:
                    out.first_token_s = time.perf_counter() - started
                out.prompt_ids = choice.get("prompt_token_ids") or out.prompt_ids
                out.ids += choice.get("token_ids") or []
                out.text += choice["text"]
                out.finish_reason = choice["finish_reason"] or out.finish_reason
    out.total_s = time.perf_counter() - started
    return out


async def decode_speed(session: aiohttp.ClientSession, url: str, streams: int, tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    results = await asyncio.gather(*[complete(session, url, f"Stream {i} of {streams}: the river", tokens,
                                              ignore_eos=True) for i in range(streams)])
    wall = time.perf_counter() - started
    generated = sum(len(r.ids) for r in results)
    return {"streams": streams, "tokens_per_s": generated / wall,
            "per_stream_tokens_per_s": generated / wall / streams,
            "ttft_ms": 1000 * sum(r.first_token_s for r in results) / streams}


async def chunk_fidelity(session: aiohttp.ClientSession, url: str, tokens: int, chunk: int) -> dict[str, Any]:
    """Generate ``tokens`` in one request and again chunk by chunk from token ids; compare."""
    whole = await complete(session, url, "The scheduler decides which request runs next", tokens, ignore_eos=True)
    context, ids, text = list(whole.prompt_ids), [], ""
    while len(ids) < tokens:
        part = await complete(session, url, context, min(chunk, tokens - len(ids)), ignore_eos=True)
        ids += part.ids
        text += part.text
        context += part.ids
    return {"tokens": tokens, "chunk": chunk, "ids_equal": ids == whole.ids, "text_equal": text == whole.text}


async def natural_eos(session: aiohttp.ClientSession, url: str, prompts: int, tokens: int,
                      concurrency: int = 16) -> dict[str, Any]:
    """How often greedy decoding ends by itself (EOS after the stop-trigger word), and how varied it is."""
    words = "river engine garden signal window market forest bridge queue tenant memory cache".split()
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Completion:
        async with gate:
            prompt = f"{words[i % 12].capitalize()} number {i}: tell me about the {words[(i * 7) % 12]}"
            return await complete(session, url, prompt, tokens)

    results = await asyncio.gather(*[one(i) for i in range(prompts)])
    stops = sorted(len(r.ids) for r in results if r.finish_reason == "stop")
    ratios = sorted(len(set(r.ids)) / max(1, len(r.ids)) for r in results)
    return {"prompts": prompts, "max_tokens": tokens, "eos": len(stops),
            "eos_within_32": sum(n <= 32 for n in stops), "eos_within_128": sum(n <= 128 for n in stops),
            "distinct_texts": len({r.text for r in results}),
            "median_distinct_token_ratio": round(ratios[len(ratios) // 2], 2)}


async def run_bench(url: str | None, tokens: int, concurrency: list[int], *,
                    torch_compile: bool = False) -> dict[str, Any]:
    report: dict[str, Any] = {}
    server = None
    if url is None:
        print("starting vLLM (tiny model) ...", flush=True)
        server = await start_vllm(torch_compile=torch_compile, progress=lambda m: print(m, flush=True))
        url = server.url
        report["startup_s"] = round(server.started_in_s, 1)
        report["torch_compile"] = torch_compile
    try:
        async with aiohttp.ClientSession() as session:
            await complete(session, url, "warm up", 8)
            report["fidelity"] = await chunk_fidelity(session, url, 128, 16)
            print(f"chunked continuation == one request: {report['fidelity']}", flush=True)
            report["natural_eos"] = await natural_eos(session, url, 96, 512)
            print(f"natural EOS: {report['natural_eos']}", flush=True)
            report["decode"] = []
            for streams in concurrency:
                row = await decode_speed(session, url, streams, tokens)
                report["decode"].append(row)
                print(f"{streams:>3} stream(s): {row['tokens_per_s']:7.0f} tok/s total, "
                      f"{row['per_stream_tokens_per_s']:6.0f} tok/s per stream, TTFT {row['ttft_ms']:.0f} ms",
                      flush=True)
    finally:
        if server is not None:
            await server.stop()
    return report
