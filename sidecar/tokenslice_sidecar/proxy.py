"""Streaming HTTP forwarding to the local vLLM: the worker role and every pass-through endpoint."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from tokenslice.contract import is_internal_header
from tokenslice.errors import openai_error

log = logging.getLogger("tokenslice.sidecar.proxy")

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp recomputes.
_SKIP_REQUEST = frozenset({"host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
                           "transfer-encoding", "upgrade", "content-length"})
_SKIP_RESPONSE = _SKIP_REQUEST | {"server", "date"}  # bodies pass raw: keep content-encoding


def forward_headers(request: web.Request) -> dict[str, str]:
    """Client headers safe to send upstream: no hop-by-hop, never an x-tokenslice-* one."""
    return {k: v for k, v in request.headers.items()
            if k.lower() not in _SKIP_REQUEST and not is_internal_header(k.lower())}


async def forward(request: web.Request, session: aiohttp.ClientSession, url: str, body: bytes | None,
                  timeout: aiohttp.ClientTimeout, headers: dict[str, str],
                  extra_response_headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Send ``body`` upstream and stream the answer back byte for byte, as it arrives."""
    resp: web.StreamResponse | None = None
    try:
        async with session.request(request.method, url, data=body, headers=headers, timeout=timeout,
                                   auto_decompress=False) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():  # internal headers (a worker's served-by) never reach a client
                if k.lower() not in _SKIP_RESPONSE and not is_internal_header(k.lower()):
                    resp.headers.add(k, v)
            if extra_response_headers:
                resp.headers.update(extra_response_headers)
            if up.content_length is not None and request.method != "HEAD":
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp
    except TimeoutError:  # first: aiohttp's socket timeouts are connection errors too
        status, message = 504, "vLLM timed out"
    except aiohttp.ClientConnectionError as exc:
        status, message = 502, f"vLLM unreachable: {exc.__class__.__name__}: {exc}"
    log.warning("forward %s %s failed: %s", request.method, url, message)
    if resp is not None and resp.prepared:
        return resp  # already streaming: the truncated body is the error signal
    return web.json_response(openai_error(status, message, err_type="ServiceUnavailableError"), status=status)
