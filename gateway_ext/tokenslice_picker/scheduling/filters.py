"""Filters narrow the candidate endpoints of one chunk; each is a small named function."""

from __future__ import annotations

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.scheduling.context import PickContext


def subset_hint_filter(ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
    """Honour Envoy's ``envoy.lb.subset_hint``: pick only among the endpoints it names."""
    subset = ctx.chunk.subset
    if subset is None:
        return candidates
    return [e for e in candidates if e.address in subset]


def kv_holder_filter(ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
    """Chunk k+1 goes to the endpoint holding its KV cache while that endpoint is a candidate.

    If the holder's slots are all busy the chunk waits (empty list) -- unless the cost model says
    waiting costs more than recomputing the prefix elsewhere: then it *migrates* to the other
    candidates.  A holder that is no longer a pool member is ignored (the prefix is recomputed).
    """
    holder_addr = ctx.chunk.kv_holder
    if not holder_addr:
        return candidates
    holder = next((e for e in candidates if e.address == holder_addr), None)
    if holder is None:
        return candidates
    if holder.granted < ctx.slots:
        return [holder]
    others = [e for e in candidates if e is not holder and e.granted < ctx.slots]
    if others and ctx.cost_model.should_migrate(
            prompt_tokens=ctx.chunk.prompt_tokens, generated=ctx.chunk.generated,
            ahead=ctx.ahead_on_holder, slots=ctx.slots, mean_chunk_s=holder.mean_chunk_s):
        ctx.migrating = True
        return others
    return []


def free_slot_filter(ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
    """A chunk is dispatched only to an endpoint with a free chunk slot (client requests need none)."""
    if ctx.admission:
        return candidates
    return [e for e in candidates if e.granted < ctx.slots]
