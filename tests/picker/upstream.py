"""A small real HTTP upstream for routing/scheduling tests (not a model server).

It records every request it receives (arrival order, headers), streams ``x-tokenslice-slice``
SSE tokens back, can be *blocked* so the chunks it serves hold their slots until the test says
so, and serves a vLLM-style ``/metrics``.  Like a worker sidecar it acts on a signed cut
(``POST contract.CUT_PATH``): the named chunk's response ends at once, with one token.  The
scheduling decisions under test happen in the picker; what an upstream computes does not matter
to them, so a fake engine is the honest choice here (the real vLLM runs in the sidecar and e2e suites).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web

from tokenslice import contract
from tokenslice.procs import free_port


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def tenant(self) -> str:
        return self.headers.get(contract.TENANT, "")

    @property
    def request_id(self) -> str:
        return self.headers.get(contract.REQUEST_ID, "")

    @property
    def slice(self) -> int:
        return int(self.headers.get(contract.SLICE, "0") or 0)


@dataclass
class Upstream:
    address: str = ""
    received: list[Received] = field(default_factory=list)
    metrics_text: str = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0\n"
    _open: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    log: list[tuple[str, Received]] = field(default_factory=list)
    key: bytes = b""
    """The pool's signing key: cuts are verified with it (403 if forged)."""
    cuts: list[contract.CutHeaders] = field(default_factory=list)
    """Cuts acted on (a cut for a chunk not running here is answered 404 and not recorded)."""
    _cut: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._open.set()

    def block(self) -> None:
        """Requests arriving from now on hold (their chunk keeps its slot) until ``unblock``."""
        if self._open.is_set():
            self._open = asyncio.Event()

    def unblock(self) -> None:
        self._open.set()

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post(contract.CUT_PATH, self._on_cut)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self._open.set()
        if self._runner:
            await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text)

    async def _on_cut(self, request: web.Request) -> web.Response:
        try:
            cut = contract.CutHeaders.verify({k.lower(): v for k, v in request.headers.items()}, self.key)
        except contract.ContractError as exc:
            return web.Response(status=403, text=str(exc))
        event = self._cut.get((cut.request_id, str(cut.chunk_index)))
        if event is None or event.is_set():
            return web.Response(status=404, text="not running here")
        self.cuts.append(cut)
        event.set()
        return web.Response(text="cut")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = Received(request.path, {k.lower(): v for k, v in request.headers.items()})
        self.received.append(rec)
        rec.body = await request.read()
        key = (rec.request_id, rec.headers.get(contract.CHUNK_INDEX, ""))
        cut = self._cut[key] = asyncio.Event()
        try:
            if not self._open.is_set():
                waits = [asyncio.ensure_future(self._open.wait()), asyncio.ensure_future(cut.wait())]
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
            tokens = 1 if cut.is_set() else max(1, rec.slice)
            cut.set()  # from here on a cut comes too late (404)
        finally:
            if self._cut.get(key) is cut:
                del self._cut[key]
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", contract.SERVED_BY: self.address})
        await resp.prepare(request)
        for i in range(tokens):
            await resp.write(f"data: {json.dumps({'token': i})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
