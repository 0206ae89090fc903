"""Run ``tokenslice bench`` and, from outside it, break every system's run down per chunk.

The benchmark tears each system's data plane down as soon as its trace ends, so its own report
keeps only end-to-end numbers.  This wrapper runs the benchmark as a child, follows its progress
lines (``== <system> (i/n)``) to know which system is running, and once a second scrapes the
Prometheus endpoints of every process it finds on this host -- the sidecars
(``/tokenslice/metrics``), the gateway and vLLM (``/metrics``) -- found through their command
lines in /proc.  The last scrape before a system ends is its totals (sidecar, gateway) and the
difference to the first one its share of the engine's counters (vLLM).  Written to
``chunk_breakdown.json`` and ``chunk_breakdown.md`` next to the benchmark's own results.

    python3 scripts/gpu/observe.py --out DIR -- python3 -m tokenslice bench run SCENARIO --out DIR ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

SYSTEM_LINE = re.compile(r"^== (\S+) \(\d+/\d+\)")
DONE_LINE = re.compile(r"^\[(\S+)\] done at ")
"""The trace of a system has ended: its totals are in (the next engine may be starting already)."""


@dataclass
class Endpoints:
    sidecars: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)


def _arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def discover() -> Endpoints:
    """Metrics URLs of the sidecars, gateways and vLLM servers running on this host now."""
    found = Endpoints()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "tokenslice" in argv and "sidecar" in argv and (port := _arg(argv, "--port")):
            found.sidecars.append(f"http://127.0.0.1:{port}/tokenslice/metrics")
        elif "tokenslice" in argv and ("picker" in argv or "gateway" in argv) and (port := _arg(argv, "--metrics-port")):
            found.gateways.append(f"http://127.0.0.1:{port}/metrics")
        elif "vllm.entrypoints.openai.api_server" in argv and (port := _arg(argv, "--port")):
            found.engines.append(f"http://127.0.0.1:{port}/metrics")
    # a forked child (vLLM's engine core) shows its parent's command line: one URL once
    return Endpoints(*(sorted(set(urls)) for urls in (found.sidecars, found.gateways, found.engines)))


def flatten(text: str) -> dict[str, float]:
    """``name -> value`` summed over label sets (enough for totals, sums and counts)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_bucket") or s.name.endswith("_created"):
                continue
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def flatten_by_label(text: str, prefix: str, key: str) -> dict[str, float]:
    """``name{key=value} -> value`` for histograms' sums/counts split by one label (class)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix) and s.name.endswith(("_sum", "_count")) and key in s.labels:
                name = f"{s.name}{{{s.labels[key]}}}"
                out[name] = out.get(name, 0.0) + float(s.value)
    return out


async def scrape(session: aiohttp.ClientSession, urls: list[str], by_class: bool = False) -> dict[str, float]:
    total: dict[str, float] = {}
    for url in urls:
        try:
            async with session.get(url) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            continue
        parts = [flatten(text)]
        if by_class:
            parts.append(flatten_by_label(text, "tokenslice_picker_", "class"))
        for part in parts:
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
    return total


@dataclass
class SystemMetrics:
    label: str
    started: float
    engine_first: dict[str, float] = field(default_factory=dict)
    engine_last: dict[str, float] = field(default_factory=dict)
    sidecar: dict[str, float] = field(default_factory=dict)
    gateway: dict[str, float] = field(default_factory=dict)
    ended: float = 0.0

    def engine_delta(self) -> dict[str, float]:
        return {k: v - self.engine_first.get(k, 0.0) for k, v in self.engine_last.items()}


def _mean(d: dict[str, float], name: str, scale: float = 1.0) -> float | None:
    n = d.get(f"{name}_count", 0.0)
    return d.get(f"{name}_sum", 0.0) / n * scale if n else None


def breakdown(m: SystemMetrics) -> dict[str, float | str | None]:
    e, s, g = m.engine_delta(), m.sidecar, m.gateway
    chunks = s.get("tokenslice_sidecar_chunks_total")
    tokens_per_chunk = _mean(s, "tokenslice_sidecar_chunk_tokens")
    chunk_s = _mean(s, "tokenslice_sidecar_chunk_seconds")
    prompt = e.get("vllm:prompt_tokens_total", 0.0)
    hits = e.get("vllm:prefix_cache_hits_total", 0.0)
    steps = e.get("vllm:iteration_tokens_total_count", 0.0)
    row: dict[str, float | str | None] = {
        "system": m.label,
        "seconds": round(m.ended - m.started, 1),
        "chunks": chunks,
        "tokens_per_chunk": tokens_per_chunk,
        "chunk_wall_ms": chunk_s * 1e3 if chunk_s is not None else None,
        "chunk_ms_per_token": chunk_s / tokens_per_chunk * 1e3 if chunk_s and tokens_per_chunk else None,
        "pause_ms": _mean(s, "tokenslice_sidecar_pause_seconds", 1e3),
        "pauses": s.get("tokenslice_sidecar_pause_seconds_count"),
        "gw_queue_wait_ms": _mean(g, "tokenslice_picker_queue_wait_seconds", 1e3),
        "gw_queue_wait_interactive_ms": _mean({k.replace("{interactive}", ""): v for k, v in g.items()
                                               if k.endswith("{interactive}")},
                                              "tokenslice_picker_queue_wait_seconds", 1e3),
        "gw_queue_wait_batch_ms": _mean({k.replace("{batch}", ""): v for k, v in g.items() if k.endswith("{batch}")},
                                        "tokenslice_picker_queue_wait_seconds", 1e3),
        "gw_decision_us": _mean(g, "tokenslice_picker_decision_seconds", 1e6),
        "gw_grant_to_end_ms": _mean(g, "tokenslice_picker_chunk_seconds", 1e3),
        "gw_preemptions": g.get("tokenslice_picker_preemptions_total"),
        "vllm_requests": e.get("vllm:request_success_total"),
        "vllm_prompt_tokens": prompt,
        "vllm_prompt_tokens_cached": hits,
        "vllm_prompt_tokens_computed": prompt - hits if prompt else None,
        "vllm_generation_tokens": e.get("vllm:generation_tokens_total"),
        "vllm_queue_ms": _mean(e, "vllm:request_queue_time_seconds", 1e3),
        "vllm_prefill_ms": _mean(e, "vllm:request_prefill_time_seconds", 1e3),
        "vllm_itl_ms": _mean(e, "vllm:inter_token_latency_seconds", 1e3)
        or _mean(e, "vllm:time_per_output_token_seconds", 1e3),
        "vllm_steps": steps,
        "vllm_tokens_per_step": e.get("vllm:iteration_tokens_total_sum", 0.0) / steps if steps else None,
        "vllm_preemptions": e.get("vllm:num_preemptions_total"),
    }
    return row


COLUMNS = [
    ("system", "system", ""), ("chunks", "chunks", ".0f"), ("tokens_per_chunk", "tok/chunk", ".1f"),
    ("chunk_wall_ms", "chunk wall ms", ".0f"), ("chunk_ms_per_token", "ms/token in chunk", ".2f"),
    ("pause_ms", "pause ms (chunk k->k+1)", ".0f"), ("gw_queue_wait_batch_ms", "gw wait batch ms", ".0f"),
    ("gw_queue_wait_interactive_ms", "gw wait interactive ms", ".1f"), ("gw_decision_us", "gw decision us", ".0f"),
    ("vllm_requests", "vLLM requests", ".0f"), ("vllm_prompt_tokens_computed", "prefill tokens computed", ".0f"),
    ("vllm_prompt_tokens_cached", "prefill tokens cached", ".0f"), ("vllm_queue_ms", "vLLM queue ms", ".1f"),
    ("vllm_prefill_ms", "vLLM prefill ms", ".1f"), ("vllm_itl_ms", "vLLM ITL ms", ".2f"),
    ("vllm_tokens_per_step", "tokens/step", ".1f"),
]


def markdown(rows: list[dict[str, float | str | None]]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" if c[2] == "" else "---:" for c in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else (str(v) if not fmt else format(float(v), fmt)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", type=float, default=1.0, help="scrape period, seconds")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "bench.log").open("a", buffering=1)
    child = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    systems: list[SystemMetrics] = []
    current: list[SystemMetrics] = []
    started = time.time()

    def write() -> None:
        rows = [breakdown(m) for m in systems]
        (args.out / "chunk_breakdown.json").write_text(json.dumps(
            {"rows": rows, "raw": [{"label": m.label, "engine_delta": m.engine_delta(), "sidecar": m.sidecar,
                                    "gateway": m.gateway} for m in systems]}, indent=1))
        (args.out / "chunk_breakdown.md").write_text(markdown(rows))

    def finish() -> None:
        if current:
            m = current.pop()
            m.ended = time.time()
            systems.append(m)
            write()

    async def follow() -> None:
        assert child.stdout is not None
        async for raw in child.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            stamp = f"[{time.time() - started:7.1f}s] {line}"
            print(stamp, flush=True)
            log.write(stamp + "\n")
            match = SYSTEM_LINE.match(line)
            if match:
                finish()
                current.append(SystemMetrics(match.group(1), time.time()))
            elif DONE_LINE.match(line):
                finish()

    async def poll() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            while True:
                if current:
                    m = current[-1]
                    found = discover()
                    engine = await scrape(session, found.engines)
                    if not m.engine_first and engine:
                        m.engine_first = engine
                    if engine:
                        m.engine_last = engine
                    sidecar = await scrape(session, found.sidecars)
                    if sidecar:
                        m.sidecar = sidecar
                    gateway = await scrape(session, found.gateways, by_class=True)
                    if gateway:
                        m.gateway = gateway
                await asyncio.sleep(args.every)  # a sampling period, not synchronisation

    poller = asyncio.create_task(poll())
    await follow()
    code = await child.wait()
    poller.cancel()
    finish()
    print(f"[observe] benchmark exited {code}; chunk breakdown of {len(systems)} system(s) in {args.out}",
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
