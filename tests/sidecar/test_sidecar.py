"""The chunking sidecar against the real vLLM: chunked == unchunked, token for token.

Every reference is the same request sent straight to vLLM (unchunked).  The sidecar
runs in-process on a free port; one sidecar per chunk size, shared by the session.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from tokenslice import contract
from tokenslice.contract import AdmitHeaders, ChunkHeaders

from .conftest import TEST_KEY
from .helpers import CHAT, PROMPTS, choice_text, post_json, post_stream

pytestmark = pytest.mark.engine

CHUNK_SIZES = [1, 7, 16, 64, 1000]
MAX_TOKENS = 48


def _greedy(**extra):
    return {"temperature": 0.0, "return_token_ids": True, **extra}


async def _reference(http, vllm, path: str, body: dict) -> dict:
    return await post_json(http, f"{vllm.url}{path}", {"model": vllm.model, **body})


# --- token-for-token equality ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
async def test_completions_equal_unchunked(http, vllm, sidecars, chunk_size):
    sc = await sidecars(chunk_size)
    for prompt in PROMPTS:
        body = _greedy(prompt=prompt, max_tokens=MAX_TOKENS)
        ref = await _reference(http, vllm, "/v1/completions", body)
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
        body = _greedy(prompt=prompt, max_tokens=30)
        ref = (await _reference(http, vllm, "/v1/completions", body))["choices"][0]
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
        body = _greedy(messages=messages, max_completion_tokens=MAX_TOKENS)
        ref = await _reference(http, vllm, "/v1/chat/completions", body)
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
        body = _greedy(prompt=prompt, max_tokens=40 + i)
        jobs.append(("/v1/completions", body, small if i % 2 else big, bool(i % 3)))
    for i, messages in enumerate(CHAT * 2):
        body = _greedy(messages=messages, max_tokens=30 + i)
        jobs.append(("/v1/chat/completions", body, big if i % 2 else small, bool(i % 2)))
    refs = await asyncio.gather(*(_reference(http, vllm, path, body) for path, body, _, _ in jobs))

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

async def _token_texts(http, vllm, prompt: str, n: int) -> tuple[list[int], list[str]]:
    """Token ids and the text each one added, from an unchunked greedy request (the model writes ASCII)."""
    ref = await _reference(http, vllm, "/v1/completions",
                           _greedy(prompt=prompt, max_tokens=n, ignore_eos=True, logprobs=0))
    ids, texts = ref["choices"][0]["token_ids"], ref["choices"][0]["logprobs"]["tokens"]
    assert "".join(texts) == ref["choices"][0]["text"] and len(texts) == len(ids)
    return ids, texts


async def test_stop_string_spanning_chunk_boundary(http, vllm, sidecars):
    chunk = 8
    sc = await sidecars(chunk)
    found = 0
    for prompt in PROMPTS:
        ids, texts = await _token_texts(http, vllm, prompt, 40)
        full = "".join(texts)
        for boundary in (chunk, 2 * chunk, 3 * chunk):
            b = len("".join(texts[:boundary]))
            stop = full[max(0, b - 2):b + 2]
            if len(stop) < 3 or not full[max(0, b - 2):b] or full.find(stop) != b - 2 or not stop.strip():
                continue
            found += 1
            for include in (False, True):
                body = _greedy(prompt=prompt, max_tokens=40, ignore_eos=True, stop=[stop, "\x00never"],
                               include_stop_str_in_output=include)
                ref = await _reference(http, vllm, "/v1/completions", body)
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
                          {"model": vllm.model, **_greedy(prompt=PROMPTS[0], max_tokens=10, ignore_eos=True)})
    assert len(got["choices"][0]["token_ids"]) == 10
    assert got["usage"]["completion_tokens"] == 10 and got["choices"][0]["finish_reason"] == "length"
    chat = await post_json(http, f"{sc.url}/v1/chat/completions",
                           {"model": vllm.model, **_greedy(messages=CHAT[0], max_completion_tokens=9,
                                                           ignore_eos=True)})
    assert chat["usage"]["completion_tokens"] == 9 and chat["choices"][0]["finish_reason"] == "length"


async def test_stop_token_ids_and_min_tokens(http, vllm, sidecars):
    """A stop token (the same path as EOS) ends the generation mid-chunk exactly where vLLM does."""
    sc = await sidecars(5)
    ids, _ = await _token_texts(http, vllm, PROMPTS[1], 30)
    stop_id = ids[12]
    first = ids.index(stop_id)
    for extra in ({}, {"min_tokens": first + 3}):
        body = _greedy(prompt=PROMPTS[1], max_tokens=30, stop_token_ids=[stop_id], **extra)
        ref = await _reference(http, vllm, "/v1/completions", body)
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
        body = _greedy(prompt=PROMPTS[2], max_tokens=20, ignore_eos=ignore, logit_bias={str(eos[0]): 50})
        ref = await _reference(http, vllm, "/v1/completions", body)
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
    body = _greedy(prompt=PROMPTS[3], max_tokens=17, logprobs=3)
    ref = (await _reference(http, vllm, "/v1/completions", body))["choices"][0]["logprobs"]
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
    body = _greedy(messages=CHAT[1], max_tokens=13, logprobs=True, top_logprobs=2)
    ref = (await _reference(http, vllm, "/v1/chat/completions", body))["choices"][0]["logprobs"]["content"]
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
    body = _greedy(messages=CHAT[0], max_tokens=20, stream_options={"include_usage": True})
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


# --- failures and cancellation ------------------------------------------------------------------------------

async def _running(http, vllm) -> float:
    async with http.get(f"{vllm.url}/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _wait_for(predicate, deadline_s: float = 20.0, what: str = "condition"):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_client_disconnect_cancels_upstream(http, vllm, sidecars):
    sc = await sidecars(4)
    body = {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 3000, "ignore_eos": True, "stream": True,
            "temperature": 0}
    before = _sample(sc, "tokenslice_sidecar_cancelled_total")
    async with aiohttp.ClientSession() as own:
        resp = await own.post(f"{sc.url}/v1/completions", json=body)
        assert resp.status == 200
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"data:")
            if seen >= 12:  # a few chunks in
                break

        async def busy():
            return await _running(http, vllm) >= 1
        await _wait_for(busy, what="the chunk to run")
        resp.close()  # the client goes away mid-stream

    async def cancelled():
        return _sample(sc, "tokenslice_sidecar_cancelled_total") > before

    async def idle():
        return await _running(http, vllm) == 0
    await _wait_for(cancelled, what="the sidecar to notice the disconnect")
    await _wait_for(idle, what="vLLM to abort the in-flight chunk")
    assert _sample(sc, "tokenslice_sidecar_inflight_upstream") == 0


async def test_upstream_down_gives_clean_error(http):
    """vLLM on a closed port: a prompt OpenAI error, no hang, both for chat and completions, stream or not."""
    from tokenslice_sidecar.app import SidecarConfig, start

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    runner, port = await start(SidecarConfig(vllm_url=f"http://127.0.0.1:{dead}", key=TEST_KEY))
    try:
        for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT[0]})):
            for stream in (False, True):
                started = time.monotonic()
                data = await post_json(http, f"http://127.0.0.1:{port}{path}", {**body, "stream": stream}, 502)
                assert data["error"]["code"] == 502 and "unreachable" in data["error"]["message"]
                assert time.monotonic() - started < 10
        async with http.get(f"http://127.0.0.1:{port}/v1/models") as resp:
            assert resp.status == 502
    finally:
        await runner.cleanup()


async def test_hung_upstream_times_out(http):
    """A vLLM that accepts connections and never answers: a 504 after --read-timeout, not a hang.

    A fake (a socket that never replies) because a real vLLM cannot be made to hang on demand.
    """
    from tokenslice_sidecar.app import SidecarConfig, start

    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    hung = server.sockets[0].getsockname()[1]
    runner, port = await start(SidecarConfig(vllm_url=f"http://127.0.0.1:{hung}", key=TEST_KEY, read_timeout_s=1.0))
    try:
        started = time.monotonic()
        data = await post_json(http, f"http://127.0.0.1:{port}/v1/chat/completions",
                               {"messages": CHAT[0], "stream": True}, 504)
        assert data["error"]["code"] == 504 and time.monotonic() - started < 10
    finally:
        await runner.cleanup()
        for w in accepted:
            w.close()
        server.close()


async def test_mid_stream_upstream_error_and_chunk_headers(http, vllm):
    """Chunks through a gateway stand-in: signed headers on the wire, and a failure after chunk 0.

    The stand-in is a fake because a real vLLM cannot be made to fail between two chunks on demand:
    it checks each chunk's signed headers, serves chunk 0 from the real vLLM (naming a KV holder),
    and answers 503 to chunk 1.  The client gets chunk 0's tokens, an SSE error event, then [DONE].
    """
    from aiohttp import web

    from tokenslice_sidecar.app import SidecarConfig, start

    seen: list[ChunkHeaders] = []
    hints: list[str | None] = []

    async def flaky(request: web.Request) -> web.StreamResponse:
        chunk = ChunkHeaders.verify({k.lower(): v for k, v in request.headers.items()}, TEST_KEY)
        seen.append(chunk)
        hints.append(request.headers.get(contract.PREFIX_HASHES))
        if chunk.chunk_index != 0:
            return web.json_response({"error": {"message": "gateway overloaded", "type": "Unavailable",
                                                "param": None, "code": 503}}, status=503)
        async with http.post(f"{vllm.url}/v1/completions", data=await request.read(),
                             headers={"Content-Type": "application/json"}) as up:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               contract.SERVED_BY: "10.1.2.3:8000"})
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            return resp

    app = web.Application()
    app.router.add_post("/v1/completions", flaky)
    gw = web.AppRunner(app)
    await gw.setup()
    site = web.TCPSite(gw, "127.0.0.1", 0)
    await site.start()
    gw_port = gw.addresses[0][1]
    runner, port = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=f"http://127.0.0.1:{gw_port}",
                                             chunk_size=4, key=TEST_KEY, default_tenant="acme",
                                             default_class="batch"))
    try:
        prompt = " ".join(PROMPTS)  # long enough for prefix-hash blocks
        body = {"model": vllm.model, "prompt": prompt, "max_tokens": 20, "ignore_eos": True,
                "return_token_ids": True}
        s = await post_stream(http, f"http://127.0.0.1:{port}/v1/completions", body)
        assert s.events[-1]["error"]["code"] == 503  # an SSE error event, then [DONE] (checked by post_stream)
        assert len(s.token_ids) == 4 and s.finish_reason is None  # chunk 0 was delivered, nothing claims an end
        first, second = seen[-2], seen[-1]
        n_prompt = len((await post_json(http, f"{vllm.url}/tokenize", {"model": vllm.model, "prompt": prompt}))["tokens"])
        assert (first.chunk_index, first.generated, first.slice, first.kv_holder) == (0, 0, 4, "")
        assert (second.chunk_index, second.generated, second.slice, second.kv_holder) == (1, 4, 4, "10.1.2.3:8000")
        assert first.request_id == second.request_id and s.events[0]["id"] == f"cmpl-{first.request_id}"
        assert (first.tenant, first.priority_class, first.prompt_tokens) == ("acme", "batch", n_prompt)
        assert hints[-2] and len(hints[-2].split(",")) == n_prompt // 16 and hints[-1] is None

        data = await post_json(http, f"http://127.0.0.1:{port}/v1/completions", body, 503)
        assert data["error"]["message"] == "gateway overloaded"
    finally:
        await runner.cleanup()
        await gw.cleanup()


# --- the contract on the wire -------------------------------------------------------------------------------

async def test_forged_chunk_headers_are_refused(http, vllm, sidecars):
    sc = await sidecars(16)
    body = json.dumps({"model": vllm.model, "prompt": [1, 2, 3], "max_tokens": 2, "stream": True}).encode()

    def hdr(**kw) -> ChunkHeaders:
        fields = dict(request_id="r1", chunk_index=1, tenant="t", priority_class="premium", generated=4,
                      prompt_tokens=3, slice=2, kv_holder="10.0.0.1:8000",
                      body_digest=contract.body_digest("/v1/completions", body))
        return ChunkHeaders(**(fields | kw))

    long = json.dumps({"model": vllm.model, "prompt": [1, 2, 3], "max_tokens": 5000, "stream": True}).encode()
    cases = {
        "unsigned": (body, {k: v for k, v in hdr().sign(TEST_KEY).items() if k != contract.SIGNATURE}),
        "wrong key": (body, hdr().sign(b"not-the-key")),
        "tampered": (body, {**hdr().sign(TEST_KEY), contract.PRIORITY_CLASS: "critical"}),
        "expired": (body, hdr(expires=int(time.time()) - 5).sign(TEST_KEY)),
        "another body": (long, hdr().sign(TEST_KEY)),
        "beyond its slice": (long, hdr(body_digest=contract.body_digest("/v1/completions", long)).sign(TEST_KEY)),
        "no max_tokens": (b"{}", hdr(body_digest=contract.body_digest("/v1/completions", b"{}")).sign(TEST_KEY)),
    }
    json_type = {"Content-Type": "application/json"}
    for name, (data, headers) in cases.items():
        async with http.post(f"{sc.url}/v1/completions", data=data, headers=headers | json_type) as resp:
            err = await resp.json()
            assert resp.status == 403, name
            assert err["error"]["type"] == "PermissionDeniedError", name
    good = hdr().sign(TEST_KEY)
    async with http.post(f"{sc.url}/v1/completions", data=body, headers=good | json_type) as resp:
        assert resp.status == 200
        assert resp.headers[contract.SERVED_BY] == sc.url.removeprefix("http://")
        text = await resp.text()
        assert text.rstrip().endswith("data: [DONE]")
    async with http.post(f"{sc.url}/v1/completions", data=body, headers=good | json_type) as resp:
        assert resp.status == 403 and "replayed" in (await resp.json())["error"]["message"]
    assert _sample(sc, "tokenslice_sidecar_worker_chunks_total") >= 1


async def test_admit_headers(http, vllm, sidecars):
    """Signed admit headers name the request; forged ones are ignored (defaults), never an error."""
    sc = await sidecars(16)
    body = {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 3}
    good = AdmitHeaders("admitted-42", "acme", "premium").sign(TEST_KEY)
    async with http.post(f"{sc.url}/v1/completions", json=body, headers=good) as resp:
        assert (await resp.json())["id"] == "cmpl-admitted-42"
    forged = AdmitHeaders("forged-1", "acme", "premium").sign(b"wrong")
    async with http.post(f"{sc.url}/v1/completions", json=body, headers=forged) as resp:
        data = await resp.json()
        assert resp.status == 200 and data["id"] != "cmpl-forged-1"


@pytest.mark.parametrize("admitted,chunks", [(3, 4), (7, 2), (0, 1)])
async def test_admitted_chunk_size_governs_the_slice(http, vllm, sidecars, admitted, chunks):
    """The gateway's signed chunk size (the policy's, per class) wins over --chunk-size; 0 means ours (16)."""
    sc = await sidecars(16)
    body = {"model": vllm.model, "prompt": PROMPTS[1], "max_tokens": 10, "ignore_eos": True}
    before = _sample(sc, "tokenslice_sidecar_chunks_total")
    headers = AdmitHeaders("sized", "acme", "premium", chunk_size=admitted).sign(TEST_KEY)
    got = await post_json(http, f"{sc.url}/v1/completions", body | {"return_token_ids": True}, headers=headers)
    assert _sample(sc, "tokenslice_sidecar_chunks_total") - before == chunks  # ceil(10 / size)
    assert len(got["choices"][0]["token_ids"]) == 10 and got["usage"]["completion_tokens"] == 10


async def test_policy_class_chunk_size_through_the_real_gateway(http, vllm, gateway_stack):
    """Client -> Envoy -> picker (admits with the class's chunk size) -> driver -> chunks -> Envoy -> worker.

    The sidecar's own --chunk-size (16) loses to the policy: class ``small`` slices by 5, class ``std`` by
    the policy's chunkSize 8, each counted by the picker's dispatches and the sidecar's chunks.
    """
    from tokenslice_sidecar.app import SidecarConfig, start
    from tokenslice_sidecar.metrics import SidecarMetrics
    from tokenslice.policy import PriorityClass, SchedulingPolicySpec

    policy = SchedulingPolicySpec(chunk_size=8, priority_classes=[
        PriorityClass(name="small", priority=2, chunk_size=5), PriorityClass(name="std", priority=1)])
    stack = await gateway_stack(endpoints=[], policy=policy)
    metrics = SidecarMetrics()
    runner, port = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=stack.url, chunk_size=16, key=stack.key),
                               metrics=metrics)
    try:
        stack.picker.datastore.set_endpoints([f"127.0.0.1:{port}"])
        dispatches = stack.picker.metrics.dispatches
        for klass, chunks in (("small", 4), ("std", 3)):  # 18 tokens: ceil(18/5) = 4, ceil(18/8) = 3
            before = metrics.registry.get_sample_value("tokenslice_sidecar_chunks_total") or 0
            body = {"model": vllm.model, "prompt": PROMPTS[2], "max_tokens": 18, "ignore_eos": True}
            got = await post_json(http, f"{stack.url}/v1/completions", body,
                                  headers={"x-priority-class": klass})
            assert got["usage"]["completion_tokens"] == 18
            assert metrics.registry.get_sample_value("tokenslice_sidecar_chunks_total") - before == chunks
            served = sum(dispatches.get(klass, "default", kind) for kind in ("first", "continuation"))
            assert served == chunks, klass
    finally:
        await runner.cleanup()


async def test_forged_admitted_chunk_size_is_ignored(http, vllm, sidecars):
    sc = await sidecars(16)
    body = {"model": vllm.model, "prompt": PROMPTS[1], "max_tokens": 10, "ignore_eos": True}
    before = _sample(sc, "tokenslice_sidecar_chunks_total")
    rejected = _sample(sc, "tokenslice_sidecar_rejected_total", reason="bad_admit_headers")
    good = AdmitHeaders("sized", "acme", "premium", chunk_size=16).sign(TEST_KEY)
    await post_json(http, f"{sc.url}/v1/completions", body, headers={**good, contract.SLICE: "1"})
    assert _sample(sc, "tokenslice_sidecar_chunks_total") - before == 1  # tampered: our own 16, not 1
    assert _sample(sc, "tokenslice_sidecar_rejected_total", reason="bad_admit_headers") == rejected + 1


# --- pass-through and refusals ------------------------------------------------------------------------------

async def test_passthrough_endpoints(http, vllm, sidecars):
    sc = await sidecars(16)
    async with http.get(f"{sc.url}/v1/models") as a, http.get(f"{vllm.url}/v1/models") as b:
        assert a.status == b.status == 200
        assert [m["id"] for m in (await a.json())["data"]] == [m["id"] for m in (await b.json())["data"]]
    async with http.get(f"{sc.url}/health") as resp:
        assert resp.status == 200
    tok = {"model": vllm.model, "prompt": PROMPTS[4]}
    assert await post_json(http, f"{sc.url}/tokenize", tok) == await post_json(http, f"{vllm.url}/tokenize", tok)
    async with http.get(f"{sc.url}/metrics") as resp:
        assert "vllm:num_requests_running" in await resp.text()
    async with http.get(f"{sc.url}{contract.SIDECAR_METRICS_PATH}") as resp:
        text = await resp.text()
        assert "tokenslice_sidecar_chunks_total" in text and "vllm:" not in text


async def test_unchunkable_features_run_unchunked(http, vllm, sidecars):
    sc = await sidecars(4)
    body = {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 1}
    got = await post_json(http, f"{sc.url}/v1/completions", body)
    assert len(got["choices"]) == 2
    echo = await post_json(http, f"{sc.url}/v1/completions", {**body, "n": 1, "echo": True, "temperature": 0})
    assert echo["choices"][0]["text"].startswith(PROMPTS[0])
    assert _sample(sc, "tokenslice_sidecar_passthrough_total", reason="n") >= 1
    assert _sample(sc, "tokenslice_sidecar_passthrough_total", reason="echo") >= 1


async def test_bad_requests(http, vllm, sidecars):
    sc = await sidecars(4)
    async with http.post(f"{sc.url}/v1/completions", data=b"{not json",
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == 400
    cases = [
        ("/v1/completions", {"prompt": "x", "stop": ""}),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**7}),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": CHAT[0], "temperature": -3}),
    ]
    for path, body in cases:
        data = await post_json(http, f"{sc.url}{path}", {"model": vllm.model, **body}, 400)
        assert data["error"]["type"] and data["error"]["message"], body


async def test_sidecar_metrics_count_chunks(http, vllm, sidecars):
    sc = await sidecars(3)
    before = _sample(sc, "tokenslice_sidecar_chunks_total")
    await post_json(http, f"{sc.url}/v1/completions",
                    {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 10, "ignore_eos": True})
    assert _sample(sc, "tokenslice_sidecar_chunks_total") - before == 4  # 3 + 3 + 3 + 1
    async with http.get(f"{sc.url}{contract.SIDECAR_METRICS_PATH}") as resp:
        text = await resp.text()
    assert "tokenslice_sidecar_pause_seconds_count" in text
    assert "tokenslice_sidecar_chunk_tokens_bucket" in text


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
        body = _greedy(prompt=prompt, max_tokens=24, allowed_token_ids=allowed)
        ref = (await _reference(http, vllm, "/v1/completions", body))["choices"][0]
        got = (await post_json(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body}))["choices"][0]
        assert got["token_ids"] == ref["token_ids"]
        assert got["text"] == ref["text"] and prompt not in got["text"]
        streamed = await post_stream(http, f"{sc.url}/v1/completions", {"model": vllm.model, **body})
        assert streamed.text == ref["text"]
    body = _greedy(messages=CHAT[2], max_tokens=24, allowed_token_ids=allowed)
    ref = await _reference(http, vllm, "/v1/chat/completions", body)
    got = await post_stream(http, f"{sc.url}/v1/chat/completions", {"model": vllm.model, **body})
    assert got.text == ref["choices"][0]["message"]["content"]


async def test_stop_inside_merged_event_counts_tokens_exactly(http, vllm, sidecars):
    """vLLM may merge tokens into one stream event; the driver recovers which token completed a stop."""
    from tokenslice_sidecar.driver import _tokens_covering

    ids, texts = await _token_texts(http, vllm, PROMPTS[1], 12)
    context, merged = ids[:4], ids[4:10]
    state = _target(http, vllm)
    for j in range(1, len(merged) + 1):
        chars = len("".join(texts[4:4 + j]))
        if j > 1 and chars == len("".join(texts[4:3 + j])):
            continue  # a token without text cannot be told apart
        assert await _tokens_covering(state, context, merged, chars, vllm.model) == j


def _sample(sc, name: str, **labels: str) -> float:
    return sc.metrics.registry.get_sample_value(name, labels or None) or 0.0


def _target(http, vllm):
    from tokenslice_sidecar.driver import ChunkTarget

    return ChunkTarget(http, vllm.url, f"{vllm.url}/v1/completions", "", TEST_KEY, aiohttp.ClientTimeout(total=30))


def test_no_signing_key_no_start():
    """No silent fallback: without a (strong enough) key the sidecar refuses to start, saying why."""
    import os
    import subprocess
    import sys

    from tokenslice_sidecar.app import SidecarConfig, build_app

    for weak in (b"", b"short"):
        with pytest.raises(contract.ContractError, match=f"at least {contract.MIN_KEY_BYTES}"):
            build_app(SidecarConfig(key=weak))
    env = {k: v for k, v in os.environ.items() if k not in (contract.KEY_ENV, contract.KEY_FILE_ENV)}
    proc = subprocess.run([sys.executable, "-m", "tokenslice", "sidecar", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "no signing key" in proc.stderr
