"""Revoked slices on the real vLLM: the picker's cut ends a running chunk, the driver continues from the
token ids it got, and the client's output equals the uninterrupted greedy run token for token.

A driver sidecar sends its chunks to a worker sidecar (as the picker would route them) with a slice
larger than the whole request, so every chunk boundary is a cut.  The test plays the picker: it sends
signed cut orders for chunk 0, 1, 2, ... each once its chunk has produced a random (seeded) 1..n
tokens, so the cuts land at arbitrary tokens -- the assertions never depend on where.  Each cut's
answer says how many tokens the chunk had produced, so the test knows every boundary and checks that
cuts really split characters and stop strings.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from tokenslice import contract
from tokenslice.contract import AdmitHeaders, ChunkHeaders, CutHeaders
from tokenslice_sidecar.app import STATE

from .conftest import TEST_KEY, RunningSidecar
from .helpers import CHAT, PROMPTS, greedy, post_json, post_stream, reference, sample

pytestmark = pytest.mark.engine

WHOLE = 100_000
"""An admitted slice larger than any request: the picker admits the whole rest and relies on cuts."""


@dataclass
class Cutter:
    """The picker's side: cut chunk 0, 1, 2, ... of one request, each after a random number of its tokens.

    It watches the worker's running chunks (in-process) so that every cut lands after 1..n tokens of
    its chunk whatever the machine's speed; the cut's answer gives the exact count.
    """

    http: aiohttp.ClientSession
    worker: RunningSidecar
    request_id: str
    rng: random.Random
    max_cuts: int = 12
    tokens: tuple[int, int] = (1, 8)
    cut_tokens: list[int] = field(default_factory=list)

    async def run(self) -> None:
        running = self.worker.app[STATE].running
        index = 0
        while index < self.max_cuts:
            target = self.rng.randint(*self.tokens)
            while (chunk := running.get((self.request_id, index))) is None or chunk.tokens < target:
                await asyncio.sleep(0.002)  # polls in-process state; cancelled when the request ends
            async with self.http.post(f"{self.worker.url}{contract.CUT_PATH}",
                                      headers=CutHeaders(self.request_id, index).sign(TEST_KEY)) as resp:
                if resp.status == 200:
                    self.cut_tokens.append((await resp.json())["tokens"])
                    index += 1
                else:
                    assert resp.status == 404, await resp.text()  # it ended by itself meanwhile

    def boundaries(self) -> list[int]:
        """Token positions where a cut ended a chunk (a cut of 0 tokens repeats a position)."""
        out, at = [], 0
        for n in self.cut_tokens:
            at += n
            out.append(at)
        return out


async def _pair(sidecars):
    """A worker sidecar on the real vLLM, and a driver sidecar whose chunks go to it."""
    worker = await sidecars(16)
    driver = await sidecars(16, chunk_url=worker.url)
    return worker, driver


async def _cut_run(http, driver, worker, path: str, body: dict, stream: bool, seed: int,
                   **cutter) -> tuple[dict, Cutter]:
    """Run ``body`` through the driver while the cutter cuts it; the client's view, normalised."""
    request_id = f"cut-{seed}-{time.monotonic_ns()}"
    admit = AdmitHeaders(request_id, "acme", "batch", chunk_size=WHOLE).sign(TEST_KEY)
    cut = Cutter(http, worker, request_id, random.Random(seed), **cutter)
    task = asyncio.create_task(cut.run())
    try:
        url = f"{driver.url}{path}"
        if stream:
            s = await post_stream(http, url, body, headers=admit)
            got = {"ids": s.token_ids, "text": s.text, "finish": s.finish_reason, "stop": s.stop_reason,
                   "usage": s.usage, "logprobs": s.logprobs}
        else:
            data = await post_json(http, url, body, headers=admit)
            ch = data["choices"][0]
            got = {"ids": ch["token_ids"], "text": ch["message"]["content"] if "message" in ch else ch["text"],
                   "finish": ch["finish_reason"], "stop": ch["stop_reason"], "usage": data["usage"],
                   "logprobs": ch["logprobs"]}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return got, cut


def _expected(ref: dict) -> dict:
    ch = ref["choices"][0]
    return {"ids": ch["token_ids"], "text": ch["message"]["content"] if "message" in ch else ch["text"],
            "finish": ch["finish_reason"], "stop": ch["stop_reason"]}


