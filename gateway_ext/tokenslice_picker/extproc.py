"""The Envoy ext_proc servicer: one gRPC stream per HTTP request through Envoy.

A *chunk* (signed ``x-tokenslice-role: chunk`` headers from a driver sidecar) waits inside this
call until the dispatcher grants it a slot -- that wait is the preemption -- and holds the slot
until Envoy closes the stream, which with ``response_trailer_mode: SEND`` happens when the
upstream response has ended (the chunk-end signal; see docs/picker.md for its latency).

A *client request* (anything else) is stripped of every internal header, admitted (``admission``),
given signed admission headers (tenant, class, the class's chunk size) and routed to a driver
sidecar without taking a chunk slot.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from tokenslice import contract
from tokenslice.errors import openai_error_bytes
from tokenslice.identity import SOURCE_ADDRESS_ATTRIBUTE, Identity, IdentityError, asked_class
from tokenslice_picker.admission import Admission
from tokenslice_picker.dispatcher import Dispatcher
from tokenslice_picker.flowcontrol.chunk import Chunk, ClientRequest, NoEndpoints, Shed

log = logging.getLogger("tokenslice_picker.extproc")

_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_CONTINUE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
_CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": _CONTINUE_RESPONSE_HEADERS,
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": _CONTINUE_TRAILERS,
}
_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
_DEST = contract.DESTINATION_ENDPOINT
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def _hv(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def immediate(status: int, message: str, code: str, retry_after: float | None = None) -> pb.ProcessingResponse:
    headers = [_hv("content-type", "application/json")]
    if retry_after is not None:
        headers.append(_hv("retry-after", str(max(1, int(retry_after)))))
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=pb.HeaderMutation(set_headers=headers),
        body=openai_error_bytes(status, message, code=code),
        details=code))


def headers_of(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    """Envoy sends lower-case keys, values in ``raw_value`` (bytes) or ``value``."""
    return {h.key: (h.raw_value.decode("latin-1") if h.raw_value else h.value) for h in header_map.headers}


def subset_of(request: pb.ProcessingRequest) -> frozenset[str] | None:
    """The ``envoy.lb.subset_hint`` candidate list, if Envoy forwarded one (list or comma string).

    A hint of any other shape, or with non-string items, is malformed: it yields the empty subset, which
    is refused (503), never ``None`` -- a hint the picker cannot read must not widen the pick to the pool.
    """
    md = request.metadata_context.filter_metadata
    if contract.SUBSET_HINT_NAMESPACE not in md:
        return None
    fields = md[contract.SUBSET_HINT_NAMESPACE].fields
    if contract.SUBSET_HINT_KEY not in fields:
        return None
    value = fields[contract.SUBSET_HINT_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        if any(v.WhichOneof("kind") != "string_value" for v in value.list_value.values):
            return frozenset()
        items = [v.string_value for v in value.list_value.values]
    elif kind == "string_value":
        items = value.string_value.split(",")
    else:
        return frozenset()
    return frozenset(i.strip() for i in items if i.strip())


def peer_of(request: pb.ProcessingRequest) -> str | None:
    """The downstream peer's ``ip:port`` (the ext_proc attribute ``source.address``), if Envoy sent it."""
    attrs = request.attributes.get("envoy.filters.http.ext_proc")
    if attrs is None or SOURCE_ADDRESS_ATTRIBUTE not in attrs.fields:
        return None
    return attrs.fields[SOURCE_ADDRESS_ATTRIBUTE].string_value or None


def duplex_of(first: pb.ProcessingRequest) -> tuple[bool, bool]:
    """(request, response) bodies in FULL_DUPLEX_STREAMED mode, as Envoy's first message says (GIE gateways)."""
    config = first.protocol_config
    return config.request_body_mode == _FULL_DUPLEX, config.response_body_mode == _FULL_DUPLEX


