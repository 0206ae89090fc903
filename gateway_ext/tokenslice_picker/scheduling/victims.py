"""Preemption: which running chunk to revoke so that a more important waiter can run now.

The dispatcher asks the profile's ``VictimSelector`` for a queued chunk that found no slot,
offering only running chunks on endpoints where that waiter could run once the slot frees.  The
picked chunk is cut (``contract.CutHeaders`` to its worker); the worker ends it cleanly with what it
generated, the driver continues it like after any slice end (its KV blocks stay in the prefix
cache), and the freed slot is handed to the waiter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenslice.policy import PriorityClass
from tokenslice_picker.flowcontrol.chunk import Chunk

PRIORITY = "priority"
"""A chunk of a higher class waits."""
FAIR_SHARE = "fair_share"
"""Another tenant of the same class waits, and the victim ran past its class's chunk size (its quantum)."""


@dataclass(frozen=True, slots=True)
class VictimContext:
    """What a selector may consult, besides the waiter and the running chunks."""

    resolve_class: Callable[[str], PriorityClass]
    quantum: Callable[[str], int]
    """The class's chunk size in tokens: the slice each chunk is owed before a fair-share cut."""
    served: Callable[[str, str], float]
    """The (class, tenant) virtual token counter."""
    now: float
    fair_slack: Callable[[str], float] = lambda klass: 0.0
    """How far (virtual cost) the victim's tenant must be ahead of the waiter's before a fair-share cut.

    Hysteresis: with long slices and many slots, tenants' counters cross each other every few quanta, and
    a cut at every crossing is per-slice chunking again, paying a continuation per quantum (the H200
    headline lost 27% of its throughput to 39 cuts/s without it)."""


@dataclass(frozen=True, slots=True)
class Preemption:
    victim: Chunk
    reason: str


class VictimSelector(Protocol):
    def select(self, waiter: Chunk, running: Sequence[Chunk], ctx: VictimContext) -> Preemption | None:
        """A running chunk to cut for ``waiter`` (every one offered may be cut for it), or None."""
        ...


class LowestClassFirst:
    """Never a non-preemptible class; the lowest class first; within it the least work lost.

    * ``priority``: the victim's class has a lower priority than the waiter's, and it was not
      granted by aging (a chunk that waited ``starvationSeconds`` runs its slice as if top
      priority: that is the starvation bound).  Among those, the lowest class, then the chunk that
      ran the shortest time (least progress in its slice).
    * ``fair_share``: same class, another tenant, a long slice (claimed beyond the class's chunk
      size) that ran longer than its quantum (the time its endpoint takes to decode the class's
      chunk size), and its tenant is ahead of the waiter's in the virtual token counter by at least the fair-share slack
      (``VictimContext.fair_slack``).  Among
      those, the one that ran the longest.  A slice of at most the quantum ends by itself soon.
    """

    def select(self, waiter: Chunk, running: Sequence[Chunk], ctx: VictimContext) -> Preemption | None:
        wclass = ctx.resolve_class(waiter.priority_class)
        best: tuple[tuple[int, int, float], Preemption] | None = None
        for v in running:
            vclass = ctx.resolve_class(v.priority_class)
            if not vclass.preemptible or v.granted_on is None:
                continue
            elapsed = ctx.now - v.dispatched_at
            starvation = vclass.starvation_seconds
            aged = starvation is not None and v.dispatched_at - v.enqueued_at >= starvation
            if vclass.priority < wclass.priority and not aged:
                key = (vclass.priority, 0, elapsed)
                reason = PRIORITY
            elif (vclass.name == wclass.name and v.tenant != waiter.tenant
                  and v.claim.slice > ctx.quantum(vclass.name)
                  and elapsed >= v.granted_on.seconds_for(ctx.quantum(vclass.name))
                  and ctx.served(vclass.name, v.tenant) - ctx.served(wclass.name, waiter.tenant)
                  >= ctx.fair_slack(vclass.name)):
                key = (vclass.priority, 1, -elapsed)
                reason = FAIR_SHARE
            else:
                continue
            if best is None or key < best[0]:
                best = (key, Preemption(v, reason))
        return best[1] if best is not None else None
