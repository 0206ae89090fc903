"""The driver's one client for vLLM and the chunk upstream: every call, timeout and error mapping here.

Three calls reach an engine: ``/tokenize`` (once per request), ``/detokenize`` (only to repair text at
a chunk boundary or to split a merged stream event) and the chunk stream itself, which goes to the
gateway (Envoy) or straight to the local vLLM.  Whatever goes wrong on the wire leaves this module as
an ``UpstreamError`` already shaped as the OpenAI error the client should see, so callers never handle
aiohttp's exception tree themselves.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tokenslice.contract import SERVED_BY
from tokenslice.errors import openai_error
from tokenslice.sse import error_of, sse_json

from .requests import Plan, tokenize_body

CHUNK_PATH = "/v1/completions"
"""Every continuation chunk is a token-id completion; ``VllmClient.chunk_url`` ends with it."""


class UpstreamError(Exception):
    """An upstream failure, already shaped as the OpenAI error the client should see.

    ``fault`` names a failure of the serving side that another try may not meet (the worker, its
    engine or its pod went away: ``unreachable``, ``broken``, ``unavailable``); None for an answer
    that a retry would only repeat (a 4xx, a timeout, an error event of the engine).
    """

    def __init__(self, status: int, body: dict[str, Any], fault: str | None = None) -> None:
        super().__init__(body.get("error", {}).get("message", str(body)))
        self.status = status
        self.body = body
        self.fault = fault

    @classmethod
    def unreachable(cls, what: str, exc: BaseException) -> UpstreamError:
        return cls(502, openai_error(502, f"{what} unreachable: {exc.__class__.__name__}: {exc}",
                                     err_type="ServiceUnavailableError"), "unreachable")

    @classmethod
    def timeout(cls, what: str) -> UpstreamError:
        return cls(504, openai_error(504, f"{what} timed out"))

    @classmethod
    def broken(cls, message: str) -> UpstreamError:
        """A stream that ended in a way no healthy upstream ends it."""
        return cls(502, openai_error(502, message, err_type="UpstreamError"), "broken")


async def error_from_response(resp: aiohttp.ClientResponse, what: str) -> UpstreamError:
    """Keep a JSON OpenAI error from upstream as is; wrap anything else."""
    raw = await resp.read()
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            # 502/503: the worker could not reach its engine, or the gateway had no endpoint for it
            return UpstreamError(resp.status, body, "unavailable" if resp.status in (502, 503) else None)
        if isinstance(body, dict) and "detail" in body:  # FastAPI's own 4xx
            return UpstreamError(resp.status, openai_error(resp.status, str(body["detail"]),
                                                           err_type="BadRequestError"))
    except ValueError:
        pass
    text = raw.decode(errors="replace")[:500]
    return UpstreamError(resp.status, openai_error(resp.status, f"{what} returned HTTP {resp.status}: {text}",
                                                   err_type="UpstreamError"),
                         "unavailable" if resp.status in (502, 503) else None)


@asynccontextmanager
async def _mapped(what: str) -> AsyncIterator[None]:
    """Turn aiohttp's timeouts and connection failures into the client's 504 / 502."""
    try:
        yield
    except TimeoutError:  # first: aiohttp's socket timeouts are connection errors too
        raise UpstreamError.timeout(what) from None
    except aiohttp.ClientConnectionError as exc:
        raise UpstreamError.unreachable(what, exc) from None
    except aiohttp.ClientPayloadError as exc:  # a body cut off mid-way (the sender died)
        raise UpstreamError.broken(f"{what} stream broken: {exc}") from None


class ChunkStream:
    """One chunk's open upstream stream: its events, and which endpoint served it."""

    def __init__(self, lines: AsyncIterable[bytes], served_by: str, close: Callable[[], Awaitable[None]]) -> None:
        self._lines = lines
        self._close = close
        self.served_by = served_by
        """``x-tokenslice-served-by`` of the response (the next chunk's KV holder)."""

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """JSON objects of the SSE stream up to ``[DONE]``; an ``error`` event raises UpstreamError."""
        async with _mapped("chunk upstream"):
            try:
                async for obj in sse_json(self._lines):
                    err = error_of(obj)
                    if err is not None:
                        raise UpstreamError(int(err.get("code") or 500), {"error": err})
                    yield obj
            except ValueError:  # a last line cut off mid-event
                raise UpstreamError.broken("chunk upstream stream broken mid-event") from None

    async def aclose(self) -> None:
        """Drop the connection now: vLLM aborts the request (the portable way to end a generation)."""
        await self._close()


@dataclass(slots=True)
class VllmClient:
    """Where chunks go, which vLLM answers tokenizer calls, and who this sidecar is."""

    session: aiohttp.ClientSession
    vllm_url: str
    chunk_url: str
    """``CHUNK_PATH`` on the gateway, or of the local vLLM when there is no gateway."""
    advertise: str
    key: bytes = field(repr=False)
    timeout: aiohttp.ClientTimeout

    async def tokenize(self, plan: Plan, max_model_len: int | None = None) -> tuple[list[int], int]:
        """Prompt token ids exactly as unchunked vLLM would build them, and the model's context length.

        A token-id prompt needs no call once the context length is known (``max_model_len``).
        """
        if isinstance(plan.prompt, list) and max_model_len:
            return list(plan.prompt), max_model_len
        data = await self._post_json("/tokenize", tokenize_body(plan))
        ids = plan.prompt if isinstance(plan.prompt, list) else data["tokens"]
        return list(ids), int(data["max_model_len"])

    async def detokenize(self, tokens: list[int], model: str | None) -> str:
        body: dict[str, Any] = {"tokens": tokens}
        if model:
            body["model"] = model
        return (await self._post_json("/detokenize", body))["prompt"]

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with _mapped(f"vLLM {path}"), \
                self.session.post(f"{self.vllm_url}{path}", json=body, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise await error_from_response(resp, f"vLLM {path}")
            return await resp.json()

    @asynccontextmanager
    async def stream_chunk(self, body: bytes, headers: dict[str, str]) -> AsyncIterator[ChunkStream]:
        """POST one chunk (its JSON body exactly as signed) and hold its stream open.

        A non-200 answer raises its OpenAI error.
        """
        async with _mapped("chunk upstream"), \
                self.session.post(self.chunk_url, data=body, headers=headers, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise await error_from_response(resp, "chunk upstream")

            async def close() -> None:
                resp.close()

            yield ChunkStream(resp.content, resp.headers.get(SERVED_BY) or self.advertise, close)
