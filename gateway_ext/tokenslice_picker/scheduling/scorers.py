"""Scorers rate candidate endpoints in [0, 1] (or return None: no information); the profile sums them with weights.

The two affinity scorers learn from what was placed through the lifecycle hooks (``on_grant`` /
``on_done``, after GIE's PreRequest / PostResponse plugins); the profile calls them, nobody else.
"""

from __future__ import annotations

from collections import OrderedDict

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import Chunk, ClientRequest
from tokenslice_picker.scheduling.context import PickContext


def least_load_scorer(ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
    """Fewer granted chunk slots and fewer engine-queued requests score higher."""
    return [1.0 / (1.0 + e.granted + e.waiting) for e in candidates]


def kv_cache_scorer(ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
    """More free KV cache (scraped ``vllm:kv_cache_usage_perc``) scores higher."""
    return [1.0 - min(1.0, max(0.0, e.kv_usage)) for e in candidates]


class PrefixAffinityScorer:
    """Prefix-cache affinity: endpoints that recently served the same leading prompt blocks score higher.

    The driver hashes the prompt's leading token blocks into ``x-tokenslice-prefix-hashes`` on a
    first chunk; the index remembers which endpoints served which block hash (LRU-bounded).  The
    score is the fraction of the chunk's leading blocks found on the endpoint, so a longer shared
    prefix wins.  Without hashes every candidate scores 0 (no information).
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._index: OrderedDict[str, set[str]] = OrderedDict()

    def __call__(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float] | None:
        chunk = ctx.chunk
        hashes = chunk.prefix_hashes if chunk is not None else ()
        if not hashes:
            return None  # no information: skipped
        scores = []
        for e in candidates:
            matched = 0
            for h in hashes:
                holders = self._index.get(h)
                if holders is None or e.address not in holders:
                    break
                matched += 1
            scores.append(matched / len(hashes))
        return scores

    def on_grant(self, target: Chunk | ClientRequest, endpoint: Endpoint) -> None:
        """A first chunk was placed: its leading blocks are now cached on ``endpoint``."""
        if isinstance(target, Chunk) and target.index == 0 and target.prefix_hashes:
            self.record(target.prefix_hashes, endpoint.address)

    def on_done(self, target: Chunk | ClientRequest) -> None:
        """Nothing to forget: the prefix cache outlives the request (the index is LRU-bounded)."""

    def record(self, hashes: tuple[str, ...], address: str) -> None:
        for h in hashes:
            holders = self._index.get(h)
            if holders is None:
                holders = self._index[h] = set()
            else:
                self._index.move_to_end(h)
            holders.add(address)
        while len(self._index) > self.capacity:
            self._index.popitem(last=False)


class DriverAffinityScorer:
    """A first chunk prefers the pod whose driver sidecar runs its request (no hop, warm locality).

    The picker routed the client request to that driver by the same scorers, so this makes
    "the driver sits where the first chunk will likely run" hold by construction.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._drivers: OrderedDict[str, str] = OrderedDict()

    def __call__(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float] | None:
        chunk = ctx.chunk
        if chunk is None or chunk.index != 0:
            return None
        driver = self._drivers.get(chunk.request_id)
        if driver is None:
            return None
        return [1.0 if e.address == driver else 0.0 for e in candidates]

    def on_grant(self, target: Chunk | ClientRequest, endpoint: Endpoint) -> None:
        """A client request was routed to a driver: remember where, for its first chunk."""
        if isinstance(target, ClientRequest):
            self.record(target.request_id, endpoint.address)

    def on_done(self, target: Chunk | ClientRequest) -> None:
        if isinstance(target, ClientRequest):
            self._drivers.pop(target.request_id, None)

    def record(self, request_id: str, address: str) -> None:
        self._drivers[request_id] = address
        if len(self._drivers) > self.capacity:
            self._drivers.popitem(last=False)
