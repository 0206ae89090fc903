"""Mid-stream failover on two real engines behind the real gateway (Envoy + picker).

The engine serving a streamed request is SIGKILLed (by PID) mid-generation.  Its worker sidecar ends the
chunk without a finish; the driver resumes from the token ids it already streamed, through the gateway,
on the other engine, and the client gets the complete output, equal token for token to the
uninterrupted greedy run: nothing lost, nothing repeated.  When the engine dies the test takes its
endpoint out of the picker, as Kubernetes does with a pod whose readiness probe fails.
"""

from __future__ import annotations

import json
import os
import signal

import aiohttp
import pytest

from tokenslice_sidecar.app import SidecarConfig, start
from tokenslice_sidecar.metrics import SidecarMetrics

from .helpers import PROMPTS, greedy, reference

pytestmark = pytest.mark.engine


async def _stream(http: aiohttp.ClientSession, url: str, body: dict, on_tokens) -> dict:
    """Stream a completion, calling ``on_tokens(total)`` after each event; the client's whole view."""
    ids: list[int] = []
    text, finish, done = "", None, 0
    async with http.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                done += 1
                continue
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                ids += choice.get("token_ids") or []
                text += choice["text"]
                finish = choice["finish_reason"] or finish
            on_tokens(len(ids))
    return {"ids": ids, "text": text, "finish": finish, "done": done}


async def test_engine_killed_mid_stream_resumes_on_the_other(http, vllm, vllm_factory, gateway_stack):
    victim = await vllm_factory()
    stack = await gateway_stack(endpoints=[])
    doomed_metrics, driver_metrics = SidecarMetrics(), SidecarMetrics()
    doomed, doomed_port = await start(SidecarConfig(vllm_url=victim.url, key=stack.key), metrics=doomed_metrics)
    # the driver is the other pod's sidecar; its chunks go through the gateway, one slice for the whole request
    driver, driver_port = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=stack.url, chunk_size=10_000,
                                                    key=stack.key, failover_backoff_s=0.1),
                                      metrics=driver_metrics)
    survivor = f"127.0.0.1:{driver_port}"
    try:
        body = {"model": vllm.model, **greedy(prompt=PROMPTS[1], max_tokens=120, ignore_eos=True)}
        ref = (await reference(http, vllm, "/v1/completions", body))["choices"][0]
        stack.picker.datastore.set_endpoints([f"127.0.0.1:{doomed_port}"])  # the request starts on the victim
        killed_at: list[int] = []

        def kill_after_some(tokens: int) -> None:
            if not killed_at and tokens >= 10:
                os.kill(victim.pid, signal.SIGKILL)  # the engine dies mid-stream
                stack.picker.datastore.set_endpoints([survivor])  # ... and its pod leaves the pool
                killed_at.append(tokens)

        got = await _stream(http, f"http://127.0.0.1:{driver_port}/v1/completions", body, kill_after_some)
        assert killed_at and killed_at[0] < len(ref["token_ids"])
        assert got["ids"] == ref["token_ids"]  # nothing lost, nothing repeated
        assert got["text"] == ref["text"] and got["finish"] == ref["finish_reason"] and got["done"] == 1
        assert sum(driver_metrics.registry.get_sample_value("tokenslice_sidecar_failovers_total", {"fault": f})
                   or 0 for f in ("broken", "unreachable", "unavailable")) >= 1
        assert (doomed_metrics.registry.get_sample_value("tokenslice_sidecar_worker_chunks_total") or 0) >= 1
        assert (driver_metrics.registry.get_sample_value("tokenslice_sidecar_worker_chunks_total") or 0) >= 1
    finally:
        await driver.cleanup()
        await doomed.cleanup()
