"""Sidecars served in-process (real aiohttp servers on free ports) in front of the shared real vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from tokenslice_sidecar.app import SidecarConfig, start
from tokenslice_sidecar.metrics import SidecarMetrics

TEST_KEY = b"sidecar-test-key-" * 2


class RunningSidecar:
    def __init__(self, url: str, metrics: SidecarMetrics, config: SidecarConfig, app: web.Application) -> None:
        self.url = url
        self.metrics = metrics
        self.config = config
        self.app = app


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # vLLM closes idle keep-alive connections after 5 s: let ours go first (else a reused one can be
    # closed under a request: ServerDisconnectedError), as the sidecar does
    connector = aiohttp.TCPConnector(keepalive_timeout=3.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120), connector=connector) as session:
        yield session


@pytest.fixture(scope="session")
async def sidecars(vllm) -> AsyncIterator[Callable[..., Awaitable[RunningSidecar]]]:
    """``await sidecars(chunk_size=7)``: a sidecar per distinct configuration, started once per session."""
    runners = []
    cache: dict[tuple, RunningSidecar] = {}

    async def get(chunk_size: int = 16, **overrides) -> RunningSidecar:
        key = (chunk_size, tuple(sorted(overrides.items())))
        if key not in cache:
            fields = dict(vllm_url=vllm.url, chunk_size=chunk_size, key=TEST_KEY)
            fields.update(overrides)
            config = SidecarConfig(**fields)
            metrics = SidecarMetrics()
            runner, port = await start(config, metrics=metrics)
            runners.append(runner)
            cache[key] = RunningSidecar(f"http://127.0.0.1:{port}", metrics, config, runner.app)
        return cache[key]

    yield get
    for runner in runners:
        await runner.cleanup()
