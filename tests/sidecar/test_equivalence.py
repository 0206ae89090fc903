"""The chunking sidecar against the real vLLM: chunked == unchunked, token for token.

Every reference is the same request sent straight to vLLM (unchunked).  The sidecar
runs in-process on a free port; one sidecar per chunk size, shared by the session.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from .conftest import TEST_KEY
from .helpers import (
    CHAT,
    PROMPTS,
    choice_text,
    greedy,
    post_json,
    post_stream,
    reference,
    token_texts,
)

pytestmark = pytest.mark.engine

CHUNK_SIZES = [1, 7, 16, 64, 1000]
MAX_TOKENS = 48


# --- token-for-token equality ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
async def test_completions_equal_unchunked(http, vllm, sidecars, chunk_size):
    sc = await sidecars(chunk_size)
    for prompt in PROMPTS:
        body = greedy(prompt=prompt, max_tokens=MAX_TOKENS)
        ref = await reference(http, vllm, "/v1/completions", body)
        got = await post_json(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body})
        r, g = ref["choices"][0], got["choices"][0]
        assert g["token_ids"] == r["token_ids"], prompt
        assert g["text"] == r["text"], prompt
        assert (g["finish_reason"], g["stop_reason"]) == (r["finish_reason"], r["stop_reason"])
        assert got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
        assert got["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
        assert got["object"] == "text_completion" and got["model"] == ref["model"]

        streamed = await post_stream(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body})
        assert streamed.token_ids == r["token_ids"]
        assert streamed.text == r["text"]
        assert streamed.finish_reason == r["finish_reason"]
        assert streamed.usage is None  # not asked for
        # token by token as vLLM emits them (it merges a few when a reader lags), not one event per chunk
        chunks = -(-len(r["token_ids"]) // chunk_size)
        assert len(streamed.events) >= min(len(r["token_ids"]), chunks + 1)


async def test_token_id_prompt_equal_unchunked(http, vllm, sidecars):
    """A prompt given as token ids is used as is (no BOS added, as vLLM does); after the first request the
    sidecar knows the context length and skips /tokenize for such prompts."""
    sc = await sidecars(7)
    ids = (await post_json(http, f"{vllm.url}/tokenize", {"model": vllm.model, "prompt": PROMPTS[3]}))["tokens"]
    for prompt in (ids, ids[1:], [ids]):
        body = greedy(prompt=prompt, max_tokens=30)
        ref = (await reference(http, vllm, "/v1/completions", body))["choices"][0]
        got = (await post_json(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body}))["choices"][0]
        assert (got["token_ids"], got["text"]) == (ref["token_ids"], ref["text"])
        assert got["prompt_token_ids"] == ref["prompt_token_ids"]
    data = await post_json(http, f"{sc.url}/v1/completions", {"model": vllm.model, "prompt": ids, "max_tokens": 10**6},
                           400)
    assert data["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
async def test_chat_equal_unchunked(http, vllm, sidecars, chunk_size):
    sc = await sidecars(chunk_size)
    for messages in CHAT:
        body = greedy(messages=messages, max_completion_tokens=MAX_TOKENS)
        ref = await reference(http, vllm, "/v1/chat/completions", body)
        got = await post_json(http, f"{sc.url}/v1/chat/completions", {"model": vllm.model, **body})
        r, g = ref["choices"][0], got["choices"][0]
        assert g["token_ids"] == r["token_ids"]
        assert g["message"]["content"] == r["message"]["content"]
        assert g["message"]["role"] == "assistant"
        assert g["finish_reason"] == r["finish_reason"]
        assert got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
        assert got["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
        assert got["object"] == "chat.completion"

        streamed = await post_stream(http, f"{sc.url}/v1/chat/completions", {"model": vllm.model, **body})
        assert streamed.token_ids == r["token_ids"]
        assert streamed.text == r["message"]["content"]
        assert streamed.finish_reason == r["finish_reason"]


async def test_equal_under_concurrent_load(http, vllm, sidecars):
    """Many chunked requests interleaved in one engine still match their unchunked references."""
    small, big = await sidecars(7), await sidecars(16)
    jobs = []
    for i, prompt in enumerate(PROMPTS * 2):
        body = greedy(prompt=prompt, max_tokens=40 + i)
        jobs.append(("/v1/completions", body, small if i % 2 else big, bool(i % 3)))
    for i, messages in enumerate(CHAT * 2):
        body = greedy(messages=messages, max_tokens=30 + i)
        jobs.append(("/v1/chat/completions", body, big if i % 2 else small, bool(i % 2)))
    refs = await asyncio.gather(*(reference(http, vllm, path, body) for path, body, _, _ in jobs))

    async def chunked(path, body, sc, stream):
        url = f"{sc.url}{path}"
        if stream:
            s = await post_stream(http, url, {"model": vllm.model, **body})
            return s.token_ids, s.text
        got = await post_json(http, url, {"model": vllm.model, **body})
        return got["choices"][0]["token_ids"], choice_text(got)

    results = await asyncio.gather(*(chunked(*job) for job in jobs))
    for (ids, text), ref in zip(results, refs, strict=True):
        assert ids == ref["choices"][0]["token_ids"]
        assert text == choice_text(ref)


# --- stop conditions ----------------------------------------------------------------------------------------

async def test_stop_string_spanning_chunk_boundary(http, vllm, sidecars):
    chunk = 8
    sc = await sidecars(chunk)
    found = 0
    for prompt in PROMPTS:
        ids, texts = await token_texts(http, vllm, prompt, 40)
        full = "".join(texts)
        for boundary in (chunk, 2 * chunk, 3 * chunk):
            b = len("".join(texts[:boundary]))
            stop = full[max(0, b - 2):b + 2]
            if len(stop) < 3 or not full[max(0, b - 2):b] or full.find(stop) != b - 2 or not stop.strip():
                continue
            found += 1
            for include in (False, True):
                body = greedy(prompt=prompt, max_tokens=40, ignore_eos=True, stop=[stop, "\x00never"],
                               include_stop_str_in_output=include)
                ref = await reference(http, vllm, "/v1/completions", body)
                got = await post_json(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body})
                r, g = ref["choices"][0], got["choices"][0]
                assert r["finish_reason"] == "stop" and r["stop_reason"] == stop
                assert (g["text"], g["finish_reason"], g["stop_reason"]) == (r["text"], "stop", stop)
                assert got["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
                streamed = await post_stream(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body})
                assert streamed.text == r["text"]  # the held-back stop text never leaked
                assert streamed.finish_reason == "stop" and streamed.stop_reason == stop
            break
    assert found >= 2, "no usable stop string found across a boundary"


async def test_max_tokens_across_chunks(http, vllm, sidecars):
    sc = await sidecars(4)
    got = await post_json(http, f"{sc.url}/v1/completions",
                          {"model": vllm.model, **greedy(prompt=PROMPTS[0], max_tokens=10, ignore_eos=True)})
    assert len(got["choices"][0]["token_ids"]) == 10
    assert got["usage"]["completion_tokens"] == 10 and got["choices"][0]["finish_reason"] == "length"
    chat = await post_json(http, f"{sc.url}/v1/chat/completions",
                           {"model": vllm.model, **greedy(messages=CHAT[0], max_completion_tokens=9,
                                                           ignore_eos=True)})
    assert chat["usage"]["completion_tokens"] == 9 and chat["choices"][0]["finish_reason"] == "length"


async def test_stop_token_ids_and_min_tokens(http, vllm, sidecars):
    """A stop token (the same path as EOS) ends the generation mid-chunk exactly where vLLM does."""
    sc = await sidecars(5)
    ids, _ = await token_texts(http, vllm, PROMPTS[1], 30)
    stop_id = ids[12]
    first = ids.index(stop_id)
    for extra in ({}, {"min_tokens": first + 3}):
        body = greedy(prompt=PROMPTS[1], max_tokens=30, stop_token_ids=[stop_id], **extra)
        ref = await reference(http, vllm, "/v1/completions", body)
        got = await post_json(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body})
        r, g = ref["choices"][0], got["choices"][0]
        assert g["token_ids"] == r["token_ids"] and g["text"] == r["text"]
        assert (g["finish_reason"], g["stop_reason"]) == (r["finish_reason"], r["stop_reason"])
    assert r["finish_reason"] in ("stop", "length")


async def test_eos_ends_generation(http, vllm, sidecars):
    """EOS inside a chunk (finish 'stop' before the slice is used up) is the real end; ignore_eos runs on.

    EOS is made the argmax by a logit bias, so the first token of the first chunk is EOS.
    """
    sc = await sidecars(3)
    eos = (await post_json(http, f"{vllm.url}/tokenize", {"model": vllm.model, "prompt": "<|end_of_text|>",
                                                         "add_special_tokens": False}))["tokens"]
    assert len(eos) == 1
    for ignore in (False, True):
        body = greedy(prompt=PROMPTS[2], max_tokens=20, ignore_eos=ignore, logit_bias={str(eos[0]): 50})
        ref = await reference(http, vllm, "/v1/completions", body)
        for stream in (False, True):
            url = f"{sc.url}/v1/completions"
            if stream:
                s = await post_stream(http, url, {"model": vllm.model, **body})
                ids, finish, text = s.token_ids, s.finish_reason, s.text
            else:
                got = await post_json(http, url, {"model": vllm.model, **body})
                ids, finish, text = got["choices"][0]["token_ids"], got["choices"][0]["finish_reason"], \
                    got["choices"][0]["text"]
                assert got["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
            assert ids == ref["choices"][0]["token_ids"] and text == ref["choices"][0]["text"]
            assert finish == ref["choices"][0]["finish_reason"]
        if ignore:
            assert ref["usage"]["completion_tokens"] == 20
        else:
            assert ref["choices"][0]["finish_reason"] == "stop" and ref["usage"]["completion_tokens"] < 3


async def test_seeded_sampling_is_deterministic(http, vllm, sidecars):
    """seed is carried as seed + tokens generated so far: same seed, same output; another seed differs."""
    sc = await sidecars(5)
    body = {"model": vllm.model, "prompt": PROMPTS[1], "max_tokens": 25, "temperature": 1.0, "seed": 1234,
            "ignore_eos": True, "return_token_ids": True}
    a = await post_json(http, f"{sc.url}/v1/completions", body)
    b = await post_stream(http, f"{sc.url}/v1/completions", body)
    c = await post_json(http, f"{sc.url}/v1/completions", {**body, "seed": 99})
    assert a["choices"][0]["token_ids"] == b.token_ids
    assert a["choices"][0]["token_ids"] != c["choices"][0]["token_ids"]


# --- logprobs and usage -------------------------------------------------------------------------------------

async def test_completion_logprobs_concatenated(http, vllm, sidecars):
    sc = await sidecars(5)
    body = greedy(prompt=PROMPTS[3], max_tokens=17, logprobs=3)
    ref = (await reference(http, vllm, "/v1/completions", body))["choices"][0]["logprobs"]
    got = (await post_json(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body}))["choices"][0]["logprobs"]
    assert got["tokens"] == ref["tokens"]
    assert got["text_offset"] == ref["text_offset"]
    assert got["token_logprobs"] == pytest.approx(ref["token_logprobs"], abs=1e-3)
    assert [list(t) for t in got["top_logprobs"]] == [list(t) for t in ref["top_logprobs"]]
    streamed = await post_stream(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body})
    tokens = [t for frag in streamed.logprobs for t in frag["tokens"]]
    offsets = [o for frag in streamed.logprobs for o in frag["text_offset"]]
    assert tokens == ref["tokens"] and offsets == ref["text_offset"]


async def test_chat_logprobs_concatenated(http, vllm, sidecars):
    sc = await sidecars(4)
    body = greedy(messages=CHAT[1], max_tokens=13, logprobs=True, top_logprobs=2)
    ref = (await reference(http, vllm, "/v1/chat/completions", body))["choices"][0]["logprobs"]["content"]
    got = await post_json(http, f"{sc.url}/v1/chat/completions", {"model": vllm.model, **body})
    content = got["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [c["token"] for c in ref]
    assert [c["bytes"] for c in content] == [c["bytes"] for c in ref]
    assert [c["logprob"] for c in content] == pytest.approx([c["logprob"] for c in ref], abs=1e-3)
    assert [[t["token"] for t in c["top_logprobs"]] for c in content] == \
        [[t["token"] for t in c["top_logprobs"]] for c in ref]
    streamed = await post_stream(http, f"{sc.url}/v1/chat/completions", {"model": vllm.model, **body})
    assert [c["token"] for c in streamed.logprobs] == [c["token"] for c in ref]


async def test_usage_streaming(http, vllm, sidecars):
    sc = await sidecars(6)
    body = greedy(messages=CHAT[0], max_tokens=20, stream_options={"include_usage": True})
    ref = await post_stream(http, f"{vllm.url}/v1/chat/completions", {"model": vllm.model, **body})
    got = await post_stream(http, f"{sc.url}/v1/chat/completions", {"model": vllm.model, **body})
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert got.usage[key] == ref.usage[key]
    assert got.events[-1]["choices"] == [] and got.events[-1]["usage"]
    assert all(not ev.get("usage") for ev in got.events[:-1])

    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    running = await post_stream(http, f"{sc.url}/v1/chat/completions", {"model": vllm.model, **body})
    counts = [ev["usage"]["completion_tokens"] for ev in running.events if ev.get("choices")]
    assert counts == sorted(counts) and counts[-1] == ref.usage["completion_tokens"]


# --- SSE format ---------------------------------------------------------------------------------------------

async def test_chat_sse_format(http, vllm, sidecars):
    sc = await sidecars(3)
    s = await post_stream(http, f"{sc.url}/v1/chat/completions",
                          {"model": vllm.model, "messages": CHAT[2], "max_tokens": 14, "temperature": 0})
    assert {ev["object"] for ev in s.events} == {"chat.completion.chunk"}
    assert len({ev["id"] for ev in s.events}) == 1 and len({ev["created"] for ev in s.events}) == 1
    assert s.events[0]["id"].startswith("chatcmpl-")
    roles = [ch["delta"]["role"] for ev in s.events for ch in ev["choices"] if "role" in ch["delta"]]
    assert roles == ["assistant"]
    finishes = [ch["finish_reason"] for ev in s.events for ch in ev["choices"]]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] in ("stop", "length")
    assert all("usage" not in ev or ev["usage"] is None for ev in s.events)


async def test_completion_sse_format(http, vllm, sidecars):
    sc = await sidecars(2)
    s = await post_stream(http, f"{sc.url}/v1/completions",
                          {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 9, "temperature": 0})
    assert {ev["object"] for ev in s.events} == {"text_completion"}
    assert len({ev["id"] for ev in s.events}) == 1
    finishes = [ch["finish_reason"] for ev in s.events for ch in ev["choices"]]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] is not None


# --- the official client ------------------------------------------------------------------------------------

async def test_openai_client(vllm, sidecars):
    sc = await sidecars(5)
    direct = openai.AsyncOpenAI(base_url=f"{vllm.url}/v1", api_key="x")
    client = openai.AsyncOpenAI(base_url=f"{sc.url}/v1", api_key="x")
    try:
        kw = dict(model=vllm.model, temperature=0, max_tokens=21)
        ref = await direct.chat.completions.create(messages=CHAT[0], **kw)
        got = await client.chat.completions.create(messages=CHAT[0], **kw)
        assert got.choices[0].message.content == ref.choices[0].message.content
        assert got.usage.completion_tokens == ref.usage.completion_tokens
        stream = await client.chat.completions.create(messages=CHAT[0], stream=True,
                                                      stream_options={"include_usage": True}, **kw)
        parts, usage = [], None
        async for ev in stream:
            if ev.choices:
                parts.append(ev.choices[0].delta.content or "")
            if ev.usage:
                usage = ev.usage
        assert "".join(parts) == ref.choices[0].message.content
        assert usage.completion_tokens == ref.usage.completion_tokens

        cref = await direct.completions.create(prompt=PROMPTS[1], **kw)
        cgot = await client.completions.create(prompt=PROMPTS[1], **kw)
        assert cgot.choices[0].text == cref.choices[0].text
        ctext = "".join([ev.choices[0].text async for ev in
                         await client.completions.create(prompt=PROMPTS[1], stream=True, **kw)])
        assert ctext == cref.choices[0].text
    finally:
        await direct.close()
        await client.close()


# --- text at chunk boundaries -------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 2, 3])
async def test_multibyte_characters_split_at_boundaries(http, vllm, sidecars, chunk_size):
    """Chunk boundaries inside multi-byte UTF-8 characters give the unchunked text exactly.

    The tiny model only writes ASCII by itself, so generation is restricted (allowed_token_ids) to
    the byte-level tokens of non-ASCII text: nearly every boundary then splits a character, which
    is where vLLM's detokenizer, primed with a prompt ending mid-character, re-emits the whole
    context.
    """
    sc = await sidecars(chunk_size)
    tok = await post_json(http, f"{vllm.url}/tokenize",
                          {"model": vllm.model, "prompt": "é☃日本語ü", "add_special_tokens": False})
    allowed = sorted(set(tok["tokens"]))
    for prompt in ("a", "The", "Numbers"):
        body = greedy(prompt=prompt, max_tokens=24, allowed_token_ids=allowed)
        ref = (await reference(http, vllm, "/v1/completions", body))["choices"][0]
        got = (await post_json(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body}))["choices"][0]
        assert got["token_ids"] == ref["token_ids"]
        assert got["text"] == ref["text"] and prompt not in got["text"]
        streamed = await post_stream(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body})
        assert streamed.text == ref["text"]
    body = greedy(messages=CHAT[2], max_tokens=24, allowed_token_ids=allowed)
    ref = await reference(http, vllm, "/v1/chat/completions", body)
    got = await post_stream(http, f"{sc.url}/v1/chat/completions", {"model": vllm.model, **body})
    assert got.text == ref["choices"][0]["message"]["content"]


async def test_stop_inside_merged_event_counts_tokens_exactly(http, vllm, sidecars):
    """vLLM may merge tokens into one stream event; the driver recovers which token completed a stop."""
    from tokenslice_sidecar.driver import tokens_covering

    ids, texts = await token_texts(http, vllm, PROMPTS[1], 12)
    context, merged = ids[:4], ids[4:10]
    client = _client(http, vllm)

    async def detokenize(tokens: list[int]) -> str:
        return await client.detokenize(tokens, vllm.model)
    for j in range(1, len(merged) + 1):
        chars = len("".join(texts[4:4 + j]))
        if j > 1 and chars == len("".join(texts[4:3 + j])):
            continue  # a token without text cannot be told apart
        assert await tokens_covering(detokenize, context, merged, chars) == j


def _client(http, vllm):
    from tokenslice_sidecar.vllm import VllmClient

    return VllmClient(http, vllm.url, f"{vllm.url}/v1/completions", "", TEST_KEY, aiohttp.ClientTimeout(total=30))
