"""Load and faults on the real local stack (vLLM + sidecar + picker + Envoy, separate processes, loopback).

* load: ``TOKENSLICE_LOAD_STREAMS`` (default 300) concurrent streaming requests, a tenth abandoned after
  their first token; every stream completes or is refused with a JSON 4xx, nothing else; afterwards the
  picker holds no queue entry, granted slot or open request, and the parts' memory stays bounded;
* the picker SIGKILLed mid-run: every in-flight stream ends (completed or with an error event) within a
  bound -- none hangs -- and once a picker runs again (same flags) the stack serves;
* Envoy SIGKILLed and restarted on its port: the same.

Processes are killed by their PID only. Numbers go to stdout (``-s``) for docs/reliability.md; the pass
criteria are behaviour (nothing hung, nothing leaked), not timings.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tokenslice import promtext
from tokenslice.local.stack import LocalConfig, LocalStack
from tokenslice.procs import ManagedProcess, spawn, wait_http

pytestmark = [pytest.mark.engine, pytest.mark.envoy, pytest.mark.timeout(900)]

STREAMS = int(os.environ.get("TOKENSLICE_LOAD_STREAMS", "300"))
ROUNDS = int(os.environ.get("TOKENSLICE_LOAD_ROUNDS", "1"))
"""Load rounds one after another: RSS after each shows whether memory levels off (printed, not asserted)."""
ENDS_WITHIN_S = 120.0
PROMPTS = ["The river ran", "Tell me about mountains", "A story of a small village", "Once upon a time",
           "The gateway scheduler"]


@dataclass
class Tally:
    completed: int = 0
    refused: int = 0
    abandoned: int = 0
    errored: int = 0
    other: list[str] = field(default_factory=list)
    failed_status: dict[int, int] = field(default_factory=dict)
    """Fault runs: statuses of requests the gateway refused while a part was down (e.g. 500, fail-close)."""
    latencies: list[float] = field(default_factory=list)


async def _stream(session: aiohttp.ClientSession, url: str, i: int, tally: Tally, *, max_tokens: int,
                  abandon: bool, first_token: asyncio.Event | None = None) -> None:
    body = { "prompt": PROMPTS[i % len(PROMPTS)] + f" #{i}", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0}
    started = time.monotonic()
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                data = await resp.read()
                if 400 <= resp.status < 500 and b'"error"' in data:
                    tally.refused += 1
                elif first_token is not None and b'"error"' in data:  # a fault: the gateway's failure mode
                    tally.failed_status[resp.status] = tally.failed_status.get(resp.status, 0) + 1
                else:
                    tally.other.append(f"{resp.status} {data[:200]!r}")
                return
            tokens, done, error = 0, False, False
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    error = True
                    continue
                if event.get("choices") and event["choices"][0].get("text"):
                    tokens += 1
                    if first_token is not None:
                        first_token.set()
                    if abandon:
                        tally.abandoned += 1
                        return  # closing the response mid-stream: the client went away
            if error:
                tally.errored += 1
            elif done:
                tally.completed += 1
                tally.latencies.append(time.monotonic() - started)
            else:
                tally.other.append(f"stream ended without [DONE] after {tokens} events")
    except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
        tally.errored += 1 if first_token is not None else 0  # faults: a dropped connection is an ending
        if first_token is None:
            tally.other.append(f"{type(exc).__name__}: {exc}")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _picker_holds(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    samples = await promtext.scrape(session, metrics_url)
    return {name: promtext.total(samples, name) for name in (
        "tokenslice_picker_queue_length", "tokenslice_picker_endpoint_slots_granted",
        "tokenslice_picker_open_requests")}


async def _wait_released(session: aiohttp.ClientSession, metrics_url: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        held = await _picker_holds(session, metrics_url)
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.2)  # polling a condition with a deadline


def _proc(stack: LocalStack, name: str) -> ManagedProcess:
    assert stack.plane is not None
    return next(p for p in stack.plane.processes if p.name == name)


def _replace(stack: LocalStack, old: ManagedProcess, new: ManagedProcess) -> None:
    assert stack.plane is not None
    stack.plane.processes[stack.plane.processes.index(old)] = new


async def _kill(proc: ManagedProcess) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.to_thread(proc.popen.wait, 30)
    await proc.stop()  # the rest of its process group, if any


async def _fault_run(stack: LocalStack, session: aiohttp.ClientSession, victim: str, restart_check: str) -> None:
    """Streams in flight, SIGKILL ``victim`` by PID, every stream must end; respawn it; the stack serves."""
    tally = Tally()
    first = asyncio.Event()
    streams = [asyncio.create_task(_stream(session, stack.url, i, tally, max_tokens=96, abandon=False,
                                           first_token=first)) for i in range(12)]
    await asyncio.wait_for(first.wait(), 60)
    proc = _proc(stack, victim)
    killed_at = time.monotonic()
    await _kill(proc)
    async with asyncio.timeout(ENDS_WITHIN_S):  # none may hang
        await asyncio.gather(*streams)
    ended_in = time.monotonic() - killed_at
    assert not tally.other, tally.other
    new = spawn(victim, proc.argv, proc.log_path.with_name(proc.log_path.name + ".restarted"))
    _replace(stack, proc, new)
    await wait_http(restart_check, 60, new)
    after = Tally()
    await _stream(session, stack.url, 0, after, max_tokens=24, abandon=False)
    assert after.completed == 1, after
    print(f"\nFAULT {victim} SIGKILL: 12 streams in flight -> {tally.completed} completed, {tally.errored} ended "
          f"mid-stream with an error event or a dropped connection, refused before their first byte "
          f"{tally.failed_status}, 0 hung; all ended {ended_in:.1f}s after the kill; restarted, served again")
    assert tally.completed + tally.errored + sum(tally.failed_status.values()) == 12


async def test_load_then_picker_and_envoy_faults() -> None:
    stack = LocalStack(LocalConfig(engines=1, chunk_size=8, max_num_seqs=4), progress=lambda _: None)
    await stack.start()
    try:
        assert stack.plane is not None and stack.plane.picker_metrics_url
        metrics_url = stack.plane.picker_metrics_url
        watched = {p.name: p.pid for p in stack.plane.processes}
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            # --- load ---
            rss = [{name: _rss_kib(pid) for name, pid in watched.items()}]
            for round_ in range(1, ROUNDS + 1):
                tally = Tally()
                started = time.monotonic()
                async with asyncio.timeout(600):
                    await asyncio.gather(*(_stream(session, stack.url, i, tally, max_tokens=16,
                                                   abandon=i % 10 == 0) for i in range(STREAMS)))
                took = time.monotonic() - started
                held = await _wait_released(session, metrics_url)
                rss.append({name: _rss_kib(pid) for name, pid in watched.items()})
                lat = sorted(tally.latencies)
                p50 = lat[len(lat) // 2] if lat else float("nan")
                print(f"\nLOAD round {round_}: {STREAMS} concurrent streams in {took:.1f}s: {tally.completed} "
                      f"completed (p50 {p50:.1f}s), {tally.abandoned} abandoned mid-stream, {tally.refused} refused "
                      f"4xx, {tally.errored} errors, other {tally.other[:3]}; picker afterwards {held}; "
                      f"RSS KiB {rss[-2]} -> {rss[-1]}")
                assert not tally.other and tally.errored == 0
                assert tally.completed + tally.refused + tally.abandoned == STREAMS
                assert tally.abandoned == len(range(0, STREAMS, 10))
                assert not any(held.values()), f"the picker still holds {held}"

            # --- faults ---
            picker = _proc(stack, "picker")
            await _fault_run(stack, session, "picker", metrics_url.replace("/metrics", "/healthz"))
            assert not any((await _wait_released(session, metrics_url)).values())
            del picker
            await _fault_run(stack, session, "envoy", stack.url + "/v1/models")
            assert not any((await _wait_released(session, metrics_url)).values())
    finally:
        await stack.stop()
