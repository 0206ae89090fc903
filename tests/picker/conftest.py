"""Fixtures of the gateway suite: recording upstreams and polling helpers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.picker.upstream import Upstream


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[int], Awaitable[list[Upstream]]]]:
    started: list[Upstream] = []

    async def make(n: int) -> list[Upstream]:
        ups = [await Upstream().start() for _ in range(n)]
        started.extend(ups)
        return ups

    yield make
    for up in started:
        await up.stop()


async def until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition`` until true or fail after ``timeout_s`` (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