def _assert_equal(got: dict, ref: dict) -> None:
    exp = _expected(ref)
    assert got["ids"] == exp["ids"]
    assert got["text"] == exp["text"]
    assert (got["finish"], got["stop"]) == (exp["finish"], exp["stop"])
    if got["usage"] is not None:
        assert got["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_cut_chunks_continue_token_for_token(http, vllm, sidecars, endpoint, stream):
    """Both requests run cut and come out exact; each runs again (new seed) until cuts landed.

    A cut order can lose the race with the generation: on a loaded machine vLLM may have streamed the
    rest of a chunk before the order arrives (answered 404, nothing cut).  So the count of cuts that
    landed is a run-until, at most six runs, never a hope; every run must be exact either way.
    """
    worker, driver = await _pair(sidecars)
    before = sample(worker, "tokenslice_sidecar_cuts_total", reason="priority")
    cases = [
        ("/v1/completions", greedy(prompt=PROMPTS[1], max_tokens=160, ignore_eos=True)),
        ("/v1/completions", greedy(prompt=PROMPTS[2], max_tokens=60)),
    ] if endpoint == "completions" else [
        ("/v1/chat/completions", greedy(messages=CHAT[0], max_tokens=160, ignore_eos=True)),
        ("/v1/chat/completions", greedy(messages=CHAT[1], max_tokens=60)),
    ]
    refs: dict[int, dict] = {}
    cut_counts = []
    for attempt in range(6):
        i = attempt % len(cases)
        path, body = cases[i]
        body = {"model": vllm.model, **body}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if i not in refs:
            refs[i] = await reference(http, vllm, path, {k: v for k, v in body.items() if k != "stream_options"})
        got, cut = await _cut_run(http, driver, worker, path, body, stream, seed=100 + attempt)
        _assert_equal(got, refs[i])
        cut_counts.append(len([n for n in cut.cut_tokens if n]))
        if attempt >= len(cases) - 1 and sum(cut_counts) >= 2:
            break
    # the cuts happened, mid-generation: not a vacuous pass
    assert sum(cut_counts) >= 2, cut_counts
    assert sample(worker, "tokenslice_sidecar_cuts_total", reason="priority") > before
    assert sample(driver, "tokenslice_sidecar_slices_cut_total") >= sum(cut_counts)


async def test_cuts_inside_utf8_characters(http, vllm, sidecars):
    """Generation restricted to the byte tokens of multi-byte characters: nearly every cut splits one.

    Runs (streaming and not, alternating) until a cut was seen inside a character, at most eight.
    """
    worker, driver = await _pair(sidecars)
    tok = await post_json(http, f"{vllm.url}/tokenize",
                          {"model": vllm.model, "prompt": "é☃日本語ü", "add_special_tokens": False})
    allowed = sorted(set(tok["tokens"]))
    refs: dict[str, dict] = {}
    split = 0
    for attempt in range(8):
        prompt = ("a", "The", "Numbers")[attempt % 3]
        body = {"model": vllm.model, **greedy(prompt=prompt, max_tokens=96, allowed_token_ids=allowed)}
        if prompt not in refs:
            refs[prompt] = await reference(http, vllm, "/v1/completions", body)
        ref = refs[prompt]
        ids = ref["choices"][0]["token_ids"]
        got, cut = await _cut_run(http, driver, worker, "/v1/completions", body, bool(attempt % 2),
                                  seed=200 + attempt, tokens=(1, 5))
        _assert_equal(got, ref)
        for at in cut.boundaries():
            if 0 < at < len(ids):
                head = (await post_json(http, f"{vllm.url}/detokenize",
                                        {"model": vllm.model, "tokens": ids[:at]}))["prompt"]
                split += head.endswith("\ufffd")
        if split and attempt >= 1:
            break
    assert split >= 1, "no cut landed inside a character"


async def test_stop_string_spanning_a_cut(http, vllm, sidecars):
    """A stop string whose tokens straddle a cut: held back across the cut, matched, cut off exactly.

    Runs (streaming and not, alternating) until a cut was seen inside the stop string, at most eight.
    """
    worker, driver = await _pair(sidecars)
    cases = []
    for prompt in PROMPTS[:4]:
        ref0 = await reference(http, vllm, "/v1/completions",
                               greedy(prompt=prompt, max_tokens=48, ignore_eos=True, logprobs=0))
        texts = ref0["choices"][0]["logprobs"]["tokens"]
        start, end = 12, 28  # a stop string made of tokens 12..27 of the uninterrupted output
        stop = "".join(texts[start:end])
        if "".join(texts).find(stop) != len("".join(texts[:start])) or not stop.strip():
            continue
        body = {"model": vllm.model, **greedy(prompt=prompt, max_tokens=48, ignore_eos=True, stop=[stop])}
        cases.append((body, await reference(http, vllm, "/v1/completions", body), start, end))
    assert len(cases) >= 2
    spanned = 0
    for attempt in range(8):
        body, ref, start, end = cases[attempt % len(cases)]
        got, cut = await _cut_run(http, driver, worker, "/v1/completions", body, bool(attempt % 2),
                                  seed=300 + attempt, tokens=(1, 6))
        _assert_equal(got, ref)
        spanned += any(start < at < end for at in cut.boundaries())
        if spanned and attempt >= 1:
            break
    assert spanned >= 1, "no cut landed inside a stop string"


async def test_cut_with_logprobs(http, vllm, sidecars):
    worker, driver = await _pair(sidecars)
    body = {"model": vllm.model, **greedy(prompt=PROMPTS[3], max_tokens=120, ignore_eos=True, logprobs=2)}
    ref = await reference(http, vllm, "/v1/completions", body)
    got, cut = await _cut_run(http, driver, worker, "/v1/completions", body, False, seed=400)
    _assert_equal(got, ref)
    r = ref["choices"][0]["logprobs"]
    assert got["logprobs"]["tokens"] == r["tokens"] and got["logprobs"]["text_offset"] == r["text_offset"]
    assert got["logprobs"]["token_logprobs"] == pytest.approx(r["token_logprobs"], abs=1e-3)
    assert any(cut.cut_tokens)

    chat = {"model": vllm.model, **greedy(messages=CHAT[2], max_tokens=120, ignore_eos=True, logprobs=True,
                                          top_logprobs=2)}
    ref = await reference(http, vllm, "/v1/chat/completions", chat)
    got, cut = await _cut_run(http, driver, worker, "/v1/chat/completions", chat, True, seed=401)
    _assert_equal(got, ref)
    assert [c["token"] for c in got["logprobs"]] == [c["token"] for c in ref["choices"][0]["logprobs"]["content"]]


# --- the worker's side of the contract ----------------------------------------------------------------------

def _chunk(vllm, request_id: str, prompt: list[int], max_tokens: int) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"model": vllm.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True, "temperature": 0, "return_token_ids": True}).encode()
    headers = ChunkHeaders(request_id=request_id, chunk_index=0, tenant="t", priority_class="batch",
                           prompt_tokens=len(prompt), slice=max_tokens,
                           body_digest=contract.body_digest("/v1/completions", body)).sign(TEST_KEY)
    return body, {**headers, "Content-Type": "application/json"}


