"""The sidecar when things go wrong: upstream down, hung or failing mid-stream, and the client leaving."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tokenslice import contract
from tokenslice.contract import ChunkHeaders

from .conftest import TEST_KEY
from .helpers import CHAT, PROMPTS, post_json, post_stream, sample

pytestmark = pytest.mark.engine


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
    before = sample(sc, "tokenslice_sidecar_cancelled_total")
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
        return sample(sc, "tokenslice_sidecar_cancelled_total") > before

    async def idle():
        return await _running(http, vllm) == 0
    await _wait_for(cancelled, what="the sidecar to notice the disconnect")
    await _wait_for(idle, what="vLLM to abort the in-flight chunk")
    assert sample(sc, "tokenslice_sidecar_inflight_upstream") == 0


async def test_upstream_down_gives_clean_error(http):
    """vLLM on a closed port: a prompt OpenAI error, no hang, both for chat and completions, stream or not."""
    import socket

    from tokenslice_sidecar.app import SidecarConfig, start
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
                                             default_class="batch", failover_retries=0))
    try:
        prompt = " ".join(PROMPTS)  # long enough for prefix-hash blocks
        body = {"model": vllm.model, "prompt": prompt, "max_tokens": 20, "ignore_eos": True,
                "return_token_ids": True}
        s = await post_stream(http, f"http://127.0.0.1:{port}/v1/completions", body)
        assert s.events[-1]["error"]["code"] == 503  # an SSE error event, then [DONE] (checked by post_stream)
        assert len(s.token_ids) == 4 and s.finish_reason is None  # chunk 0 was delivered, nothing claims an end
        first, second = seen[-2], seen[-1]
        tokenized = await post_json(http, f"{vllm.url}/tokenize", {"model": vllm.model, "prompt": prompt})
        n_prompt = len(tokenized["tokens"])
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


async def test_shutdown_ends_generations_with_a_clean_error(http, vllm):
    """A sidecar shutting down mid-generation: its clients get an OpenAI error, not a cut connection.

    A streaming client gets an SSE error event and [DONE] after the tokens it already had; a
    non-streaming one a 503 JSON error.  Without it both would run on until aiohttp's shutdown timeout
    and then be cut off: no error, no [DONE].
    """
    from tokenslice_sidecar.app import SidecarConfig, start

    runner, port = await start(SidecarConfig(vllm_url=vllm.url, chunk_size=8, key=TEST_KEY))
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": vllm.model, "prompt": PROMPTS[1], "max_tokens": 2000, "ignore_eos": True, "temperature": 0}

    async def collect() -> tuple[int, dict]:
        async with http.post(url, json=body) as resp:
            return resp.status, await resp.json()

    quiet = asyncio.create_task(collect())
    events: list = []
    stopping = None
    async with http.post(url, json={**body, "stream": True}) as resp:
        async for line in resp.content:
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 5:
                    stopping = asyncio.create_task(runner.cleanup())  # the pod is being stopped
            elif line.startswith(b"data: [DONE]"):
                events.append("[DONE]")
    await stopping
    status, data = await quiet
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503
    assert all(ch["finish_reason"] is None for e in events[:-2] for ch in e["choices"])
    assert status == 503 and data["error"]["type"] == "ServiceUnavailableError"
