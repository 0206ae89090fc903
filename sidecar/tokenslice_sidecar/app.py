"""The sidecar's HTTP app: one port, three roles.

* a request with signed chunk headers is a **worker** request: one chunk, forwarded to the
  local vLLM and streamed back with ``x-tokenslice-served-by``;
* ``POST /v1/completions`` / ``/v1/chat/completions`` without them are **driver** requests:
  the client's own request, run as chunks;
* everything else passes through to vLLM unchanged.

Chunk headers that fail verification are refused with 403: they never run as a chunk, and
never as a client request either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tokenslice import contract
from tokenslice.contract import (
    AdmitHeaders,
    ChunkHeaders,
    ContractError,
    CutHeaders,
    SeenSignatures,
    check_key,
)
from tokenslice.errors import openai_error

from .driver import Generation
from .execution import RunningChunks, cuttable, run_chunk
from .metrics import SidecarMetrics
from .openai_stream import ResponseBuilder, sse
from .proxy import forward, forward_headers
from .requests import Endpoint, Plan, RequestError, apply_ceilings, plan
from .vllm import CHUNK_PATH, UpstreamError, VllmClient
from .worker import CHUNK_PATHS, check_chunk

log = logging.getLogger("tokenslice.sidecar")

DRIVER_PATHS: dict[str, Endpoint] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
PASSTHROUGH = frozenset({("GET", "/v1/models"), ("GET", "/health"), ("GET", "/ping"), ("GET", "/version"),
                         ("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/detokenize")})
"""What else passes to vLLM: cheap, generation-free routes (model list, health, metrics, tokenizer)."""


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    vllm_url: str = "http://127.0.0.1:8200"
    chunk_url: str | None = None
    """Base URL of the gateway (Envoy); None sends chunks straight to the local vLLM."""
    chunk_size: int = 32
    """Decode tokens per chunk for requests whose admit headers name no size (or were not admitted)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body read (a bigger one is a 413 JSON error): bounds memory per request."""
    advertise: str = ""
    """``host:port`` this pod is reached at (the KV holder name); empty: the bound address."""
    key: bytes = field(default=b"", repr=False)
    """HMAC key shared with the gateway (at least ``contract.MIN_KEY_BYTES``; there is no default)."""
    default_tenant: str = "default"
    default_class: str = "standard"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 300.0
    """Longest silence tolerated on an upstream stream (a queued chunk waits in the gateway)."""
    failover_retries: int = 3
    """Chunks per request that may fail by a dead worker, engine or pod and be resumed elsewhere."""
    failover_backoff_s: float = 0.5


ClientFactory = Callable[[VllmClient], VllmClient]
"""Given the default client (URLs, key, timeouts), the client a request's driver uses."""


@dataclass(slots=True)
class _State:
    config: SidecarConfig
    key: bytes = field(repr=False)
    metrics: SidecarMetrics
    advertise: str = ""
    seen: SeenSignatures = field(default_factory=SeenSignatures)
    """Chunk signatures this worker already ran (replays are refused)."""
    running: RunningChunks = field(default_factory=RunningChunks)
    """Chunks this worker runs now, for the picker's cut orders."""
    session: aiohttp.ClientSession | None = None
    max_model_len: int | None = None
    """Learnt from the first /tokenize answer."""
    client_factory: ClientFactory | None = None
    generations: set[asyncio.Task[Any]] = field(default_factory=set)
    """Driver handlers generating now: ended with a clean error when the sidecar shuts down."""
    closing: bool = False

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        c = self.config
        return aiohttp.ClientTimeout(total=None, sock_connect=c.connect_timeout_s, sock_read=c.read_timeout_s)

    def client(self) -> VllmClient:
        c = self.config
        base = (c.chunk_url or c.vllm_url).rstrip("/")
        assert self.session is not None
        client = VllmClient(self.session, c.vllm_url.rstrip("/"), f"{base}{CHUNK_PATH}", self.advertise,
                            self.key, self.timeout)
        return self.client_factory(client) if self.client_factory else client


STATE = web.AppKey("tokenslice_sidecar", _State)


UPSTREAM_KEEPALIVE_S = 3.0
"""Idle upstream connections are closed before vLLM's 5 s keep-alive timeout can close them under us."""


