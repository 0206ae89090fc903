"""End to end: the real local stack (vLLM + sidecar + gateway_ext + Envoy) driven by the official openai client.

One engine with ONE chunk slot (max-num-seqs 1): a long low-priority generation is streaming when a
high-priority request arrives. Without a chunk scheduler the high-priority request would wait for the
whole long generation (vLLM runs one sequence at a time); with tokenslice it takes the slot at the next
chunk boundary and finishes while the long one is still going. Its greedy text must equal what vLLM
itself produces unchunked. Then the stack stops and every process it started must be gone.

The picker runs per-slice mode (``--max-slice-tokens 0``): a slice end every chunk size is this test's point
(the high request takes the slot at a chunk boundary, and the low one is counted in chunks).  The default,
long slices with a cut instead of a boundary, is e2e/test_preemption.py.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from tokenslice import promtext
from tokenslice.local.stack import LocalConfig, LocalStack
from tokenslice.procs import pid_alive

pytestmark = [pytest.mark.engine, pytest.mark.envoy, pytest.mark.timeout(600)]


async def _wait_gone(pids: list[int], timeout_s: float = 20.0) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (alive := [p for p in pids if pid_alive(p)]) and loop.time() < deadline:
        await asyncio.sleep(0.1)  # polling a condition with a deadline
    return alive


async def test_priority_request_overtakes_a_long_generation_and_the_stack_cleans_up() -> None:
    lines: list[str] = []
    stack = LocalStack(LocalConfig(engines=1, chunk_size=8, max_num_seqs=1, picker_args=["--max-slice-tokens", "0"]),
                       progress=lines.append)
    await stack.start()
    pids = stack.pids()
    run_dir = stack.run_dir.path if stack.run_dir else None
    try:
        assert len(pids) >= 4, f"engine, sidecar, gateway, Envoy: {pids}"
        policy = stack.policy
        client = openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key="unused", max_retries=0)
        low_headers = {policy.tenant_header: "batch-a", policy.class_header: "batch"}
        high_headers = {policy.tenant_header: "web", policy.class_header: "interactive"}

        low = await client.completions.create(
            model=stack.model, prompt="a long batch job about rivers and mountains", max_tokens=300,
            temperature=0, stream=True, extra_headers=low_headers, extra_body={"ignore_eos": True})
        low_tokens: list[str] = []
        low_done = asyncio.Event()
        first_low = asyncio.Event()

        async def consume_low() -> None:
            async for event in low:
                if event.choices and event.choices[0].text:
                    low_tokens.append(event.choices[0].text)
                    first_low.set()
            low_done.set()

        low_task = asyncio.create_task(consume_low())
        await asyncio.wait_for(first_low.wait(), 120)

        prompt = [{"role": "user", "content": "hello from the web tenant"}]
        high = await client.chat.completions.create(
            model=stack.model, messages=prompt, max_tokens=24, temperature=0, extra_headers=high_headers)
        assert not low_done.is_set(), "the high-priority request waited for the whole long generation"
        assert high.choices[0].message.content
        assert high.usage is not None and high.usage.completion_tokens == 24 or \
            high.choices[0].finish_reason == "stop"

        # the same request straight to vLLM, unchunked: identical greedy text
        direct = openai.AsyncOpenAI(base_url=stack.engines[0].url + "/v1", api_key="unused", max_retries=0)
        reference = await direct.chat.completions.create(model=stack.model, messages=prompt, max_tokens=24,
                                                         temperature=0)
        assert high.choices[0].message.content == reference.choices[0].message.content

        await asyncio.wait_for(low_task, 300)
        assert len("".join(low_tokens)) > 0

        # both went through the scheduler: admitted with their own tenant and class
        assert stack.plane and stack.plane.picker_metrics_url
        async with aiohttp.ClientSession() as session:
            samples = await promtext.scrape(session, stack.plane.picker_metrics_url)
        admitted = {(s.labels.get("class"), s.labels.get("tenant")) for s in samples
                    if s.name == "tokenslice_picker_admissions_total" and s.value > 0}
        assert {("batch", "batch-a"), ("interactive", "web")} <= admitted
        continuations = sum(s.value for s in samples if s.name == "tokenslice_picker_dispatches_total"
                            and s.labels.get("kind") == "continuation" and s.labels.get("tenant") == "batch-a")
        assert continuations >= 300 // 8 - 1
    finally:
        await stack.stop()
    assert await _wait_gone(pids) == [], "processes left behind by the stack"
    assert run_dir is not None and not run_dir.exists(), "run directory left behind"
