"""Open-loop replay of a trace against one OpenAI-compatible endpoint, timing every streamed token.

Open loop: each request is sent at its trace offset whether or not earlier ones
finished, so a slow system builds a queue instead of slowing the arrivals down
(closed-loop clients hide exactly the head-of-line blocking we measure).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from tokenslice.bench.stats import RequestResult
from tokenslice.bench.trace import TraceRequest
from tokenslice.sse import error_of, sse_json


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send: base URL, model, the identity headers, and vLLM priorities (baseline b)."""

    name: str
    base_url: str
    model: str
    tenant_header: str | None = None
    class_header: str | None = None
    priorities: dict[str, int] = field(default_factory=dict)
    """stream name -> vLLM ``priority`` body field (lower runs first); empty = send none."""

    def request(self, req: TraceRequest) -> tuple[dict[str, str], dict]:
        headers = {"content-type": "application/json"}
        if self.tenant_header:
            headers[self.tenant_header] = req.tenant
        if self.class_header:
            headers[self.class_header] = req.priority_class
        body: dict = {
            "model": self.model,
            "prompt": req.prompt,
            "max_tokens": req.max_tokens,
            "temperature": 0.0,
            "ignore_eos": req.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
            # exact tokens per streamed event: under load vLLM merges several tokens into one event
            "return_token_ids": True,
        }
        if req.stream in self.priorities:
            body["priority"] = self.priorities[req.stream]
        return headers, body


Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _one(session: aiohttp.ClientSession, target: Target, req: TraceRequest, result: RequestResult,
               t0: float) -> None:
    loop = asyncio.get_running_loop()
    delay = t0 + req.at - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
    headers, body = target.request(req)
    result.sent = loop.time() - t0
    async with session.post(target.base_url.rstrip("/") + "/v1/completions", json=body,
                            headers=headers) as resp:
        if resp.status != 200:
            result.status = "error"
            result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            result.end = loop.time() - t0
            return
        async for event in sse_json(resp.content):
            err = error_of(event)
            if err is not None:
                result.status = "error"
                result.error = json.dumps(err)[:300]
                break
            now = loop.time() - t0
            for choice in event.get("choices") or ():
                ids = choice.get("token_ids")
                count = len(ids) if ids is not None else (1 if choice.get("text") else 0)
                if count and (choice.get("text") or ids):
                    if result.first_token is None and choice.get("text"):
                        result.first_token = now
                    result.token_times.append(now)
                    result.token_counts.append(count)
            usage = event.get("usage")
            if usage:
                result.completion_tokens = usage.get("completion_tokens") or 0
                result.prompt_tokens = usage.get("prompt_tokens") or 0
    result.end = loop.time() - t0
    if result.status == "ok" and not result.completion_tokens:
        result.completion_tokens = sum(result.token_counts)


async def replay(trace: list[TraceRequest], target: Target, *, window_s: float, drain_s: float,
                 draining: set[str], progress: Progress | None = _stderr, every_s: float = 2.0,
                 label: str | None = None) -> tuple[list[RequestResult], float]:
    """Send every request of ``trace`` at its offset; return the results and the cutoff time.

    After ``window_s`` the requests of ``draining`` streams get up to ``drain_s`` more to finish (the others
    keep running meanwhile, so the load stays on); then everything still open is cancelled -- ``cancelled``
    for ordinary streams, ``timeout`` for draining ones.
    """
    label = label or target.name
    results = [RequestResult(index=r.index, stream=r.stream, tenant=r.tenant, priority_class=r.priority_class,
                             scheduled=r.at) for r in trace]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = loop.time() + 0.2  # a moment to create the tasks before the first arrival
        tasks = [asyncio.create_task(_one(session, target, req, res, t0)) for req, res in zip(trace, results)]
        by_task = dict(zip(tasks, results))
        reporter = asyncio.create_task(_report(results, t0, every_s, progress, label)) if progress else None
        try:
            await asyncio.sleep(max(0.0, t0 + window_s - loop.time()))
            drain_tasks = [t for t, r in by_task.items() if r.stream in draining and not t.done()]
            if drain_tasks:
                await asyncio.wait(drain_tasks, timeout=max(0.0, t0 + window_s + drain_s - loop.time()))
        finally:
            cutoff = loop.time() - t0
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            if reporter:
                reporter.cancel()
        for task, outcome in zip(tasks, outcomes):
            res = by_task[task]
            if isinstance(outcome, asyncio.CancelledError):
                if res.status == "ok" and (res.end is None):
                    res.status = "timeout" if res.stream in draining else "cancelled"
                    res.completion_tokens = max(res.completion_tokens, sum(res.token_counts))
            elif isinstance(outcome, BaseException):
                res.status = "error"
                res.error = f"{type(outcome).__name__}: {outcome}"[:300]
    if progress:
        errors = [r for r in results if r.status == "error"]
        progress(f"[{label}] done at {cutoff:.1f}s: {sum(r.status == 'ok' for r in results)} finished, "
                 f"{sum(r.status == 'cancelled' for r in results)} cancelled at the cutoff, "
                 f"{sum(r.status == 'timeout' for r in results)} timed out, {len(errors)} errors"
                 + (f" (first: {errors[0].error})" if errors else ""))
    return results, cutoff


async def _report(results: list[RequestResult], t0: float, every_s: float, progress: Progress,
                  label: str) -> None:
    loop = asyncio.get_running_loop()
    last_tokens, last_t = 0, time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        now = loop.time() - t0
        sent = sum(1 for r in results if r.sent == r.sent)  # not NaN
        done = sum(1 for r in results if r.end is not None)
        tokens = sum(sum(r.token_counts) for r in results)
        t = time.monotonic()
        rate = (tokens - last_tokens) / max(1e-9, t - last_t)
        last_tokens, last_t = tokens, t
        progress(f"[{label}] t={now:5.1f}s sent {sent}/{len(results)} finished {done} "
                 f"in flight {sent - done} tokens {tokens} ({rate:.0f} tok/s)")