def build_app(config: SidecarConfig, metrics: SidecarMetrics | None = None,
              client_factory: ClientFactory | None = None) -> web.Application:
    """The sidecar app; serve it with ``handler_cancellation=True`` so disconnects cancel upstream work.

    ``client_factory`` swaps the driver's vLLM client (``tokenslice bench micro sidecar`` uses it to compare
    HTTP libraries); by default the aiohttp ``VllmClient``.
    """
    key = check_key(config.key)  # no fallback: a random key would refuse every peer's chunk
    state = _State(config, key, metrics or SidecarMetrics(), advertise=config.advertise,
                   client_factory=client_factory)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[STATE] = state

    async def session_ctx(_: web.Application):
        # vLLM's server (uvicorn) drops idle keep-alive connections after 5 s
        # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); pooling one longer races that close and fails the next chunk
        # with ServerDisconnectedError, so idle upstream connections are let go first.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
        state.session = aiohttp.ClientSession(read_bufsize=1 << 20, connector=connector)
        yield
        await state.session.close()

    async def end_generations(_: web.Application) -> None:
        # before aiohttp waits out (then cancels) the handlers: a client mid-generation gets an
        # error event and [DONE] now, not a connection cut after the shutdown timeout
        state.closing = True
        for task in list(state.generations):
            task.cancel()

    app.on_shutdown.append(end_generations)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get(contract.SIDECAR_METRICS_PATH, _metrics)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


def _state(request: web.Request) -> _State:
    return request.app[STATE]


async def _metrics(request: web.Request) -> web.Response:
    body = _state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _error(message: str, status: int, err_type: str = "BadRequestError", param: str | None = None) -> web.Response:
    return web.json_response(openai_error(status, message, err_type=err_type, param=param), status=status)


async def _dispatch(request: web.Request) -> web.StreamResponse:
    try:
        return await _route(request)
    except web.HTTPRequestEntityTooLarge:
        _state(request).metrics.rejected.labels("too_large").inc()
        return _error(f"request body exceeds {_state(request).config.max_body_bytes} bytes", 413,
                      "RequestTooLargeError")


