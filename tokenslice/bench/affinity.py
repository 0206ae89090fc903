"""The KV-affinity probe: the same chunked requests with and without affinity, read off vLLM's counters.

Requests run one at a time (nothing is cut off, nothing competes), so vLLM's
prefix-cache counters can be compared with the exact number of prefix tokens
the continuation chunks could have reused.  Two routings of the same chunks
over the same engines:

* ``tokenslice``: Envoy + gateway_ext, chunk k+1 goes to the engine holding chunk k's KV;
* ``round-robin``: the sidecars' chunks go through a plain round-robin Envoy (no affinity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tokenslice import promtext
from tokenslice.bench.runner import reusable_tokens
from tokenslice.local.stack import EXAMPLE_POLICY, DataPlane, EnginePool, Mode, RunDir
from tokenslice.policy import load_policy


@dataclass
class AffinityRow:
    routing: str
    requests: int
    prefix_queries: float
    prefix_hits: float
    reusable: int
    per_engine_hits: list[float]

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.reusable if self.reusable else float("nan")

    @property
    def recomputed(self) -> float:
        """Prefill tokens vLLM computed instead of reading from its cache."""
        return self.prefix_queries - self.prefix_hits


async def probe(*, engines: int = 2, chunk_size: int = 32, tokens: int = 320, requests: int = 3,
                model_dir: Path | None = None, progress: Callable[[str], None] = print) -> list[AffinityRow]:
    policy = load_policy(EXAMPLE_POLICY).model_copy(update={"chunk_size": chunk_size})
    run_dir = RunDir()
    rows: list[AffinityRow] = []
    try:
        async with EnginePool(engines, run_dir=run_dir, model_dir=model_dir, max_num_seqs=4,
                              progress=progress) as pool, aiohttp.ClientSession() as session:
            for mode, routing in (("tokenslice", "tokenslice (KV affinity)"),
                                  ("chunked-rr", "round-robin chunks (no affinity)")):
                mode_: Mode = mode  # type: ignore[assignment]
                async with DataPlane(pool, policy, run_dir, mode=mode_, progress=progress, log_level="WARNING",
                                     name=f"{mode}-") as plane:
                    urls = [f"{e.url}/metrics" for e in pool]
                    before = await promtext.scrape_all(urls)
                    block = int(promtext.label(before[0], promtext.CACHE_CONFIG, "block_size") or 0)
                    reusable = 0
                    for i in range(requests):
                        prompt = f"{mode} probe {i}: " + " ".join(["river mountain garden window"] * (4 + 3 * i))
                        async with session.post(plane.url + "/v1/completions", json={
                                "model": pool[0].model, "prompt": prompt, "max_tokens": tokens,
                                "ignore_eos": True, "temperature": 0}) as resp:
                            resp.raise_for_status()
                            usage = (await resp.json())["usage"]
                        reusable += reusable_tokens(usage["prompt_tokens"], usage["completion_tokens"], chunk_size,
                                                    block)
                    after = await promtext.scrape_all(urls)
                hits = [promtext.total(a, promtext.PREFIX_HITS) - promtext.total(b, promtext.PREFIX_HITS)
                        for a, b in zip(after, before)]
                queries = sum(promtext.total(a, promtext.PREFIX_QUERIES) - promtext.total(b, promtext.PREFIX_QUERIES)
                              for a, b in zip(after, before))
                rows.append(AffinityRow(routing, requests, queries, sum(hits), reusable, hits))
    finally:
        run_dir.close()
    return rows


def markdown(rows: list[AffinityRow], *, engines: int, chunk_size: int, tokens: int) -> str:
    lines = [f"{rows[0].requests if rows else 0} requests of {tokens} tokens, one at a time, chunk size {chunk_size}, "
             f"{engines} engines:", "",
             "| routing | prefix hits / reusable | hit rate | prefill tokens recomputed | hits per engine |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.routing} | {r.prefix_hits:.0f} / {r.reusable} | {r.hit_rate:.1%} | {r.recomputed:.0f} "
                     f"| {' / '.join(f'{h:.0f}' for h in r.per_engine_hits)} |")
    return "\n".join(lines) + "\n"
