"""Sending a cut: the signed order that ends one running chunk, POSTed to its worker sidecar.

Fire-and-forget from the dispatcher's point of view: it runs as its own task with a short timeout,
so the event loop never waits on a worker.  The worker answers 200 (cut) or 404 (that chunk is not
running there any more, e.g. it just ended); anything else, or no answer, counts as not cut.
"""

from __future__ import annotations

import aiohttp

from tokenslice import contract


class CutSender:
    def __init__(self, key: bytes, timeout_s: float = 2.0) -> None:
        self.key = key
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, address: str, request_id: str, chunk_index: int, reason: str) -> int | None:
        """POST the cut to ``address``; the HTTP status, or None when the worker could not be reached."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        headers = contract.CutHeaders(request_id, chunk_index, reason).sign(self.key)
        try:
            async with self._session.post(f"http://{address}{contract.CUT_PATH}", headers=headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
