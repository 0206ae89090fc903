"""End to end on real vLLM: with long slices, a high-priority request gets the engine's one slot by a cut.

One engine with ONE sequence slot (vLLM ``--max-num-seqs 1`` = ``slotsPerEndpoint: 1``) and long slices
(``tokenslice picker --max-slice-tokens 4096``): a 1000-token low-priority generation runs as ONE chunk,
so there is no slice end before it finishes.  A high-priority request arriving meanwhile can only run
if the picker cuts the low chunk, and then it finishes first: the slot is handed to it and the low
request's continuation waits for it.  With ``--no-preemption`` it waits for the whole low generation and
the first assertion below fails (checked by hand when this test was written).  The picker sends exactly
one signed cut to the worker sidecar, and the low request continues from its token ids: both greedy
answers equal what vLLM itself produces uninterrupted.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from tokenslice import promtext
from tokenslice.local.stack import LocalConfig, LocalStack

pytestmark = [pytest.mark.engine, pytest.mark.envoy, pytest.mark.timeout(600)]

LOW_PROMPT = "a long batch job about rivers and mountains"
LOW_TOKENS = 1000
HIGH_PROMPT = [{"role": "user", "content": "hello from the web tenant"}]


def _value(samples: list[promtext.Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_a_high_priority_request_cuts_a_long_low_slice_and_both_answers_stay_exact() -> None:
    base = LocalConfig().resolved_policy()
    policy = base.model_copy(update={"slots_per_endpoint": 1, "reserved_slots_per_endpoint": 0})
    stack = LocalStack(LocalConfig(engines=1, policy=policy, max_num_seqs=1,
                                   picker_args=["--max-slice-tokens", "4096"]), progress=lambda _: None)
    await stack.start()
    try:
        client = openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key="unused", max_retries=0)
        low = await client.completions.create(
            model=stack.model, prompt=LOW_PROMPT, max_tokens=LOW_TOKENS, temperature=0, stream=True,
            extra_headers={policy.tenant_header: "batch-a", policy.class_header: "batch"},
            extra_body={"ignore_eos": True})
        low_text: list[str] = []
        low_done, first_low = asyncio.Event(), asyncio.Event()

        async def consume_low() -> None:
            async for event in low:
                if event.choices and event.choices[0].text:
                    low_text.append(event.choices[0].text)
                    first_low.set()
            low_done.set()

        low_task = asyncio.create_task(consume_low())
        await asyncio.wait_for(first_low.wait(), 120)
        high = await client.chat.completions.create(
            model=stack.model, messages=HIGH_PROMPT, max_tokens=24, temperature=0,
            extra_headers={policy.tenant_header: "web", policy.class_header: "interactive"})
        # with a cut the slot went to the high request, and the low one continues only after it: no timing race
        assert not low_done.is_set(), "the high-priority request waited for the whole low-priority slice"
        await asyncio.wait_for(low_task, 300)

        assert stack.plane and stack.plane.picker_metrics_url
        async with aiohttp.ClientSession() as session:
            samples = await promtext.scrape(session, stack.plane.picker_metrics_url)
        assert _value(samples, "tokenslice_picker_preemptions_total", reason="priority", **{"class": "batch"}) == 1
        assert _value(samples, "tokenslice_picker_cut_failures_total") == 0
        assert _value(samples, "tokenslice_picker_cut_tokens_total", kind="produced") > 0

        direct = openai.AsyncOpenAI(base_url=stack.engines[0].url + "/v1", api_key="unused", max_retries=0)
        ref_high = await direct.chat.completions.create(model=stack.model, messages=HIGH_PROMPT, max_tokens=24,
                                                        temperature=0)
        ref_low = await direct.completions.create(model=stack.model, prompt=LOW_PROMPT, max_tokens=LOW_TOKENS,
                                                  temperature=0, extra_body={"ignore_eos": True})
        assert high.choices[0].message.content == ref_high.choices[0].message.content
        assert "".join(low_text) == ref_low.choices[0].text  # cut and continued: token for token the same
    finally:
        await stack.stop()
