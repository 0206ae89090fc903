"""Live engine load: each endpoint's ``/metrics`` (the sidecar passes it through to vLLM)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

import aiohttp

from tokenslice import promtext
from tokenslice_picker.datastore.endpoints import Datastore, Endpoint

log = logging.getLogger("tokenslice_picker.scraper")

# vLLM metric -> Endpoint attribute (values summed over label sets, e.g. several engines). Parsed by hand
# below for speed (this runs every scrape interval on the hot path); the names are tokenslice.promtext's.
METRICS = {
    promtext.RUNNING: "running",
    promtext.WAITING: "waiting",
    promtext.KV_USAGE: "kv_usage",
    promtext.KV_USAGE_OLD: "kv_usage",
    promtext.PREFIX_HITS: "prefix_hits",
    promtext.PREFIX_QUERIES: "prefix_queries",
    promtext.PREFIX_HITS_OLD: "prefix_hits",
    promtext.PREFIX_QUERIES_OLD: "prefix_queries",
}


_CACHE_CONFIG = promtext.CACHE_CONFIG + "{"
_BLOCKS = re.compile(r'[{,]num_gpu_blocks="(\d+)"')
_BLOCK_SIZE = re.compile(r'[{,]block_size="(\d+)"')


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Sum the samples of the few vLLM series the scorers use (Prometheus text format).

    ``kv_capacity_tokens`` comes from the labels of ``vllm:cache_config_info`` (blocks x block size).
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        if line.startswith(_CACHE_CONFIG):
            blocks, size = _BLOCKS.search(line), _BLOCK_SIZE.search(line)
            if blocks and size:
                out["kv_capacity_tokens"] = out.get("kv_capacity_tokens", 0.0) + int(blocks[1]) * int(size[1])
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        attr = METRICS.get(line[:name_end])
        if attr is None:
            continue
        rest = line[line.index("}", name_end) + 1:] if line[name_end] == "{" else line[name_end:]
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        out[attr] = out.get(attr, 0.0) + value
    return out


class MetricsScraper:
    """Scrape every endpoint every ``interval_s``; an endpoint that fails keeps its last values."""

    def __init__(self, datastore: Datastore, interval_s: float = 1.0, path: str = "/metrics",
                 timeout_s: float = 2.0) -> None:
        self.datastore = datastore
        self.interval_s = interval_s
        self.path = path
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metrics-scraper")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._scrape(session, ep) for ep in self.datastore.endpoints()))
        self.rounds += 1

    async def _scrape(self, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        try:
            async with session.get(f"http://{ep.address}{self.path}") as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                values = parse_vllm_metrics(await resp.text())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if ep.scrape_ok:
                log.warning("scrape failed", extra={"endpoint": ep.address, "error": str(exc)})
            ep.scrape_ok = False
            return
        for attr in ("running", "waiting", "kv_usage", "prefix_hits", "prefix_queries"):
            setattr(ep, attr, values.get(attr, 0.0))
        if "kv_capacity_tokens" in values:
            ep.kv_capacity_tokens = int(values["kv_capacity_tokens"])
        ep.scraped_at = time.monotonic()
        ep.scrape_ok = True

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                await self.scrape_once(session)
                await asyncio.sleep(self.interval_s)  # the scrape period itself, not a synchronisation
