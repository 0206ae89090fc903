"""One unit of scheduling: a chunk (or a first chunk) waiting for, or holding, an endpoint slot."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenslice_picker.datastore.endpoints import Endpoint


class Shed(Exception):
    """The chunk is refused (HTTP 429): queue bound, queue TTL, or a tenant limit."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoEndpoints(Exception):
    """Nothing in the pool (or in the Envoy subset hint) can serve this request (HTTP 503)."""


@dataclass(slots=True, eq=False)
class Chunk:
    request_id: str
    tenant: str
    klass: str
    index: int = 0
    kv_holder: str = ""
    prompt_tokens: int = 0
    generated: int = 0
    slice: int = 0
    subset: frozenset[str] | None = None
    prefix_hashes: tuple[str, ...] = ()
    seq: int = 0
    enqueued_at: float = 0.0
    future: asyncio.Future[str] | None = field(default=None, repr=False)
    # set when dispatched
    endpoint: str = ""
    granted_on: Endpoint | None = field(default=None, repr=False)
    dispatched_at: float = 0.0
    migrated: bool = False
    waited: bool = False
    charged_output: int = 0

    @property
    def continuation(self) -> bool:
        return self.index > 0
