"""Direct vLLM vs through the chunking sidecar, side by side, for several chunk sizes and HTTP clients.

    tokenslice bench micro sidecar [--vllm-url URL] [--chunk-sizes 4,16,64]
        [--concurrency 1,8] [--tokens 256] [--rounds 5] [--clients aiohttp,httpx]

Starts a real vLLM with the tiny model (unless --vllm-url is given) and one sidecar process per
chunk size and driver HTTP client (the sidecar app, chunks straight to the local vLLM: the no-gateway
mode), then streams the same greedy, ignore_eos requests direct and through each sidecar.  Prints one
table: throughput (completion tokens/s over all streams), mean time per output token, time to first
token, and the per-chunk overhead = (sidecar wall - direct wall) / chunks per request.
``--clients`` compares the driver's vLLM client on aiohttp (the sidecar's) with one on httpx (defined
here; ``pip install httpx`` first): the design names httpx, the measurement decides.
Not a test: numbers depend on the machine; the command and its output go to docs/sidecar.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tokenslice.procs import free_port, spawn, wait_http

PROMPT = "Once upon a time, in a kingdom by the sea, there lived"


@dataclass
class Sample:
    wall: float
    ttft: float
    tokens: int


async def one_stream(http: aiohttp.ClientSession, url: str, model: str, tokens: int) -> Sample:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "return_token_ids": True}
    start = time.perf_counter()
    ttft = None
    n = 0
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            ev = json.loads(line[6:])
            for ch in ev.get("choices") or []:
                got = len(ch.get("token_ids") or [])
                if got and ttft is None:
                    ttft = time.perf_counter() - start
                n += got
    assert n == tokens, (n, tokens)
    return Sample(time.perf_counter() - start, ttft or 0.0, n)


async def measure(http: aiohttp.ClientSession, url: str, model: str, concurrency: int,
                  tokens: int) -> dict[str, float]:
    """One round: ``concurrency`` streams at once; throughput and per-stream means."""
    t0 = time.perf_counter()
    samples = await asyncio.gather(*(one_stream(http, url, model, tokens) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    wall = statistics.mean(s.wall for s in samples)
    ttft = statistics.mean(s.ttft for s in samples)
    return {"tput": sum(s.tokens for s in samples) / elapsed, "wall": wall, "ttft": ttft,
            "tpot_ms": 1000 * (wall - ttft) / max(1, tokens - 1)}


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and all its descendants (from /proc): robust to a busy machine."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += stats[p][1]
        todo.extend(c for c, (ppid, _) in stats.items() if ppid == p)
    return total


def httpx_client_factory():
    """A driver vLLM client on httpx: same calls, same SSE reader, another HTTP library.

    Only what the benchmark exercises is mapped: httpx's own exceptions are not turned into OpenAI
    errors here.
    """
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    import httpx

    from tokenslice.contract import SERVED_BY
    from tokenslice_sidecar.vllm import ChunkStream, UpstreamError, VllmClient

    holder: dict[str, httpx.AsyncClient] = {}

    def http() -> httpx.AsyncClient:
        if "c" not in holder:  # one pool per process, made inside the running loop
            holder["c"] = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=10.0, read=300.0, write=None, pool=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=3.0))
        return holder["c"]

    async def lines(resp: httpx.Response) -> AsyncIterator[bytes]:
        async for line in resp.aiter_lines():
            yield line.encode()

    class HttpxVllmClient(VllmClient):
        async def _post_json(self, path, body):
            resp = await http().post(f"{self.vllm_url}{path}", json=body)
            if resp.status_code != 200:
                raise UpstreamError(resp.status_code, resp.json())
            return resp.json()

        @asynccontextmanager
        async def stream_chunk(self, body, headers):
            async with http().stream("POST", self.chunk_url, content=body, headers=headers) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise UpstreamError(resp.status_code, resp.json())
                yield ChunkStream(lines(resp), resp.headers.get(SERVED_BY) or self.advertise, resp.aclose)

    def factory(base: VllmClient) -> VllmClient:
        return HttpxVllmClient(base.session, base.vllm_url, base.chunk_url, base.advertise, base.key,
                               base.timeout)

    return factory


def serve(args: argparse.Namespace) -> int:
    """One sidecar process with the chosen driver client (``--serve PORT``)."""
    from aiohttp import web

    from tokenslice_sidecar.app import SidecarConfig, build_app

    config = SidecarConfig(vllm_url=args.vllm_url, chunk_size=int(args.chunk_sizes), key=b"bench-" * 8,
                           advertise=f"127.0.0.1:{args.serve}")
    factory = httpx_client_factory() if args.client == "httpx" else None
    web.run_app(build_app(config, client_factory=factory), host="127.0.0.1", port=args.serve,
                handler_cancellation=True, access_log=None, print=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokenslice bench micro sidecar", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-url", help="use this running vLLM instead of starting the tiny one")
    ap.add_argument("--vllm-pid", type=int, help="its process id, to report vLLM CPU time (with --vllm-url)")
    ap.add_argument("--model", help="served model name (default: the first of /v1/models)")
    ap.add_argument("--chunk-sizes", default="4,16,64")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", default="aiohttp", help="driver HTTP clients to compare: aiohttp,httpx")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run one sidecar on this port
    ap.add_argument("--client", default="aiohttp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args)
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in args.chunk_sizes.split(",")]
    clients = args.clients.split(",")
    levels = [int(x) for x in args.concurrency.split(",")]
    vllm_pid = args.vllm_pid

    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)))
        vllm_url = args.vllm_url
        if not vllm_url:
            from tokenslice.engine.server import start_vllm

            print("starting vLLM (tiny model) ...", flush=True)
            server = await start_vllm(max_num_seqs=max(16, max(levels) * 2))
            stack.push_async_callback(server.stop)
            vllm_url, vllm_pid = server.url, server.pid
        async with http.get(f"{vllm_url}/v1/models") as resp:
            model = args.model or (await resp.json())["data"][0]["id"]

        sidecars: dict[str, tuple[str, int]] = {}
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sidecar-")))
        for client in clients:
            for size in sizes:
                port = free_port()
                label = f"{size}" if len(clients) == 1 else f"{size}/{client}"
                proc = spawn(f"sidecar-c{size}-{client}", [
                    sys.executable, "-m", "tokenslice.bench.micro.sidecar", "--serve", str(port), "--client", client,
                    "--vllm-url", vllm_url, "--chunk-sizes", str(size)], logs / f"sidecar-c{size}-{client}.log")
                stack.push_async_callback(proc.stop)
                sidecars[label] = (f"http://127.0.0.1:{port}", proc.pid)
                await wait_http(f"{sidecars[label][0]}/health", 60, proc)
        print(f"vLLM {vllm_url} model {model}; sidecars on {[u for u, _ in sidecars.values()]}", flush=True)

        for url in [vllm_url, *(u for u, _ in sidecars.values())]:
            await measure(http, url, model, 1, 16)  # warm-up (compile, caches, connections)
        rows = []
        targets = [("-", vllm_url, None)] + [(label, url, pid) for label, (url, pid) in sidecars.items()]
        for conc in levels:
            # rounds interleave every target (direct, chunk a, chunk b, ...) and report medians, so the
            # drift of a shared machine's load hits all of them alike; CPU seconds are summed
            per: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in targets}
            cpu: dict[str, list[float]] = {label: [0.0, 0.0] for label, _, _ in targets}  # sidecar, vLLM
            for r in range(args.rounds):
                print(f"-- concurrency {conc}: round {r + 1}/{args.rounds}", flush=True)
                for label, url, pid in targets:
                    before = (cpu_seconds(pid) if pid else 0.0, cpu_seconds(vllm_pid) if vllm_pid else 0.0)
                    per[label].append(await measure(http, url, model, conc, args.tokens))
                    cpu[label][0] += (cpu_seconds(pid) if pid else 0.0) - before[0]
                    cpu[label][1] += (cpu_seconds(vllm_pid) if vllm_pid else 0.0) - before[1]
            total_tokens = args.rounds * conc * args.tokens
            direct = median_of(per["-"])
            rows.append(("direct", "-", conc, direct, None, cpu["-"], total_tokens))
            for label in sidecars:
                res = median_of(per[label])
                chunks = -(-args.tokens // int(label.split("/")[0]))
                over = 1000 * (res["wall"] - direct["wall"]) / chunks
                rows.append(("sidecar", label, conc, res, (direct, over), cpu[label], total_tokens))
        load = os.getloadavg()[0]

    print()
    print(f"{args.tokens} tokens/stream, greedy, ignore_eos, median of {args.rounds} interleaved rounds; "
          f"{os.cpu_count()} cpus, load average at the end {load:.1f}")
    head = f"{'path':8} {'chunk':>13} {'streams':>7} {'tok/s':>8} {'vs direct':>9} {'TTFT ms':>8} " \
           f"{'TPOT ms':>8} {'ms/chunk extra wall':>19} {'sidecar CPU ms/chunk':>20} {'vLLM CPU ms/1k tok':>18}"
    print(head)
    print("-" * len(head))
    for path, size, conc, res, extra, (side_cpu, vllm_cpu), total_tokens in rows:
        ratio = f"{res['tput'] / extra[0]['tput']:.2f}x" if extra else "1.00x"
        over = f"{extra[1]:.1f}" if extra else "-"
        chunks = total_tokens / int(size.split("/")[0]) if size != "-" else 0
        side = f"{1000 * side_cpu / chunks:.2f}" if chunks else "-"
        vcpu = f"{1e6 * vllm_cpu / total_tokens:.0f}" if vllm_pid else "n/a"
        print(f"{path:8} {size:>13} {conc:>7} {res['tput']:8.1f} {ratio:>9} {1000 * res['ttft']:8.1f} "
              f"{res['tpot_ms']:8.2f} {over:>19} {side:>20} {vcpu:>18}")
    return 0


if __name__ == "__main__":  # the --serve children
    sys.exit(main())
