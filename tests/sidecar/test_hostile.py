"""Hostile input through the whole real path: Envoy -> picker -> driver sidecar -> chunks -> worker -> vLLM.

Hand-picked cases per category (malformed JSON, invalid UTF-8, wrong types, huge and negative numbers,
unknown fields, oversized bodies and headers, forged internal headers, replayed chunks, unknown routes),
then seeded random mutations of a valid request (a fuzzer: the seed is fixed, so a failure reproduces).
Every answer must come within a bound and be a 4xx OpenAI-style JSON error -- never a 5xx, never a hang
-- except a mutation that happens to stay valid, which must then be served (200). Like vLLM (pydantic's
lax mode) the driver reads ``"10"`` as 10 and ``"yes"`` as true; those are valid, not hostile. Afterwards the stack
serves normally and the picker holds no queue entry, slot or open request.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tokenslice import contract
from tokenslice.policy import PriorityClass, RequestLimits, SchedulingPolicySpec, Tenant

from .helpers import CHAT, PROMPTS

pytestmark = pytest.mark.engine

ANSWER_WITHIN_S = 30.0
POLICY = SchedulingPolicySpec(
    priority_classes=[PriorityClass(name="interactive", priority=1000, preemptible=False),
                      PriorityClass(name="standard", priority=100)],
    tenants=[Tenant(name="default", allowed_classes=["standard"])],
    limits=RequestLimits(max_tokens=64, max_n=4))


@dataclass
class Hostile:
    url: str
    stack: Any
    http: aiohttp.ClientSession
    model: str

    async def send(self, path: str, body: bytes, headers: dict[str, str] | None = None,
                   method: str = "POST") -> tuple[int, bytes]:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with asyncio.timeout(ANSWER_WITHIN_S):  # a hang fails here
            async with self.http.request(method, self.url + path, data=body, headers=hdrs) as resp:
                return resp.status, await resp.read()


@pytest.fixture
async def hostile(http, vllm, gateway_stack) -> AsyncIterator[Hostile]:
    from tokenslice_sidecar.app import SidecarConfig, start

    stack = await gateway_stack(endpoints=[], policy=POLICY)
    runner, port = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=stack.url, chunk_size=4, key=stack.key,
                                             max_body_bytes=1024 * 1024))
    stack.picker.datastore.set_endpoints([f"127.0.0.1:{port}"])
    try:
        yield Hostile(stack.url, stack, http, vllm.model)
    finally:
        await runner.cleanup()


def _is_openai_error(body: bytes) -> bool:
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str) and bool(err.get("type"))


def _cases(model: str) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(label, path, body, headers) that must each get a 4xx OpenAI error."""
    cmp, chat = "/v1/completions", "/v1/chat/completions"

    def j(**kw: Any) -> bytes:
        return json.dumps({"model": model, **kw}).encode()

    p = PROMPTS[0]
    cases: list[tuple[str, str, bytes, dict[str, str]]] = [
        # malformed JSON
        *((f"malformed {raw[:12]!r}", cmp, raw, {}) for raw in
          (b"", b"{", b'{"prompt": "x",}', b"[]", b"null", b'"prompt"', b"123", b"{'prompt': 'x'}",
           b'{"prompt": "x"} trailing', b"\x00\x01\x02")),
        # invalid UTF-8
        ("invalid utf-8 prompt", cmp, b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe\xfa"}', {}),
        ("invalid utf-8 chat", chat, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', {}),
        # wrong types
        ("prompt int", cmp, j(prompt=123), {}), ("prompt dict", cmp, j(prompt={"a": 1}), {}),
        ("prompt nested empty", cmp, j(prompt=[[]]), {}), ("max_tokens str", cmp, j(prompt=p, max_tokens="ten"), {}),
        ("max_tokens float", cmp, j(prompt=p, max_tokens=1.5), {}),
        ("temperature str", cmp, j(prompt=p, temperature="hot"), {}), ("n str", cmp, j(prompt=p, n="two"), {}),
        ("stop int", cmp, j(prompt=p, stop=5), {}), ("stream str", cmp, j(prompt=p, stream="maybe"), {}),
        ("messages str", chat, j(messages="hi"), {}), ("messages ints", chat, j(messages=[1, 2]), {}),
        ("message no role", chat, j(messages=[{"content": "hi"}]), {}),
        ("seed str", cmp, j(prompt=p, seed="x"), {}), ("logprobs str", cmp, j(prompt=p, logprobs="all"), {}),
        # huge and negative numbers
        ("max_tokens -1", cmp, j(prompt=p, max_tokens=-1), {}), ("max_tokens 0", cmp, j(prompt=p, max_tokens=0), {}),
        ("max_tokens 1e30", cmp, j(prompt=p, max_tokens=10**30), {}),
        ("max_tokens over ceiling", cmp, j(prompt=p, max_tokens=65), {}),
        ("n 0", cmp, j(prompt=p, n=0, max_tokens=2), {}), ("n -5", cmp, j(prompt=p, n=-5, max_tokens=2), {}),
        ("n 10000", cmp, j(prompt=p, n=10000, max_tokens=4), {}),
        ("best_of 10000", cmp, j(prompt=p, best_of=10000, max_tokens=4), {}),
        ("temperature -1", cmp, j(prompt=p, temperature=-1), {}), ("top_p 2", cmp, j(prompt=p, top_p=2), {}),
        ("seed 2**70", cmp, j(prompt=p, seed=2**70), {}), ("logprobs 1e6", cmp, j(prompt=p, logprobs=10**6), {}),
        ("temperature 1e308*10", cmp, j(prompt=p, max_tokens=2).replace(b"}", b', "temperature": 1e309}'), {}),
        ("nan", cmp, j(prompt=p, max_tokens=2).replace(b"}", b', "temperature": NaN}'), {}),
        ("prompt ids negative", cmp, j(prompt=[-1, -2], max_tokens=2), {}),
        ("prompt ids huge", cmp, j(prompt=[2**40], max_tokens=2), {}),
        # unknown model, unknown and unscheduled routes, wrong method
        ("unknown model", cmp, json.dumps({"model": "no-such-model", "prompt": p, "max_tokens": 2}).encode(), {}),
        ("responses route", "/v1/responses", j(input="hi"), {}), ("messages route", "/v1/messages", j(), {}),
        ("embeddings route", "/v1/embeddings", j(input="hi"), {}), ("nonsense route", "/v1/../../etc", j(), {}),
        # oversized body (sidecar limit 1 MiB here; 16 MiB by default)
        ("oversized body", cmp, j(prompt="x" * (2 * 1024 * 1024)), {}),
        # a client's forged internal headers: a chunk role with a bad signature is refused at the picker
        ("forged chunk", cmp, j(prompt=p, max_tokens=2),
         contract.ChunkHeaders("evil", 0, "default", "interactive", slice=100000).sign(b"x" * 32)),
        ("unsigned chunk role", cmp, j(prompt=p, max_tokens=2), {contract.ROLE: contract.ROLE_CHUNK}),
        # bad credentials where none are configured still cannot break anything: handled below as "served"
    ]
    return cases


async def test_hostile_input_is_refused_cleanly_and_the_stack_keeps_serving(hostile: Hostile) -> None:
    outcomes: dict[str, int] = {}
    for label, path, body, headers in _cases(hostile.model):
        status, data = await hostile.send(path, body, headers)
        outcomes[label] = status
        assert 400 <= status < 500, (label, status, data[:300])
        assert _is_openai_error(data), (label, data[:300])

    # forged admission and escalation headers from a client are stripped, never honoured: served as anonymous
    forged = contract.AdmitHeaders("evil", "web", "interactive", chunk_size=100000, max_tokens=0, max_n=0)
    status, data = await hostile.send("/v1/completions", json.dumps(
        {"model": hostile.model, "prompt": PROMPTS[1], "max_tokens": 2}).encode(),
        {**forged.sign(b"y" * 32), contract.DESTINATION_ENDPOINT: "10.9.9.9:1", "x-priority-class": "interactive"})
    assert status == 200 and json.loads(data)["id"] != "cmpl-evil"

    # a replayed chunk: a signed chunk runs once through the picker; the copy is refused (409)
    body = json.dumps({"model": hostile.model, "prompt": [1, 2, 3], "max_tokens": 2}).encode()
    chunk = contract.ChunkHeaders("replay", 0, "default", "standard", slice=2,
                                  body_digest=contract.body_digest("/v1/completions", body)).sign(hostile.stack.key)
    assert (await hostile.send("/v1/completions", body, chunk))[0] == 200
    status, data = await hostile.send("/v1/completions", body, chunk)
    assert status == 409 and _is_openai_error(data)

    # an oversized header block: Envoy answers 431 (in the OpenAI shape) before anything of ours runs
    async with hostile.http.post(hostile.url + "/v1/completions", data=b"{}",
                                 headers={"x-big": "a" * 100_000}) as resp:
        assert resp.status == 431 and _is_openai_error(await resp.read())

    await _serves_normally_and_holds_nothing(hostile)


async def test_fuzzed_requests_never_5xx(hostile: Hostile) -> None:
    """Seeded random mutations of valid requests: a 4xx OpenAI error or a normal answer, never 5xx or a hang."""
    rng = random.Random(20261129)
    weird: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 1e308, -1e-308, 0.5, "", "x",
                        "\u0000", "\ud7ff\ue000", "😀" * 50, [], [None], [1, "a"], {}, {"a": {"b": []}}, "a" * 5000]
    keys = ["prompt", "max_tokens", "n", "temperature", "top_p", "top_k", "stop", "stream", "seed", "logprobs",
            "echo", "best_of", "presence_penalty", "logit_bias", "stream_options", "min_tokens", "ignore_eos",
            "response_format", "messages", "tools", "model", "user", "suffix", "unknown_field_" + "z" * 10]
    served = refused = 0
    for i in range(60):
        chat = rng.random() < 0.4
        body: dict[str, Any] = ({"messages": CHAT[0]} if chat else {"prompt": rng.choice(PROMPTS)})
        body |= {"model": hostile.model, "max_tokens": rng.randint(1, 4)}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(keys)] = rng.choice(weird)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        status, data = await hostile.send(path, json.dumps(body).encode())
        assert status < 500, (i, body, status, data[:300])
        if status >= 400:
            refused += 1
            assert _is_openai_error(data), (i, body, data[:300])
        else:
            served += 1
    assert refused and served  # the fuzzer exercised both sides
    await _serves_normally_and_holds_nothing(hostile)


async def _serves_normally_and_holds_nothing(hostile: Hostile) -> None:
    status, data = await hostile.send("/v1/completions", json.dumps(
        {"model": hostile.model, "prompt": PROMPTS[2], "max_tokens": 9, "ignore_eos": True}).encode())
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 9
    picker = hostile.stack.picker
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:  # Envoy closes the last ext_proc streams just after the responses
        held = (len(picker.dispatcher.queues), picker.admission.limits.total_open,
                sum(e.granted for e in picker.datastore.endpoints()))
        if held == (0, 0, 0):
            break
        await asyncio.sleep(0.05)  # polling a condition with a deadline
    assert held == (0, 0, 0), "queue entries, open requests, granted slots left in the picker"
