"""The one Envoy configuration builder and launcher, checked against the real Envoy binary."""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from tokenslice import contract, errors
from tokenslice.envoy import (
    EXT_PROC_CLUSTER,
    FAIL_OPEN_CLUSTER,
    POOL_CLUSTER,
    Address,
    ExtProc,
    ProcessingModes,
    Static,
    Timeouts,
    bootstrap_config,
    envoy_binary,
    start_envoy,
)
from tokenslice.procs import free_port, pid_alive

pytestmark = pytest.mark.envoy
HERE = Address("127.0.0.1", 18080)
ADMIN = Address("127.0.0.1", 18081)


def _hcm(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _validate(cfg: dict, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_bootstrap_has_the_protocol_pieces() -> None:
    cfg = bootstrap_config(listen=HERE, admin=ADMIN, upstream=ExtProc("127.0.0.1", 9002))
    assert contract.DESTINATION_ENDPOINT in str(cfg) and "ORIGINAL_DST" in str(cfg)
    ext = _hcm(cfg)["http_filters"][0]["typed_config"]
    mode = ext["processing_mode"]
    assert mode["request_header_mode"] == "SEND" and mode["request_body_mode"] == "NONE"
    assert mode["response_trailer_mode"] == "SEND"  # keeps the stream open until the chunk ends
    assert ext["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
    picker = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == EXT_PROC_CLUSTER)
    assert picker["type"] == "STATIC"
    # bounded unless turned off: nothing may hold a stream forever
    assert (_hcm(cfg)["stream_idle_timeout"], _hcm(cfg)["request_timeout"], _hcm(cfg)["request_headers_timeout"]) \
        == ("300s", "300s", "10s")
    assert _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["idle_timeout"] == "300s"


def test_options_are_rendered_not_patched(tmp_path: Path) -> None:
    upstream = ExtProc("picker.ns.svc", 9002, dns=True, message_timeout_s=30,
                       modes=ProcessingModes(request_body="FULL_DUPLEX_STREAMED", request_trailer="SEND"))
    cfg = bootstrap_config(listen=HERE, admin=ADMIN, upstream=upstream,
                           timeouts=Timeouts(stream_idle_s=300, request_s=0, route_idle_s=60))
    picker = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == EXT_PROC_CLUSTER)
    assert picker["type"] == "STRICT_DNS"
    ext = _hcm(cfg)["http_filters"][0]["typed_config"]
    assert ext["message_timeout"] == "30s"
    assert ext["processing_mode"]["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert _hcm(cfg)["stream_idle_timeout"] == "300s"
    assert _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["idle_timeout"] == "60s"
    _validate(cfg, tmp_path)


def test_fail_open_adds_the_pool_route_and_allows_picker_failure(tmp_path: Path) -> None:
    closed = bootstrap_config(listen=HERE, admin=ADMIN, upstream=ExtProc("127.0.0.1", 9002))
    assert _hcm(closed)["http_filters"][0]["typed_config"]["failure_mode_allow"] is False
    assert len(_hcm(closed)["route_config"]["virtual_hosts"][0]["routes"]) == 1
    # the operator's headless Service of the pool's pods, one entry per target port: resolved by DNS
    upstream = ExtProc("127.0.0.1", 9002, fail_open=("llama-endpoints.serving.svc.cluster.local:8000",
                                                     "llama-endpoints.serving.svc.cluster.local:8002"))
    cfg = bootstrap_config(listen=HERE, admin=ADMIN, upstream=upstream)
    assert _hcm(cfg)["http_filters"][0]["typed_config"]["failure_mode_allow"] is True
    picked, fallback = _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]
    assert picked["route"]["cluster"] == POOL_CLUSTER and "headers" not in picked["match"]  # not a client's word
    assert picked["match"]["dynamic_metadata"][0]["filter"] == contract.LB_METADATA_NAMESPACE
    assert fallback["route"]["cluster"] == FAIL_OPEN_CLUSTER and fallback["match"] == {"prefix": "/"}
    pool = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == FAIL_OPEN_CLUSTER)
    assert pool["type"] == "STRICT_DNS" and pool["lb_policy"] == "ROUND_ROBIN"
    assert [e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in pool["load_assignment"]["endpoints"][0]["lb_endpoints"]] == [8000, 8002]
    _validate(cfg, tmp_path)
    ips = bootstrap_config(listen=HERE, admin=ADMIN, upstream=ExtProc("127.0.0.1", 9002, fail_open=("10.0.0.1:80",)))
    assert next(c for c in ips["static_resources"]["clusters"] if c["name"] == FAIL_OPEN_CLUSTER)["type"] == "STATIC"


@pytest.mark.parametrize("body", ["NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED"])
def test_every_body_mode_is_valid_for_the_real_envoy(body: str, tmp_path: Path) -> None:
    # FULL_DUPLEX_STREAMED needs the trailers sent too, or Envoy rejects the config
    trailer = "SEND" if body == "FULL_DUPLEX_STREAMED" else "SKIP"
    modes = ProcessingModes(request_body=body, request_trailer=trailer)  # type: ignore[arg-type]
    _validate(bootstrap_config(listen=HERE, admin=ADMIN, upstream=ExtProc("127.0.0.1", 9002, modes=modes)),
              tmp_path)


def test_static_round_robin_lists_every_address(tmp_path: Path) -> None:
    cfg = bootstrap_config(listen=HERE, admin=ADMIN, upstream=Static(("127.0.0.1:9001", "127.0.0.1:9002")))
    (pool,) = cfg["static_resources"]["clusters"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in pool["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [9001, 9002] and pool["lb_policy"] == "ROUND_ROBIN"
    assert all(f["name"] != "envoy.filters.http.ext_proc" for f in _hcm(cfg)["http_filters"])
    _validate(cfg, tmp_path)
    with pytest.raises(ValueError):
        Static(())
    with pytest.raises(ValueError):
        bootstrap_config(listen=HERE, admin=ADMIN, upstream=Static(("no-port",)))


async def test_started_envoy_round_robins_and_stops(tmp_path: Path) -> None:
    """The launcher runs the real Envoy with a Static upstream: both upstreams get requests; stop ends it."""
    runners, addresses = [], []
    for name in ("a", "b"):
        async def who(_request: web.Request, name: str = name) -> web.Response:
            return web.Response(text=name)

        app = web.Application()
        app.router.add_get("/who", who)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        addresses.append(f"127.0.0.1:{port}")
    envoy = await start_envoy(Static(tuple(addresses)), workdir=tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            seen = set()
            for _ in range(6):
                async with session.get(envoy.url + "/who") as resp:
                    assert resp.status == 200
                    seen.add(await resp.text())
        assert seen == {"a", "b"}
        assert (tmp_path / "envoy.yaml").exists()
    finally:
        await envoy.stop()
        for runner in runners:
            await runner.cleanup()
    assert not pid_alive(envoy.pid)


async def test_envoys_own_errors_are_openai_json(tmp_path: Path) -> None:
    """A plain-text gateway page used to reach clients: a 500 while the picker is down, a 431, ..."""
    env = await start_envoy(ExtProc("127.0.0.1", free_port()), workdir=tmp_path, name="down")  # no picker there
    try:
        async with aiohttp.ClientSession() as s:
            for headers, status in (({}, 500), ({"x-big": "a" * 100_000}, 431)):
                async with s.post(env.url + "/v1/completions", data=b"{}", headers=headers) as r:
                    assert r.status == status and r.headers["content-type"] == "application/json"
                    err = (await r.json())["error"]
                    assert err["code"] == status and err["type"] == errors.error_type(status) and err["message"]
    finally:
        await env.stop()
