"""Preemption end to end on the real vLLM: client -> Envoy -> picker -> driver -> Envoy -> worker, one slot.

A long low-class request holds the endpoint's only slot with one long slice (its class's chunk size
is larger than the request).  A high-class request arrives: the picker cuts the low chunk (a signed
order to the worker sidecar), the worker ends it like a slice end, the high request runs in the freed
slot and finishes while the low one waits, then the low one continues.  Both outputs equal their
uninterrupted greedy runs token for token.  With the picker's preemption off, the high request waits
for the whole low generation and the ordering assertion fails.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tokenslice.policy import PriorityClass, SchedulingPolicySpec
from tokenslice_sidecar.app import SidecarConfig, start
from tokenslice_sidecar.metrics import SidecarMetrics

from .helpers import PROMPTS, greedy, reference

pytestmark = pytest.mark.engine


async def _stream(http: aiohttp.ClientSession, url: str, body: dict, klass: str,
                  started: asyncio.Event | None = None) -> dict:
    """A streamed request of ``klass``; its tokens and when its last one came."""
    ids: list[int] = []
    async with http.post(url, json={**body, "stream": True}, headers={"x-priority-class": klass}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                for choice in event["choices"]:
                    ids += choice.get("token_ids") or []
                if started is not None and len(ids) >= 10:
                    started.set()
    return {"ids": ids, "done_at": time.monotonic()}


async def test_high_priority_cuts_a_long_slice_and_both_equal_uncut(http, vllm, gateway_stack):
    policy = SchedulingPolicySpec(slots_per_endpoint=1, priority_classes=[
        PriorityClass(name="high", priority=200, chunk_size=4096),
        PriorityClass(name="low", priority=100, chunk_size=4096)])
    stack = await gateway_stack(endpoints=[], policy=policy, preemption=True)  # False: the ordering fails
    metrics = SidecarMetrics()
    runner, port = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=stack.url, key=stack.key),
                               metrics=metrics)
    try:
        stack.picker.datastore.set_endpoints([f"127.0.0.1:{port}"])
        long = {"model": vllm.model, **greedy(prompt=PROMPTS[1], max_tokens=400, ignore_eos=True)}
        short = {"model": vllm.model, **greedy(prompt=PROMPTS[0], max_tokens=16, ignore_eos=True)}
        refs = [(await reference(http, vllm, "/v1/completions", b))["choices"][0]["token_ids"] for b in (long, short)]

        url = f"{stack.url}/v1/completions"
        running = asyncio.Event()
        low = asyncio.create_task(_stream(http, url, long, "low", running))
        await asyncio.wait_for(running.wait(), 120)  # the low request is streaming: it holds the one slot
        high = await _stream(http, url, short, "high")
        low_done = await low

        assert high["ids"] == refs[1] and low_done["ids"] == refs[0]  # both token for token
        assert high["done_at"] < low_done["done_at"]  # the high request did not wait for the long slice
        cuts = metrics.registry.get_sample_value("tokenslice_sidecar_cuts_total", {"reason": "priority"}) or 0
        assert cuts >= 1
        assert (stack.picker.metrics.registry.get_sample_value("tokenslice_picker_preemptions_total",
                                                               {"reason": "priority", "class": "low"}) or 0) >= 1
        assert (metrics.registry.get_sample_value("tokenslice_sidecar_slices_cut_total") or 0) >= 1
    finally:
        await runner.cleanup()
