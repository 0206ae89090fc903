"""Whose KV is probably still resident: the picker's model of each engine's prefix cache.

A paused request's KV lives only in vLLM's evictable prefix cache, which drops the least recently
freed blocks first when new work needs room.  The picker sees every chunk start and end on every
endpoint, so it can replay that LRU without asking the engine: running chunks hold their context,
paused (and finished) requests sit in release order, and a request is

* ``RESIDENT`` while the running contexts plus every context released after it plus its own fit in
  the engine's KV capacity (``num_gpu_blocks * block_size`` scraped from ``vllm:cache_config_info``,
  or ``--kv-capacity-tokens``);
* ``OFFLOADED`` while it fits in capacity plus the CPU offload tier (``--kv-offload-tokens``, vLLM's
  ``--kv-offloading-size``): resident but slower -- loaded back instead of recomputed;
* ``EVICTED`` otherwise: its continuation recomputes the whole context.

It is an estimate (block rounding and the prefill of shared prefixes are approximated); it is used
three ways, each of which only reorders or withholds work and never refuses it:

1. ``order``: inside one preemptible class, a resident continuation is ranked as if its tenant had
   been served ``bonus_tokens`` fewer virtual tokens (half that when offloaded).  The lag this lets
   a tenant fall behind is bounded by the bonus, so fair share holds over a longer window while
   the set of requests being rotated through the slots shrinks to what the cache holds (round
   robin over a working set larger than an LRU cache misses every time);
2. ``overflows``: a fair-share cut is not made when the victim's KV would not stay resident once
   its waiter holds the slot (what is paused already does not count: a cut adds nothing to it);
3. ``resident_tokens``: the migration cost model charges only the tokens a move would recompute
   that staying would not.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import Chunk
from tokenslice_picker.scheduling.victims import FAIR_SHARE, Preemption, VictimContext, VictimSelector


class Tier(enum.Enum):
    RESIDENT = "resident"
    OFFLOADED = "offloaded"
    EVICTED = "evicted"


@dataclass(slots=True)
class _Holdings:
    """One endpoint's cache as the picker replays it."""

    running: dict[str, int] = field(default_factory=dict)
    """request id -> context tokens its running chunk holds: prompt + generated + slice (the quantum for a
    long slice), grown by the dispatcher's accrual while a long slice runs (``on_progress``)."""
    paused: OrderedDict[str, int] = field(default_factory=OrderedDict)
    """request id -> context tokens, least recently released first (vLLM's eviction order)."""
    tiers: dict[str, Tier] | None = None
    """Cached answer for the current contents; None = recompute."""


