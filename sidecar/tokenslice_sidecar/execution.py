"""The worker running one chunk on its local vLLM: streamed back, revocable, counted.

A driver's continuation chunk (a streamed token-id completion) is registered by (request id, chunk
index) while it runs, so the picker's signed cut order (``contract.CutHeaders`` at ``CUT_PATH``) can
find it.  A cut closes the vLLM stream -- a client disconnect, the portable cut: vLLM aborts the
request and keeps its full KV blocks in the prefix cache -- and ends the chunk to the driver exactly
like a slice end: a last event with ``finish_reason: "length"`` and no tokens, then ``[DONE]``.  The
driver cannot tell it from a slice whose budget ran out early, and continues from the token ids it
received.  Every chunk's response ends with the ``CHUNK_TOKENS`` trailer (the tokens it forwarded), so
the picker charges what a chunk produced, cut or not.

aiohttp writes no trailers, so this response frames its chunked body itself (``TrailerResponse``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tokenslice import contract
from tokenslice.errors import openai_error

from .metrics import SidecarMetrics

log = logging.getLogger("tokenslice.sidecar.worker")

ChunkKey = tuple[str, int]
"""(request id, chunk index): what a cut order names."""


@dataclass(slots=True)
class RunningChunk:
    """One chunk in flight on this worker."""

    upstream: aiohttp.ClientResponse | None = None
    tokens: int = 0
    """Tokens read from vLLM and forwarded (or being forwarded) to the driver."""
    finished: bool = False
    """vLLM's last event was read: too late to cut."""
    cut_reason: str | None = None

    def cut(self, reason: str) -> None:
        """Revoke the slice: drop the vLLM stream now; the pump ends the response like a slice end."""
        self.cut_reason = reason
        if self.upstream is not None:
            self.upstream.close()


@dataclass(slots=True)
class RunningChunks:
    """The chunks this worker runs now; a chunk leaves as soon as vLLM finished it (or it was cut)."""

    _by_key: dict[ChunkKey, RunningChunk] = field(default_factory=dict)

    def add(self, key: ChunkKey) -> RunningChunk:
        chunk = self._by_key[key] = RunningChunk()
        return chunk

    def get(self, key: ChunkKey) -> RunningChunk | None:
        return self._by_key.get(key)

    def discard(self, key: ChunkKey, chunk: RunningChunk) -> None:
        if self._by_key.get(key) is chunk:
            del self._by_key[key]

    def cut(self, key: ChunkKey, reason: str) -> RunningChunk | None:
        """Cut the chunk if it runs here; None when it does not (never started, finished, already cut)."""
        chunk = self._by_key.get(key)
        if chunk is None or chunk.finished or chunk.cut_reason is not None:
            return None
        chunk.cut(reason)
        return chunk

    def __len__(self) -> int:
        return len(self._by_key)


class TrailerResponse(web.StreamResponse):
    """An HTTP/1.1 chunked response that ends with trailers (aiohttp's own framing cannot send them).

    ``_length_check = False`` (as aiohttp's WebSocketResponse sets it) keeps aiohttp from framing the
    body; ``send`` and ``finish`` write the chunked framing of RFC 9112 section 7.1 themselves.
    """

    _length_check = False

    def __init__(self, headers: dict[str, str], trailers: tuple[str, ...]) -> None:
        super().__init__(headers={**headers, "Transfer-Encoding": "chunked", "Trailer": ", ".join(trailers)})

    async def send(self, data: bytes) -> None:
        if data:
            await self.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def finish(self, trailers: dict[str, str]) -> None:
        fields = b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers.items())
        await self.write(b"0\r\n" + fields + b"\r\n")
        await self.write_eof()


def cuttable(path: str, body: bytes) -> bool:
    """A driver's continuation chunk: a streamed ``/v1/completions`` (only those can be cut cleanly)."""
    if path != "/v1/completions":
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


def _slice_end(last: dict[str, Any] | None) -> bytes:
    """The event a cut chunk ends with: a slice end (``length``) carrying no token."""
    event = {"id": (last or {}).get("id", ""), "object": "text_completion",
             "created": (last or {}).get("created", 0), "model": (last or {}).get("model", ""),
             "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                          "stop_reason": None, "token_ids": []}], "usage": None}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


async def run_chunk(request: web.Request, session: aiohttp.ClientSession, url: str, body: bytes,
                    timeout: aiohttp.ClientTimeout, served_by: str, key: ChunkKey, running: RunningChunks,
                    metrics: SidecarMetrics) -> web.StreamResponse:
    """Stream one cuttable chunk from vLLM to the driver, event by event, with the token-count trailer."""
    chunk = running.add(key)
    resp: TrailerResponse | None = None
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                timeout=timeout) as up:
            if up.status != 200:  # vLLM refused it: its OpenAI error as is
                return web.Response(status=up.status, body=await up.read(),
                                    headers={"Content-Type": up.headers.get("Content-Type", "application/json"),
                                             contract.SERVED_BY: served_by})
            chunk.upstream = up
            if chunk.cut_reason is not None:  # cut before vLLM answered
                up.close()
            resp = TrailerResponse({"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                    contract.SERVED_BY: served_by}, (contract.CHUNK_TOKENS,))
            await resp.prepare(request)
            finished, last = await _pump(up, resp, chunk)
            if not finished and chunk.cut_reason is not None:
                await resp.send(_slice_end(last) + b"data: [DONE]\n\n")
                metrics.cuts.labels(chunk.cut_reason).inc()
                metrics.cut_tokens.observe(chunk.tokens)
                log.info("chunk %s/%d cut (%s) after %d tokens", key[0], key[1], chunk.cut_reason, chunk.tokens)
            await resp.finish({contract.CHUNK_TOKENS: str(chunk.tokens)})
            return resp
    except TimeoutError:  # first: aiohttp's socket timeouts are connection errors too
        status, message = 504, "vLLM timed out"
    except aiohttp.ClientConnectionError as exc:
        status, message = 502, f"vLLM unreachable: {exc.__class__.__name__}: {exc}"
    except aiohttp.ClientPayloadError as exc:  # the engine died mid-stream
        status, message = 502, f"vLLM stream broken: {exc}"
    finally:
        running.discard(key, chunk)
    log.warning("chunk %s/%d failed: %s", key[0], key[1], message)
    if resp is not None:
        await resp.finish({contract.CHUNK_TOKENS: str(chunk.tokens)})  # truncated: the driver sees no finish
        return resp
    return web.json_response(openai_error(status, message, err_type="ServiceUnavailableError"), status=status)


async def _pump(up: aiohttp.ClientResponse, resp: TrailerResponse,
                chunk: RunningChunk) -> tuple[bool, dict[str, Any] | None]:
    """Forward vLLM's SSE lines until its stream ends or is cut; (vLLM finished it, last event)."""
    finished = False
    last: dict[str, Any] | None = None
    try:
        async for line in up.content:
            if line.startswith(b"data: {"):
                last = json.loads(line[6:])
                for choice in last.get("choices") or ():
                    chunk.tokens += len(choice.get("token_ids") or ())
                    finished = finished or choice.get("finish_reason") is not None
                chunk.finished = finished
            await resp.send(line)
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        if chunk.cut_reason is None:
            raise
    return finished, last