async def _raw_chunk(port: int, body: bytes, headers: dict[str, str]) -> tuple[asyncio.StreamReader,
                                                                                asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: worker\r\nContent-Length: {len(body)}\r\n{head}\r\n"
                 .encode() + body)
    await writer.drain()
    return reader, writer


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    """An HTTP/1.1 chunked response's body and trailers (what Envoy hands the picker)."""
    status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    assert headers["transfer-encoding"] == "chunked" and contract.CHUNK_TOKENS in headers["trailer"]
    body = b""
    while size := int((await reader.readline()).strip(), 16):
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    trailers = {}
    while (line := await reader.readline()) != b"\r\n":
        k, v = line.decode().split(":", 1)
        trailers[k.strip().lower()] = v.strip()
    return body, trailers


def _events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]


async def test_worker_cut_ends_chunk_like_a_slice_end_with_the_token_trailer(http, vllm, sidecars):
    worker = await sidecars(16)
    port = int(worker.url.rsplit(":", 1)[1])
    prompt = (await post_json(http, f"{vllm.url}/tokenize", {"model": vllm.model, "prompt": PROMPTS[0]}))["tokens"]

    # uncut: vLLM's own end, and the trailer counts every token
    body, headers = _chunk(vllm, "trailer-1", prompt, 5)
    reader, writer = await _raw_chunk(port, body, headers)
    data, trailers = await _read_chunked(reader)
    writer.close()
    events = _events(data)
    assert trailers[contract.CHUNK_TOKENS] == "5" == str(sum(len(e["choices"][0]["token_ids"]) for e in events))
    assert data.rstrip().endswith(b"data: [DONE]")

    # cut after the first event: a clean slice end, no more tokens, the trailer says how many
    before = sample(worker, "tokenslice_sidecar_cuts_total", reason="fair_share")
    body, headers = _chunk(vllm, "trailer-2", prompt, 3000)
    reader, writer = await _raw_chunk(port, body, headers)
    status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 200")
    while await reader.readline() != b"\r\n":
        pass
    first = b""
    while b"token_ids" not in first:  # the first chunk of body that carries a token
        size = int((await reader.readline()).strip(), 16)
        first += await reader.readexactly(size + 2)
    async with http.post(f"{worker.url}{contract.CUT_PATH}",
                         headers=CutHeaders("trailer-2", 0, "fair_share").sign(TEST_KEY)) as resp:
        assert resp.status == 200
        answer = await resp.json()
    rest = b""
    while size := int((await reader.readline()).strip(), 16):
        rest += await reader.readexactly(size)
        await reader.readexactly(2)
    trailers = {}
    while (line := await reader.readline()) != b"\r\n":
        k, v = line.decode().split(":", 1)
        trailers[k.strip().lower()] = v.strip()
    writer.close()
    events = _events(first + rest)
    produced = sum(len(e["choices"][0].get("token_ids") or []) for e in events)
    assert 1 <= produced < 3000
    assert answer["tokens"] == produced == int(trailers[contract.CHUNK_TOKENS])
    last = events[-1]["choices"][0]
    assert (last["finish_reason"], last["token_ids"], last["text"]) == ("length", [], "")
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert sample(worker, "tokenslice_sidecar_cuts_total", reason="fair_share") == before + 1

    # the chunk is gone: a second order finds nothing
    async with http.post(f"{worker.url}{contract.CUT_PATH}",
                         headers=CutHeaders("trailer-2", 0).sign(TEST_KEY)) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["type"] == "NotFoundError"


