"""Benchmark of the picker: what the picker adds to every chunk, and how many chunks it can decide.

Three parts, printed side by side (and as JSON with --json):

1. ``proto``   -- per-message cost of the Envoy types: xds-protos (compiled protobuf/upb) vs
                  envoy-data-plane (betterproto2): parse one ProcessingRequest, build+serialise
                  one routing ProcessingResponse.
2. ``load``    -- a real Envoy (--concurrency 1) in front of a C++ upstream (another Envoy's
                  direct_response), twice: routing straight to the upstream (baseline), and through
                  ext_proc to ``tokenslice picker`` pinned to ONE core.  Closed-loop HTTP/1.1 load
                  at rising concurrency; reports chunk decisions/s and latency p50/p99 of both,
                  and the difference (added latency per chunk).
3. ``notify``  -- chunk-end notification latency: from the upstream's last response byte to the
                  picker freeing the slot (the ext_proc stream end, response_trailer_mode SEND).

    tokenslice bench micro picker            # all parts, ~1-2 min
    tokenslice bench micro picker --parts load --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenslice import contract
from tokenslice.bench.stats import percentile as pct
from tokenslice.envoy import ExtProc, Static, envoy_binary, start_envoy
from tokenslice.procs import free_port, spawn, tokenslice_argv


# --- 1. protobuf libraries ---------------------------------------------------------------------
def bench_proto(n: int = 20000) -> dict[str, dict[str, float]]:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    key = b"k" * 32
    hdrs = {":method": "POST", ":path": "/v1/completions", ":authority": "gw", "content-type": "application/json",
            "user-agent": "tokenslice-driver", "x-request-id": secrets.token_hex(16),
            **contract.ChunkHeaders(request_id=secrets.token_hex(8), chunk_index=3, tenant="acme",
                                    priority_class="standard", generated=96, prompt_tokens=512, slice=32,
                                    kv_holder="10.0.0.7:8000").sign(key)}
    req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hdrs.items()])))
    wire = req.SerializeToString()
    addr = "10.0.0.7:8000"

    def xds() -> bytes:
        r = pb.ProcessingRequest.FromString(wire)
        h = {x.key: x.raw_value.decode("latin-1") for x in r.request_headers.headers.headers}
        md = struct_pb2.Struct()
        md.get_or_create_struct("envoy.lb")["x-gateway-destination-endpoint"] = h[contract.KV_HOLDER]
        resp = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=contract.DESTINATION_ENDPOINT, raw_value=addr.encode()))]),
                clear_route_cache=True)), dynamic_metadata=md)
        return resp.SerializeToString()

    from envoy_data_plane.envoy.config.core import v3 as bcore
    from envoy_data_plane.envoy.service.ext_proc import v3 as bpb
    from envoy_data_plane.google import protobuf as bproto

    def betterproto() -> bytes:
        r = bpb.ProcessingRequest.parse(wire)
        h = {x.key: x.raw_value.decode("latin-1") for x in r.request_headers.headers.headers}
        md = bproto.Struct(fields={"envoy.lb": bproto.Value(struct_value=bproto.Struct(fields={
            "x-gateway-destination-endpoint": bproto.Value(string_value=h[contract.KV_HOLDER])}))})
        resp = bpb.ProcessingResponse(
            request_headers=bpb.HeadersResponse(response=bpb.CommonResponse(
                header_mutation=bpb.HeaderMutation(set_headers=[bcore.HeaderValueOption(
                    header=bcore.HeaderValue(key=contract.DESTINATION_ENDPOINT, raw_value=addr.encode()))]),
                clear_route_cache=True)), dynamic_metadata=md)
        return bytes(resp)

    assert pb.ProcessingResponse.FromString(betterproto()) == pb.ProcessingResponse.FromString(xds())
    out: dict[str, dict[str, float]] = {}
    for name, fn, reps in (("xds-protos (upb)", xds, n), ("envoy-data-plane (betterproto2)", betterproto, n // 10)):
        for _ in range(200):
            fn()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) / reps * 1e6)
        out[name] = {"us_per_message": min(samples), "wire_bytes": len(wire)}
    return out


# --- 2. end-to-end load --------------------------------------------------------------------------
UPSTREAM_BODY = 'data: {"token": 0}\n\ndata: [DONE]\n\n'


def upstream_bootstrap(ports: list[int], admin: int) -> str:
    import yaml

    listeners = [{
        "name": f"up{p}", "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "stat_prefix": "up", "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}],
    } for p in ports]
    return yaml.safe_dump({"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
                           "static_resources": {"listeners": listeners}})


LOADGEN = r'''
import asyncio, itertools, os, sys, time, json
host, port, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
duration, headers = float(sys.argv[4]), json.loads(sys.argv[5])
def build(h):
    return ("POST /v1/completions HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n{}").encode()
fields = headers.pop("__sign__", None)  # chunk fields: sign each request anew (the picker refuses replays)
if fields:
    from tokenslice.contract import ChunkHeaders
    key, ids = os.environ["BENCH_SIGNING_KEY"].encode(), itertools.count()
    def request(): return build(ChunkHeaders(**fields, request_id=f"{os.getpid()}-{next(ids)}").sign(key))
else:
    fixed = build(headers)
    def request(): return fixed
lat = []; errors = 0
async def worker(stop):
    global errors
    r, w = await asyncio.open_connection(host, port)
    while time.perf_counter() < stop:
        req = request()
        t0 = time.perf_counter()
        w.write(req)
        head = await r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        if b"transfer-encoding: chunked" in head.lower():
            while True:
                size = int((await r.readline()).strip(), 16)
                await r.readexactly(size + 2)
                if size == 0: break
        else:
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"): n = int(line.split(b":")[1])
            await r.readexactly(n)
        if status != 200: errors += 1
        lat.append(time.perf_counter() - t0)
    w.close()
async def main():
    stop = time.perf_counter() + duration
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(stop) for _ in range(conns)))
    print(json.dumps({"n": len(lat), "elapsed": time.perf_counter() - t0, "lat": lat, "errors": errors}))
asyncio.run(main())
'''


def _taskset(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu and shutil.which("taskset") else []


async def run_load(url_port: int, conns: int, duration: float, headers: dict[str, Any],
                   cpu: str | None, procs: int, env: dict[str, str] | None = None) -> dict[str, float]:
    """Closed-loop load from ``procs`` processes sharing ``conns`` connections."""
    per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    runs = [await asyncio.create_subprocess_exec(
        *_taskset(cpu), sys.executable, "-c", LOADGEN, "127.0.0.1", str(url_port), str(c), str(duration),
        json.dumps(headers), stdout=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})}) for c in per if c]
    results = [json.loads((await p.communicate())[0]) for p in runs]
    lat = [x for r in results for x in r["lat"]]
    elapsed = max(r["elapsed"] for r in results)
    return {"rps": len(lat) / elapsed, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "n": len(lat), "errors": sum(r["errors"] for r in results)}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pin(pid: int, cpu: str | None) -> None:
    """Pin every thread of a running process (Envoy starts its workers before we can wrap it)."""
    if cpu and shutil.which("taskset"):
        subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], check=True, stdout=subprocess.DEVNULL)


async def bench_load(levels: list[int], duration: float, picker_cpu: str | None, load_cpu: str | None,
                     procs: int, envoy_cpu: str | None = None, upstream_cpu: str | None = None,
                     repeat: int = 1) -> list[dict[str, float]]:
    key = secrets.token_bytes(32)
    workdir = Path(tempfile.mkdtemp(prefix="bench-picker-"))
    up_ports = [free_port(), free_port()]
    (workdir / "up.yaml").write_text(upstream_bootstrap(up_ports, free_port()))
    up = spawn("upstream-envoy", [envoy_binary(), "-c", str(workdir / "up.yaml"), "--concurrency", "1", "-l",
                                  "error", "--base-id", str(os.getpid() % 10000 * 10 + 7), "--disable-hot-restart"],
               workdir / "upstream.log")
    _pin(up.pid, upstream_cpu)
    (workdir / "key").write_bytes(key.hex().encode())
    (workdir / "policy.yaml").write_text("slotsPerEndpoint: 4096\nqueue: {maxQueuedChunks: 100000}\n")
    grpc_port, metrics_port = free_port(), free_port()
    gw = spawn("picker", [*_taskset(picker_cpu), *tokenslice_argv(
        "picker", "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-host", "127.0.0.1",
        "--metrics-port", str(metrics_port), "--policy", str(workdir / "policy.yaml"),
        "--endpoints", ",".join(f"127.0.0.1:{p}" for p in up_ports), "--signing-key-file", str(workdir / "key"),
        "--scrape-interval", "0", "--log-level", "warning")], workdir / "picker.log")
    direct = picked = None
    try:
        await _wait_port(grpc_port)
        direct = await start_envoy(Static((f"127.0.0.1:{up_ports[0]}",)))
        picked = await start_envoy(ExtProc("127.0.0.1", grpc_port))
        for e in (direct, picked):
            _pin(e.pid, envoy_cpu)
        # the common case: a continuation chunk going back to its KV holder
        # signed per request by the load generator: the picker refuses a replayed signature
        chunk = {"__sign__": dict(chunk_index=1, tenant="default", priority_class="standard", generated=32,
                                  prompt_tokens=256, slice=32, kv_holder=f"127.0.0.1:{up_ports[0]}",
                                  expires=int(time.time()) + 3600)}
        env = {"BENCH_SIGNING_KEY": key.hex()}
        for port in (direct.listen.port, picked.listen.port):  # warm-up
            await run_load(port, 4, 1.0, chunk, load_cpu, 1, env)
        rows = []
        for conns in levels:
            reps = []
            for _ in range(repeat):  # direct and picker interleaved, so drift hits both alike
                d = await run_load(direct.listen.port, conns, duration, chunk, load_cpu, procs, env)
                cpu0 = _cpu_seconds(gw.pid)
                p = await run_load(picked.listen.port, conns, duration, chunk, load_cpu, procs, env)
                cpu_us = (_cpu_seconds(gw.pid) - cpu0) / max(1, p["n"]) * 1e6
                reps.append({"direct_rps": d["rps"], "direct_p50_ms": d["p50_ms"], "direct_p99_ms": d["p99_ms"],
                             "picker_rps": p["rps"], "picker_p50_ms": p["p50_ms"], "picker_p99_ms": p["p99_ms"],
                             "added_p50_ms": p["p50_ms"] - d["p50_ms"], "added_p99_ms": p["p99_ms"] - d["p99_ms"],
                             "errors": d["errors"] + p["errors"], "picker_cpu_us_per_chunk": cpu_us})
            # the median of the repetitions, per column
            rows.append({"conns": conns, "repeat": repeat,
                         **{k: statistics.median(r[k] for r in reps) for k in reps[0]}})
            r = rows[-1]
            cpu_us = r["picker_cpu_us_per_chunk"]
            print(f"  conns={conns:3d}  direct {r['direct_rps']:7.0f}/s p50 {r['direct_p50_ms']:6.2f} "
                  f"p99 {r['direct_p99_ms']:6.2f} ms | picker {r['picker_rps']:7.0f}/s p50 {r['picker_p50_ms']:6.2f} "
                  f"p99 {r['picker_p99_ms']:6.2f} ms | added p50 {r['added_p50_ms']:5.2f} p99 {r['added_p99_ms']:5.2f}"
                  f" ms | picker CPU {cpu_us:5.0f} us/chunk  errors {r['errors']}", flush=True)
        return rows
    finally:
        for e in (direct, picked):
            if e is not None:
                await e.stop()
        for proc in (gw, up):
            await proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# --- 3. chunk-end notification latency ----------------------------------------------------------------
async def bench_notify(n: int = 300) -> dict[str, float]:
    import aiohttp
    from aiohttp import web

    from tokenslice_picker.server import start_picker

    ends: dict[str, float] = {}
    released: dict[str, float] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        rid = request.headers[contract.REQUEST_ID]
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(8):
            await resp.write(f"data: {i}\n\n".encode())
        await resp.write_eof()
        ends[rid] = time.monotonic()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    up_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    key = secrets.token_bytes(32)
    gw = await start_picker(signing_key=key, endpoints=[f"127.0.0.1:{up_port}"], scrape_interval_s=0)
    gw.dispatcher.release_listeners.append(lambda c, t: released.__setitem__(c.request_id, t))
    envoy = await start_envoy(ExtProc("127.0.0.1", gw.grpc_port))
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(n):
                h = contract.ChunkHeaders(request_id=f"n{i}", chunk_index=1, tenant="default",
                                          priority_class="standard", slice=8).sign(key)
                async with s.post(envoy.url + "/v1/completions", headers=h, json={}) as r:
                    await r.read()
                deadline = time.monotonic() + 5
                while f"n{i}" not in released and time.monotonic() < deadline:
                    await asyncio.sleep(0.0005)
    finally:
        await envoy.stop()
        await gw.stop(0)
        await runner.cleanup()
    lat = [released[k] - ends[k] for k in ends if k in released]
    return {"n": len(lat), "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "max_ms": max(lat) * 1e3, "mean_ms": statistics.fmean(lat) * 1e3}


def plot(results: dict[str, object], path: Path) -> Path:
    """Latency (p50/p99, direct vs through the picker) and decisions/s against offered concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["load"]
    conns = [r["conns"] for r in rows]  # type: ignore[index]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style, label in (("direct_p50_ms", "b-", "Envoy direct p50"),
                              ("direct_p99_ms", "b--", "Envoy direct p99"),
                              ("picker_p50_ms", "r-", "Envoy + picker p50"),
                              ("picker_p99_ms", "r--", "Envoy + picker p99")):
        ax1.plot(conns, [r[key] for r in rows], style, marker="o", label=label)  # type: ignore[index]
    ax1.set(xscale="log", yscale="log", xlabel="concurrent chunks (closed loop)", ylabel="latency per chunk (ms)",
            title="Latency per chunk")
    ax1.legend(fontsize=8)
    ax2.plot(conns, [r["direct_rps"] for r in rows], "b-o", label="Envoy direct")  # type: ignore[index]
    ax2.plot(conns, [r["picker_rps"] for r in rows], "r-o", label="Envoy + picker (1 core)")  # type: ignore[index]
    ax2.axhline(2000, color="grey", ls=":", label="target 2000/s")
    ax2.set(xscale="log", xlabel="concurrent chunks (closed loop)", ylabel="chunks/s", title="Chunk decisions/s")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokenslice bench micro picker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="proto,load,notify")
    ap.add_argument("--levels", default="1,2,4,8,16,32,64", help="concurrent connections, rising")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per level and mode")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions per level (medians reported)")
    ap.add_argument("--picker-cpu", default="0", help="CPU the picker is pinned to (taskset); '' = unpinned")
    ap.add_argument("--load-cpu", default="", help="CPUs for the load generator; '' = unpinned")
    ap.add_argument("--load-procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--envoy-cpu", default="", help="CPU for the front Envoys (both modes); '' = unpinned")
    ap.add_argument("--upstream-cpu", default="", help="CPU for the upstream Envoy; '' = unpinned")
    ap.add_argument("--json", type=Path, help="also write results here")
    ap.add_argument("--plot", type=Path, default=None,
                    help="PNG of the load part (default: $TOKENSLICE_CACHE/bench/picker.png)")
    ap.add_argument("--from-json", type=Path, help="only re-plot an earlier --json result")
    args = ap.parse_args(argv)
    from tokenslice.paths import cache_dir

    plot_path = args.plot or cache_dir() / "bench" / "picker.png"
    if args.from_json:
        print(f"plot: {plot(json.loads(args.from_json.read_text()), plot_path)}")
        return 0
    parts = set(args.parts.split(","))
    results: dict[str, object] = {"cpus": os.cpu_count()}
    if "proto" in parts:
        print("== per-message cost of the Envoy types (parse request + build/serialise response)", flush=True)
        results["proto"] = bench_proto()
        for name, r in results["proto"].items():  # type: ignore[union-attr]
            print(f"  {name:34s} {r['us_per_message']:8.1f} us/message")
    if "load" in parts:
        print(f"== added latency per chunk and decisions/s; picker pinned to CPU {args.picker_cpu or '-'}, "
              f"Envoy --concurrency 1, {args.duration:g}s per point, median of {args.repeat}", flush=True)
        results["load"] = asyncio.run(bench_load([int(x) for x in args.levels.split(",")], args.duration,
                                                 args.picker_cpu or None, args.load_cpu or None, args.load_procs,
                                                 args.envoy_cpu or None, args.upstream_cpu or None, args.repeat))
    if "notify" in parts:
        print("== chunk-end notification: upstream's last byte -> picker frees the slot", flush=True)
        results["notify"] = r = asyncio.run(bench_notify())
        print(f"  n={r['n']}  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if "load" in results:
        with contextlib.suppress(ImportError):
            print(f"plot: {plot(results, plot_path)}")
    return 0


