"""Reading OpenAI-style server-sent events: one definition for the sidecar and the load generator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any


async def sse_json(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an SSE stream's ``data:`` lines, up to ``[DONE]`` (not included).

    ``lines`` is e.g. an aiohttp response's ``content``; an event is yielded as soon as its
    line arrives, so callers can time tokens.
    """
    async for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


def error_of(event: dict[str, Any]) -> dict[str, Any] | None:
    """The error object of an SSE ``error`` event (one without choices), else None."""
    if "error" in event and not event.get("choices"):
        err = event["error"]
        return err if isinstance(err, dict) else {"message": str(err)}
    return None