async def test_untrusted_cut_orders_are_refused(http, vllm, sidecars):
    worker = await sidecars(16)
    order = CutHeaders("r1", 0)
    cases = {
        "unsigned": {k: v for k, v in order.sign(TEST_KEY).items() if k != contract.SIGNATURE},
        "wrong key": order.sign(b"not-the-key-" * 3),
        "tampered": {**order.sign(TEST_KEY), contract.CHUNK_INDEX: "1"},
        "expired": CutHeaders("r1", 0, expires=int(time.time()) - 1).sign(TEST_KEY),
        "a chunk's headers": ChunkHeaders("r1", 0, "t", "batch").sign(TEST_KEY),
    }
    for name, headers in cases.items():
        async with http.post(f"{worker.url}{contract.CUT_PATH}", headers=headers) as resp:
            assert resp.status == 403, name
            assert (await resp.json())["error"]["type"] == "PermissionDeniedError", name
    async with http.post(f"{worker.url}{contract.CUT_PATH}", headers=order.sign(TEST_KEY)) as resp:
        assert resp.status == 404  # trusted, but nothing of that name runs here


# --- min_tokens across slices -------------------------------------------------------------------------------

async def test_min_tokens_beyond_the_slice(http, vllm, sidecars):
    """min_tokens larger than the slice: each chunk gets what is still owed, capped at its slice."""
    sc = await sidecars(4)
    eos = (await post_json(http, f"{vllm.url}/tokenize", {"model": vllm.model, "prompt": "<|end_of_text|>",
                                                         "add_special_tokens": False}))["tokens"]
    for stream in (False, True):
        # EOS is the argmax from the first token on: only min_tokens keeps the generation going
        body = {"model": vllm.model, **greedy(prompt=PROMPTS[2], max_tokens=30, min_tokens=11,
                                              logit_bias={str(eos[0]): 50})}
        ref = await reference(http, vllm, "/v1/completions", body)
        assert ref["usage"]["completion_tokens"] == 12  # 11 forced, then EOS
        if stream:
            s = await post_stream(http, f"{sc.url}/v1/completions", body)
            got = {"ids": s.token_ids, "text": s.text, "finish": s.finish_reason, "stop": s.stop_reason,
                   "usage": None}
        else:
            data = await post_json(http, f"{sc.url}/v1/completions", body)
            ch = data["choices"][0]
            got = {"ids": ch["token_ids"], "text": ch["text"], "finish": ch["finish_reason"],
                   "stop": ch["stop_reason"], "usage": data["usage"]}
        _assert_equal(got, ref)