def passthrough(message: pb.ProcessingRequest, duplex: tuple[bool, bool]) -> pb.ProcessingResponse:
    """The "go on unchanged" answer to a message the picker does not act on, in every processing mode.

    Each message needs the answer of its own kind (an empty answer is a protocol error: HTTP 500).  In
    FULL_DUPLEX_STREAMED mode Envoy forwards only the body the processor sends back, so each body piece
    is echoed as a streamed response.
    """
    kind = message.WhichOneof("request")
    if kind in ("request_body", "response_body"):
        body = getattr(message, kind)
        common = pb.CommonResponse()
        if duplex[kind == "response_body"]:
            common.body_mutation.streamed_response.body = body.body
            common.body_mutation.streamed_response.end_of_stream = body.end_of_stream
        return pb.ProcessingResponse(**{kind: pb.BodyResponse(response=common)})
    return _CONTINUE.get(kind, pb.ProcessingResponse())


def _serialize(message: pb.ProcessingResponse | bytes) -> bytes:
    return message if type(message) is bytes else message.SerializeToString()


def _route(address: str, extra: list[base_pb2.HeaderValueOption], remove: list[str]) -> pb.ProcessingResponse:
    md = struct_pb2.Struct()
    md.get_or_create_struct(contract.LB_METADATA_NAMESPACE)[_DEST] = address
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[_hv(_DEST, address), *extra], remove_headers=remove),
            clear_route_cache=True)),
        dynamic_metadata=md)


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, dispatcher: Dispatcher, admission: Admission, key: bytes,
                 identity: Identity | None = None) -> None:
        self.dispatcher = dispatcher
        self.admission = admission
        self.key = key
        self.identity = identity or Identity()
        self.metrics = dispatcher.metrics
        self._seen = contract.SeenSignatures()
        """Chunk signatures already admitted: a replay through the gateway is refused (409)."""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register ``Process`` with a serializer that also passes pre-serialised bytes through."""
        handler = grpc.stream_stream_rpc_method_handler(
            self.Process, request_deserializer=pb.ProcessingRequest.FromString, response_serializer=_serialize)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Process": handler}),))
        # registered methods are matched in C-core, skipping the Python generic-handler lookup per stream
        server.add_registered_method_handlers(SERVICE, {"Process": handler})

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse | bytes]:
        # One flat generator per stream (no nested async generators: this is the per-chunk hot path).
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("request") != "request_headers":  # not configured; let it pass untouched
            yield passthrough(first, duplex_of(first))
            async for message in stream:
                yield passthrough(message, duplex_of(first))
            return
        t0 = time.perf_counter()
        headers = headers_of(first.request_headers.headers)
        if contract.role_of(headers) != contract.ROLE_CHUNK:
            async for response in self._client(first, headers, stream, t0):
                yield response
            return
        # --- a chunk from a driver sidecar ---
        chunk_or_error = self._parse_chunk(first, headers)
        if not isinstance(chunk_or_error, Chunk):
            yield chunk_or_error
            return
        chunk = chunk_or_error
        decided = time.perf_counter()
        try:
            endpoint = await self.dispatcher.acquire(chunk)
        except (Shed, NoEndpoints) as exc:
            yield self._refusal(exc, chunk)
            return
        granted = time.perf_counter()
        produced: int | None = None
        try:
            self.metrics.decision_seconds.observe(self.metrics.decision_series,
                                                 (decided - t0) + (time.perf_counter() - granted))
            # the grant lets a chunk that outlived its signature in the queue run now, and only now
            extra = [_hv(contract.GRANT, contract.grant(headers, self.key))]
            if chunk.waited:
                extra.append(_hv(contract.QUEUE_WAIT_MS, f"{(granted - decided) * 1e3:.3f}"))
            yield _route(endpoint.address, extra, [])
            if log.isEnabledFor(logging.DEBUG):
                log.debug("chunk routed", extra={"request_id": chunk.request_id, "chunk": chunk.index,
                                                 "endpoint": endpoint.address, "migrated": chunk.migrated,
                                                 "wait_ms": round((granted - decided) * 1e3, 3)})
            duplex = duplex_of(first)
            async for message in stream:
                if message.WhichOneof("request") == "response_trailers":
                    value = headers_of(message.response_trailers.trailers).get(contract.CHUNK_TOKENS, "")
                    if value.isdigit():
                        produced = int(value)
                yield passthrough(message, duplex)
        finally:
            # Envoy closed the stream: the upstream response ended (or the client went away).
            self.dispatcher.release(chunk, produced)

    def _refusal(self, exc: Shed | NoEndpoints, target: Chunk | ClientRequest) -> pb.ProcessingResponse:
        """429 for a shed request or chunk, 503 when the pool has no endpoint for it."""
        if isinstance(exc, NoEndpoints):
            self.metrics.rejections.labels("no_endpoints").inc()
            return immediate(503, str(exc), "no_endpoints")
        self.metrics.sheds.labels(exc.reason, target.tenant).inc()
        log.info("shed", extra={"request_id": target.request_id, "reason": exc.reason, "tenant": target.tenant,
                                "chunk": target.index if isinstance(target, Chunk) else None})
        return immediate(429, str(exc), exc.reason, retry_after=1)

    def _parse_chunk(self, first: pb.ProcessingRequest, headers: dict[str, str]) -> Chunk | pb.ProcessingResponse:
        try:
            claimed = contract.ChunkHeaders.verify(headers, self.key)
        except contract.ContractError as exc:
            self.metrics.rejections.labels("forged").inc()
            log.warning("rejected chunk headers", extra={"request_id": headers.get(contract.REQUEST_ID, ""),
                                                         "error": str(exc)})
            return immediate(403, f"untrusted tokenslice headers: {exc}", "forged_internal_header")
        if not self._seen.first_use(headers[contract.SIGNATURE], claimed.expires):
            self.metrics.rejections.labels("replayed").inc()
            log.warning("rejected replayed chunk", extra={"request_id": claimed.request_id,
                                                         "chunk": claimed.chunk_index})
            return immediate(409, "this signed chunk was already admitted", "replayed_chunk")
        hashes = headers.get(contract.PREFIX_HASHES, "") if claimed.chunk_index == 0 else ""
        return Chunk(claimed, subset=subset_of(first), prefix_hashes=contract.decode_prefix_hashes(hashes))

    # --- a client's own request --------------------------------------------------------
    async def _client(self, first: pb.ProcessingRequest, headers: dict[str, str],
                      stream: AsyncIterator[pb.ProcessingRequest], t0: float) -> AsyncIterator[pb.ProcessingResponse]:
        policy = self.dispatcher.policy
        peer = peer_of(first)
        strip = [name for name in headers if contract.is_internal_header(name)]
        strip += [name for name in self.identity.strip(peer) if name in headers]
        try:
            claimed = self.identity.tenant(headers, policy.tenant_header, peer)
        except IdentityError as exc:
            self.metrics.rejections.labels("unauthenticated").inc()
            yield immediate(401, str(exc), "invalid_api_key")
            return
        tenant, pclass = policy.resolve(claimed, asked_class(headers, policy.class_header))
        request_id = uuid.uuid4().hex
        request = ClientRequest(request_id=request_id, tenant=tenant, priority_class=pclass.name,
                                subset=subset_of(first))
        try:
            endpoint = self.admission.admit(request)
        except (Shed, NoEndpoints) as exc:
            yield self._refusal(exc, request)
            return
        try:
            self.metrics.admissions.labels(pclass.name, tenant).inc()
            admit = contract.AdmitHeaders(request_id=request_id, tenant=tenant, priority_class=pclass.name,
                                          chunk_size=self.admission.slice_tokens(pclass),
                                          max_tokens=policy.limits.max_tokens or 0,
                                          max_n=policy.limits.max_n).sign(self.key)
            extra = [_hv(k, v) for k, v in admit.items()]
            # the signed set overwrites; strip only the client's internal headers it does not cover
            remove = [h for h in strip if h not in admit and h != _DEST]
            self.metrics.decision_seconds.observe(self.metrics.decision_series, time.perf_counter() - t0)
            yield _route(endpoint.address, extra, remove)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request admitted", extra={"request_id": request_id, "tenant": tenant,
                                                     "class": pclass.name, "driver": endpoint.address,
                                                     "stripped": strip})
            duplex = duplex_of(first)
            async for message in stream:
                yield passthrough(message, duplex)
        finally:
            self.admission.done(request)
