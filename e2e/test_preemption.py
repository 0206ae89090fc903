"""End to end on real vLLM: the DEFAULT picker runs a request as one slice and cuts it for a higher class.

One engine with ONE sequence slot (vLLM ``--max-num-seqs 1`` = ``slotsPerEndpoint: 1``) and the picker as
``tokenslice local`` starts it, with no ``--max-slice-tokens`` flag: the default is long slices.  A
1000-token low-priority generation runs as ONE chunk while nobody waits (the policy's chunkSize, 32, is only
the fairness quantum), so there is no slice end before it finishes.  A high-priority request arriving
meanwhile can only run if the picker cuts the low chunk, and then it finishes first: the slot is handed to
it and the low request's continuation waits for it.  The picker sends exactly one signed cut to the worker
sidecar, and the low request continues from its token ids: both greedy answers equal what vLLM itself
produces uninterrupted.  With two engines (each slot held by one low request) the cut must reach the worker
that runs its victim, and both low answers stay exact.

Every low request is counted in slices: one each, plus one continuation for the cut.  With the default set
back to per-slice mode (``PickerSettings.max_slice_tokens = 0``) that count fails (a slice end every 32
tokens: ~31 continuations per request), checked when this test was written; with ``--no-preemption`` the
first assertion fails (the high request waits for the whole low slice), checked by hand.
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


@pytest.mark.parametrize("engines", [1, 2])
async def test_a_high_priority_request_cuts_a_long_low_slice_and_both_answers_stay_exact(engines: int) -> None:
    """With two engines each slot holds one low request: the cut must go to the worker running its victim."""
    base = LocalConfig().resolved_policy()
    policy = base.model_copy(update={"slots_per_endpoint": 1, "reserved_slots_per_endpoint": 0})
    assert policy.chunk_size < LOW_TOKENS  # per slice this would be many slices; by default it is one
    stack = LocalStack(LocalConfig(engines=engines, policy=policy, max_num_seqs=1), progress=lambda _: None)
    assert stack.config.picker_args == []  # the picker's defaults, as `tokenslice local up` runs it
    await stack.start()
    try:
        client = openai.AsyncOpenAI(base_url=stack.openai_base_url, api_key="unused", max_retries=0)
        low_text: list[list[str]] = [[] for _ in range(engines)]
        low_done = [asyncio.Event() for _ in range(engines)]
        first_low = [asyncio.Event() for _ in range(engines)]

        async def consume_low(i: int) -> None:
            low = await client.completions.create(
                model=stack.model, prompt=LOW_PROMPT, max_tokens=LOW_TOKENS, temperature=0, stream=True,
                extra_headers={policy.tenant_header: "batch-a", policy.class_header: "batch"},
                extra_body={"ignore_eos": True})
            async for event in low:
                if event.choices and event.choices[0].text:
                    low_text[i].append(event.choices[0].text)
                    first_low[i].set()
            low_done[i].set()

        low_tasks = []
        for i in range(engines):  # one at a time: each takes the one free slot left
            low_tasks.append(asyncio.create_task(consume_low(i)))
            await asyncio.wait_for(first_low[i].wait(), 120)
        high = await client.chat.completions.create(
            model=stack.model, messages=HIGH_PROMPT, max_tokens=24, temperature=0,
            extra_headers={policy.tenant_header: "web", policy.class_header: "interactive"})
        # with a cut the slot went to the high request, and the low one continues only after it: no timing race
        assert not any(d.is_set() for d in low_done), "the high-priority request waited for a whole low slice"
        await asyncio.wait_for(asyncio.gather(*low_tasks), 300)

        assert stack.plane and stack.plane.picker_metrics_url
        async with aiohttp.ClientSession() as session:
            samples = await promtext.scrape(session, stack.plane.picker_metrics_url)
        assert _value(samples, "tokenslice_picker_preemptions_total", reason="priority", **{"class": "batch"}) == 1
        assert _value(samples, "tokenslice_picker_cut_failures_total") == 0
        assert _value(samples, "tokenslice_picker_cut_tokens_total", kind="produced") > 0
        # one slice per low request while nobody waited, and one continuation after the one cut
        dispatched = {kind: _value(samples, "tokenslice_picker_dispatches_total", tenant="batch-a", kind=kind)
                      for kind in ("first", "continuation")}
        assert dispatched == {"first": engines, "continuation": 1}, dispatched

        direct = openai.AsyncOpenAI(base_url=stack.engines[0].url + "/v1", api_key="unused", max_retries=0)
        ref_high = await direct.chat.completions.create(model=stack.model, messages=HIGH_PROMPT, max_tokens=24,
                                                        temperature=0)
        ref_low = await direct.completions.create(model=stack.model, prompt=LOW_PROMPT, max_tokens=LOW_TOKENS,
                                                  temperature=0, extra_body={"ignore_eos": True})
        assert high.choices[0].message.content == ref_high.choices[0].message.content
        for text in low_text:  # one was cut and continued, the other ran through: token for token the same
            assert "".join(text) == ref_low.choices[0].text
    finally:
        await stack.stop()
