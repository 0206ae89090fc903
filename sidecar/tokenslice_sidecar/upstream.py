"""Talking to the upstream (vLLM or the gateway): SSE parsing and error mapping."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tokenslice.errors import openai_error
from tokenslice.sse import error_of, sse_json



class UpstreamError(Exception):
    """An upstream failure, already shaped as the OpenAI error the client should see."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", {}).get("message", str(body)))
        self.status = status
        self.body = body

    @classmethod
    def unreachable(cls, what: str, exc: BaseException) -> UpstreamError:
        return cls(502, openai_error(502, f"{what} unreachable: {exc.__class__.__name__}: {exc}",
                                     err_type="ServiceUnavailableError"))

    @classmethod
    def timeout(cls, what: str) -> UpstreamError:
        return cls(504, openai_error(504, f"{what} timed out"))


async def error_from_response(resp: aiohttp.ClientResponse, what: str) -> UpstreamError:
    """Keep a JSON OpenAI error from upstream as is; wrap anything else."""
    raw = await resp.read()
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return UpstreamError(resp.status, body)
        if isinstance(body, dict) and "detail" in body:  # FastAPI's own 4xx
            return UpstreamError(resp.status, openai_error(resp.status, str(body["detail"]), err_type="BadRequestError"))
    except ValueError:
        pass
    text = raw.decode(errors="replace")[:500]
    return UpstreamError(resp.status, openai_error(resp.status, f"{what} returned HTTP {resp.status}: {text}",
                                                   err_type="UpstreamError"))


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """JSON objects of an SSE stream, up to ``[DONE]``; an ``error`` event raises UpstreamError."""
    async for obj in sse_json(resp.content):
        err = error_of(obj)
        if err is not None:
            raise UpstreamError(int(err.get("code") or 500), {"error": err})
        yield obj