async def _route(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    lower = {k.lower(): v for k, v in request.headers.items()}
    if request.path == contract.CUT_PATH:
        return await _cut(request, st, lower)
    if contract.role_of(lower) == contract.ROLE_CHUNK:
        try:
            chunk = ChunkHeaders.verify(lower, st.key, granted=True)
        except ContractError as exc:
            st.metrics.rejected.labels("bad_chunk_headers").inc()
            log.warning("refused chunk request from %s: %s", request.remote, exc)
            return _error(f"untrusted chunk headers: {exc}", 403, "PermissionDeniedError")
        if request.method != "POST" or request.path not in CHUNK_PATHS:
            return _error("chunks are POST /v1/completions or /v1/chat/completions only", 404, "NotFoundError")
        body = await request.read()
        try:
            check_chunk(chunk, lower[contract.SIGNATURE], request.path, body, st.seen)
        except ContractError as exc:
            st.metrics.rejected.labels("bad_chunk").inc()
            log.warning("refused chunk %s/%d from %s: %s", chunk.request_id, chunk.chunk_index, request.remote, exc)
            return _error(f"untrusted chunk: {exc}", 403, "PermissionDeniedError")
        return await _worker(request, st, chunk, body)
    endpoint = DRIVER_PATHS.get(request.path)
    if endpoint is not None and request.method == "POST":
        return await _driver(request, st, endpoint, lower)
    if (request.method, request.path) not in PASSTHROUGH:
        # vLLM serves more (/v1/responses, /v1/messages, /v1/embeddings, ...): none of it may bypass the picker
        st.metrics.rejected.labels("unscheduled_route").inc()
        return _error(f"{request.method} {request.path} is not served here: tokenslice schedules "
                      f"POST {' and POST '.join(DRIVER_PATHS)}", 404, "NotFoundError")
    st.metrics.requests.labels("other", "passthrough").inc()
    body = await request.read() if request.can_read_body else None
    url = st.config.vllm_url.rstrip("/") + request.raw_path
    return await forward(request, _session(st), url, body, st.timeout, forward_headers(request))


def _session(st: _State) -> aiohttp.ClientSession:
    assert st.session is not None
    return st.session


async def _worker(request: web.Request, st: _State, chunk: ChunkHeaders, body: bytes) -> web.StreamResponse:
    """Run exactly one checked chunk on the local vLLM; the body is forwarded as is.

    A driver's continuation chunk runs revocably (``execution.run_chunk``); anything else (an
    unchunkable request run as one chunk) is a plain stream copy.
    """
    st.metrics.worker_chunks.inc()
    st.metrics.inflight.inc()
    url = st.config.vllm_url.rstrip("/") + request.path
    try:
        if cuttable(request.path, body):
            return await run_chunk(request, _session(st), url, body, st.timeout, st.advertise,
                                   (chunk.request_id, chunk.chunk_index), st.running, st.metrics)
        return await forward(request, _session(st), url, body, st.timeout, {"Content-Type": "application/json"},
                             {contract.SERVED_BY: st.advertise})
    finally:
        st.metrics.inflight.dec()


async def _cut(request: web.Request, st: _State, lower: dict[str, str]) -> web.Response:
    """The picker's signed order to end a running chunk now: 200 cut, 404 not running here, 403 untrusted."""
    if request.method != "POST":
        return _error(f"{contract.CUT_PATH} takes POST", 405, "MethodNotAllowedError")
    try:
        order = CutHeaders.verify(lower, st.key)
    except ContractError as exc:
        st.metrics.rejected.labels("bad_cut_headers").inc()
        log.warning("refused cut order from %s: %s", request.remote, exc)
        return _error(f"untrusted cut order: {exc}", 403, "PermissionDeniedError")
    running = st.running.cut((order.request_id, order.chunk_index), order.reason)
    if running is None:
        return _error(f"chunk {order.chunk_index} of request {order.request_id} is not running here", 404,
                      "NotFoundError")
    return web.json_response({"request_id": order.request_id, "chunk_index": order.chunk_index,
                              "reason": order.reason, "tokens": running.tokens})


async def _driver(request: web.Request, st: _State, endpoint: Endpoint,
                  lower: dict[str, str]) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        st.metrics.rejected.labels("bad_json").inc()
        return _error(f"request body is not valid JSON: {exc}", 400)
    try:
        p = plan(endpoint, body)
    except RequestError as exc:
        st.metrics.rejected.labels("invalid").inc()
        return _error(str(exc), 400, param=exc.param)
    request_id, tenant, klass = uuid.uuid4().hex, st.config.default_tenant, st.config.default_class
    chunk_size = st.config.chunk_size
    if lower.get(contract.ROLE) == contract.ROLE_ADMIT:
        try:
            admit = AdmitHeaders.verify(lower, st.key)
            request_id, tenant, klass = admit.request_id, admit.tenant, admit.priority_class
            chunk_size = admit.chunk_size or chunk_size  # the policy's slice for the class; 0: ours
        except ContractError as exc:
            st.metrics.rejected.labels("bad_admit_headers").inc()
            log.warning("ignoring untrusted admit headers from %s: %s", request.remote, exc)
        else:
            try:
                apply_ceilings(p, admit.max_tokens, admit.max_n)
            except RequestError as exc:
                st.metrics.rejected.labels("over_limit").inc()
                return _error(str(exc), 400, param=exc.param)
    if p.passthrough:
        st.metrics.requests.labels(endpoint, "passthrough").inc()
        st.metrics.passthrough.labels(p.passthrough).inc()
        log.info("running %s request as one chunk: %s", endpoint, p.passthrough)
        if st.config.chunk_url is None:  # no picker to queue it: this vLLM, at once (local mode)
            return await forward(request, _session(st), st.config.vllm_url.rstrip("/") + request.path, raw,
                                 st.timeout, forward_headers(request))
        return await run_one_chunk(request, st, p, request_id, tenant, klass)
    st.metrics.requests.labels(endpoint, "chunked").inc()
    return await run_chunked(request, st, p, request_id, tenant, klass, chunk_size)


async def run_one_chunk(request: web.Request, st: _State, p: Plan, request_id: str, tenant: str,
                        klass: str) -> web.StreamResponse:
    """A request that cannot be time-sliced runs as ONE chunk through the picker: queued, charged, routed.

    Its slice is everything it may generate (``max_tokens`` x ``n``), so the picker charges the tenant
    for it like for any chunk and the worker refuses the body if it asks for more. It is never paused
    (it has no boundary), hence it needs a known ``max_tokens``.
    """
    if p.max_tokens is None:
        return _error(f"max_tokens is required for this request: it cannot be time-sliced ({p.passthrough}), "
                      "so it runs as one chunk whose size must be known", 400, param="max_tokens")
    body = dict(p.body)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = p.max_tokens
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = ChunkHeaders(request_id=request_id, chunk_index=0, tenant=tenant, priority_class=klass,
                           slice=p.max_tokens * p.fanout,
                           body_digest=contract.body_digest(request.path, data)).sign(st.key)
    headers["Content-Type"] = "application/json"
    url = (st.config.chunk_url or "").rstrip("/") + request.path
    st.metrics.chunks.inc()
    return await forward(request, _session(st), url, data, st.timeout, headers)


async def run_chunked(request: web.Request, st: _State, p: Plan, request_id: str, tenant: str, klass: str,
                      chunk_size: int) -> web.StreamResponse:
    """Tokenize once, then stream (or collect) the chunked generation."""
    client = st.client()
    try:
        prompt_ids, max_model_len = await client.tokenize(p, st.max_model_len)
        st.max_model_len = max_model_len
        gen = Generation(client, p, request_id, tenant, klass, chunk_size, prompt_ids, max_model_len, st.metrics,
                         max_failovers=st.config.failover_retries,
                         failover_backoff_s=st.config.failover_backoff_s)
        gen.budget()
    except RequestError as exc:
        st.metrics.rejected.labels("invalid").inc()
        return _error(str(exc), 400, param=exc.param)
    except UpstreamError as exc:
        st.metrics.errors.labels("tokenize").inc()
        return web.json_response(exc.body, status=exc.status)
    out = ResponseBuilder(p, request_id, prompt_ids=prompt_ids)
    stream: web.StreamResponse | None = None
    task = asyncio.current_task()
    assert task is not None
    st.generations.add(task)
    try:
        async with contextlib.aclosing(gen.run()) as deltas:
            async for d in deltas:
                out.model = out.model or gen.model or p.model or ""
                out.system_fingerprint = gen.system_fingerprint
                if not p.stream:
                    out.add(d)
                    continue
                if stream is None:
                    stream = await _open_stream(request, out)
                event = out.event(d)
                if event:
                    await stream.write(event)
    except UpstreamError as exc:
        log.warning("request %s failed after %d chunk(s): %s", request_id, gen.chunks, exc)
        if stream is None:  # nothing sent yet: a plain OpenAI error
            return web.json_response(exc.body, status=exc.status)
        await stream.write(sse(exc.body) + b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream
    except asyncio.CancelledError:
        if not st.closing:
            st.metrics.cancelled.inc()
            log.info("client of request %s went away after %d chunk(s)", request_id, gen.chunks)
            raise
        st.metrics.errors.labels("shutdown").inc()
        log.warning("request %s ended by the sidecar's shutdown after %d chunk(s)", request_id, gen.chunks)
        body = openai_error(503, "the sidecar is shutting down; the request was not finished",
                            err_type="ServiceUnavailableError")
        if stream is None:  # our own cancel (end_generations): answer instead of dropping the client
            return web.json_response(body, status=503)
        await stream.write(sse(body) + b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream
    except ConnectionResetError:
        st.metrics.cancelled.inc()
        log.info("client of request %s went away after %d chunk(s)", request_id, gen.chunks)
        raise
    finally:
        st.generations.discard(task)
    if not p.stream:
        return web.json_response(out.body())
    if stream is None:  # nothing was generated at all
        stream = await _open_stream(request, out)
    await stream.write(out.end_events())
    await stream.write_eof()
    return stream


async def _open_stream(request: web.Request, out: ResponseBuilder) -> web.StreamResponse:
    """Start the client's SSE response: headers, then the events that precede any token."""
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await stream.prepare(request)
    await stream.write(out.start_events())
    return stream


async def start(config: SidecarConfig, host: str = "127.0.0.1", port: int = 0,
                metrics: SidecarMetrics | None = None) -> tuple[web.AppRunner, int]:
    """Serve the sidecar in the running loop (tests, ``tokenslice local``); port 0 picks a free one."""
    app = build_app(config, metrics)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    state = app[STATE]
    state.advertise = state.advertise or f"{host}:{bound}"
    return runner, bound