class ResidencyTracker:
    """Replays each endpoint's prefix-cache LRU from the chunks the picker granted and saw end."""

    def __init__(self, *, capacity_tokens: int = 0, offload_tokens: int = 0, block_tokens: int = 16,
                 bonus_tokens: float = 256.0, max_paused: int = 4096, offload_discount: float = 0.5) -> None:
        self.capacity_tokens = capacity_tokens
        """Override of every endpoint's GPU KV capacity in tokens (0: the scraped one)."""
        self.offload_tokens = offload_tokens
        """CPU offload tier per endpoint in tokens (0: none)."""
        self.block_tokens = block_tokens
        self.bonus_tokens = bonus_tokens
        self.max_paused = max_paused
        self.offload_discount = offload_discount
        """The share of an offloaded context a move would waste (the rest is the reload staying costs)."""
        self._by_endpoint: dict[str, _Holdings] = {}

    # --- bookkeeping (the dispatcher calls these) ----------------------------------------
    def on_grant(self, chunk: Chunk, ep: Endpoint) -> None:
        h = self._holdings(ep.address)
        h.paused.pop(chunk.request_id, None)
        h.running[chunk.request_id] = self._blocks(chunk.prompt_tokens + chunk.generated + chunk.slice)
        h.tiers = None

    def on_progress(self, chunk: Chunk, ep: Endpoint, produced: int) -> None:
        """A running long slice has produced about ``produced`` tokens (the dispatcher's accrual): its
        context outgrew the one quantum assumed at grant, and it pushes paused KV out as it grows."""
        h = self._by_endpoint.get(ep.address)
        if h is None or chunk.request_id not in h.running:
            return
        held = self._blocks(chunk.prompt_tokens + chunk.generated + produced)
        if held > h.running[chunk.request_id]:
            h.running[chunk.request_id] = held
            h.tiers = None

    def on_release(self, chunk: Chunk, ep: Endpoint, produced: int | None) -> None:
        h = self._holdings(ep.address)
        h.running.pop(chunk.request_id, None)
        made = chunk.slice if produced is None else produced
        h.paused[chunk.request_id] = self._blocks(chunk.prompt_tokens + chunk.generated + made)
        h.paused.move_to_end(chunk.request_id)
        while len(h.paused) > self.max_paused:
            h.paused.popitem(last=False)
        h.tiers = None

    # --- questions ----------------------------------------------------------------------
    def capacity(self, ep: Endpoint) -> int:
        return self.capacity_tokens or ep.kv_capacity_tokens

    def tier(self, request_id: str, ep: Endpoint) -> Tier | None:
        """Where ``request_id``'s KV probably is on ``ep``; None: unknown (no capacity known, or never there)."""
        capacity = self.capacity(ep)
        h = self._by_endpoint.get(ep.address)
        if not capacity or h is None:
            return None
        if h.tiers is None:
            h.tiers = self._replay(h, capacity)
        return h.tiers.get(request_id)

    def chunk_tier(self, chunk: Chunk, ep: Endpoint | None) -> Tier | None:
        """The tier of a queued continuation's KV on its holder ``ep`` (None for a first chunk or unknown)."""
        if ep is None or chunk.index == 0 or ep.address != chunk.kv_holder:
            return None
        return self.tier(chunk.request_id, ep)

    def resident_tokens(self, chunk: Chunk, ep: Endpoint) -> int | None:
        """Context tokens a move off the holder ``ep`` would recompute that staying would not (None: unknown,
        assume all).  Offloaded KV is resident but slower: loading it back costs something too, so it
        counts ``offload_discount`` of its tokens."""
        tier = self.chunk_tier(chunk, ep)
        if tier is None:
            return None
        context = chunk.prompt_tokens + chunk.generated
        return {Tier.RESIDENT: context, Tier.OFFLOADED: int(context * self.offload_discount)}.get(tier, 0)

    def overflows(self, victim: Chunk, waiter: Chunk) -> bool:
        """Whether ``victim``'s KV would fall out of its endpoint's cache (and offload) if it were paused
        now and ``waiter`` took its slot.

        A paused victim is the most recently released request, evicted last: it stays while the running
        contexts (the waiter's instead of its own) plus its own fit.  Paused and finished requests
        behind it do not count -- a cut adds nothing to them (counting them withheld every fair-share
        cut for good once the requests ever served on an endpoint outgrew its cache).
        """
        ep = victim.granted_on
        if ep is None:
            return False
        capacity = self.capacity(ep)
        h = self._by_endpoint.get(ep.address)
        if not capacity or h is None:
            return False
        # the victim's context moves from running to the MRU end of the paused ones: held either way
        held = sum(h.running.values()) + self._blocks(waiter.prompt_tokens + waiter.generated + waiter.slice)
        return held > capacity + self.offload_tokens

    def order(self, chunks: Iterable[Chunk], *, counter: Callable[[str, str], float],
              pinned: Callable[[Chunk], bool], holder: Callable[[str], Endpoint | None]) -> Iterator[Chunk]:
        """``chunks`` (the queues' dispatch order) with resident continuations moved up inside each class.

        ``pinned`` chunks (non-preemptible classes, aged chunks) keep their place; only runs of
        consecutive chunks of one class are reordered, so class priority is untouched.  Lazy, like the
        queues' own walk: a pinned chunk is yielded before any later run is ranked, so a pass that
        grants an interactive chunk does no ranking work at all (it used to rank the whole queue first).
        """
        run: list[Chunk] = []
        for chunk in chunks:
            if pinned(chunk):
                yield from self._ranked(run, counter, holder)
                run = []
                yield chunk
            elif run and run[0].priority_class != chunk.priority_class:
                yield from self._ranked(run, counter, holder)
                run = [chunk]
            else:
                run.append(chunk)
        yield from self._ranked(run, counter, holder)

    # --- internals ----------------------------------------------------------------------
    def _ranked(self, run: Sequence[Chunk], counter: Callable[[str, str], float],
                holder: Callable[[str], Endpoint | None]) -> list[Chunk]:
        if len(run) < 2:
            return list(run)
        bonus = {Tier.RESIDENT: self.bonus_tokens, Tier.OFFLOADED: self.bonus_tokens / 2}

        def key(chunk: Chunk) -> float:
            tier = self.chunk_tier(chunk, holder(chunk.kv_holder)) if chunk.kv_holder else None
            return counter(chunk.priority_class, chunk.tenant) - bonus.get(tier, 0.0)  # type: ignore[arg-type]
        return sorted(run, key=key)  # stable: equal keys keep the queues' order

    def _holdings(self, address: str) -> _Holdings:
        h = self._by_endpoint.get(address)
        if h is None:
            h = self._by_endpoint[address] = _Holdings()
        return h

    def _blocks(self, tokens: int) -> int:
        b = self.block_tokens
        return -(-max(0, tokens) // b) * b

    def _replay(self, h: _Holdings, capacity: int) -> dict[str, Tier]:
        used = sum(h.running.values())
        tiers = dict.fromkeys(h.running, Tier.RESIDENT)
        for request_id in reversed(h.paused):  # most recently released first: evicted last
            used += h.paused[request_id]
            tiers[request_id] = (Tier.RESIDENT if used <= capacity else
                                 Tier.OFFLOADED if used <= capacity + self.offload_tokens else Tier.EVICTED)
        return tiers


class ResidencyAwareVictims:
    """Wraps a victim selector: no fair-share cut whose victim's KV would fall out of the cache.

    A priority cut (a more important class waits) is always made: interactive latency comes first.
    """

    def __init__(self, inner: VictimSelector, tracker: ResidencyTracker) -> None:
        self.inner = inner
        self.tracker = tracker

    def select(self, waiter: Chunk, running: Sequence[Chunk], ctx: VictimContext) -> Preemption | None:
        offered = list(running)
        while offered:
            choice = self.inner.select(waiter, offered, ctx)
            if choice is None or choice.reason != FAIR_SHARE or not self.tracker.overflows(choice.victim, waiter):
                return choice
            offered.remove(choice.victim)
        return None
