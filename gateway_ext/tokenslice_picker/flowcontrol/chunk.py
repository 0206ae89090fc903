"""What the picker schedules: a chunk (holds an endpoint slot) and a client request (picks a driver).

A :class:`Chunk` carries the driver's verified claim (:class:`tokenslice.contract.ChunkHeaders`)
as it arrived, plus what the picker decides about it; a :class:`ClientRequest` is a client's own
request, which takes no slot.  Both are refused with :class:`Shed` (429) or :class:`NoEndpoints` (503).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenslice.contract import ChunkHeaders

if TYPE_CHECKING:
    from tokenslice_picker.datastore.endpoints import Endpoint


class Shed(Exception):
    """The chunk or request is refused (HTTP 429): queue bound, queue TTL, or a tenant limit."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoEndpoints(Exception):
    """Nothing in the pool (or in the Envoy subset hint) can serve this request (HTTP 503)."""


@dataclass(slots=True, eq=False)
class ClientRequest:
    """A client's own request: routed to a driver sidecar, takes no chunk slot."""

    request_id: str
    tenant: str
    priority_class: str
    subset: frozenset[str] | None = None


@dataclass(slots=True, eq=False)
class Chunk:
    """One slice of a request waiting for, or holding, an endpoint slot."""

    claim: ChunkHeaders
    """The signed headers as verified; never rewritten (what the driver said)."""
    priority_class: str = ""
    """The class the picker schedules it in: the claimed one, or the lowest after a policy reload removed it."""
    slice: int = 0
    """Output tokens accounted for it: the claimed slice, capped at its class's chunk size."""
    subset: frozenset[str] | None = None
    prefix_hashes: tuple[str, ...] = ()
    seq: int = 0
    born: float = 0.0
    """When the picker first saw its request (orders a tenant's queue: older requests first)."""
    enqueued_at: float = 0.0
    future: asyncio.Future[str] | None = field(default=None, repr=False)
    cutting: Chunk | None = field(default=None, repr=False)
    """While queued: the running chunk cut so that this one gets its slot."""
    # set when dispatched
    endpoint: str = ""
    granted_on: Endpoint | None = field(default=None, repr=False)
    dispatched_at: float = 0.0
    migrated: bool = False
    waited: bool = False
    charged_output: int = 0
    cut_for: Chunk | None = field(default=None, repr=False)
    """While running: the waiter its slot goes to when it ends (it was cut)."""
    cut_reason: str = ""
    cut_at: float = 0.0
    cut_failed: bool = False

    def __post_init__(self) -> None:
        if not self.priority_class:
            self.priority_class = self.claim.priority_class
        if not self.slice:
            self.slice = self.claim.slice

    @property
    def request_id(self) -> str:
        return self.claim.request_id

    @property
    def tenant(self) -> str:
        return self.claim.tenant

    @property
    def index(self) -> int:
        return self.claim.chunk_index

    @property
    def kv_holder(self) -> str:
        return self.claim.kv_holder

    @property
    def prompt_tokens(self) -> int:
        return self.claim.prompt_tokens

    @property
    def generated(self) -> int:
        return self.claim.generated

    @property
    def continuation(self) -> bool:
        return self.claim.chunk_index > 0


def make_chunk(request_id: str, tenant: str, priority_class: str, *, index: int = 0, kv_holder: str = "",
          prompt_tokens: int = 0, generated: int = 0, slice: int = 0, subset: frozenset[str] | None = None,
          prefix_hashes: tuple[str, ...] = ()) -> Chunk:
    """A chunk from claim fields (tests, benchmarks); the ext_proc path builds it from a verified claim."""
    claim = ChunkHeaders(request_id=request_id, chunk_index=index, tenant=tenant, priority_class=priority_class,
                         generated=generated, prompt_tokens=prompt_tokens, slice=slice, kv_holder=kv_holder)
    return Chunk(claim, subset=subset, prefix_hashes=prefix_hashes)
