"""Filters narrow the candidate endpoints of one chunk; each is a small named function."""

from __future__ import annotations

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import NoEndpoints
from tokenslice_picker.scheduling.affinity import Verdict, holder_verdict
from tokenslice_picker.scheduling.context import PickContext


def subset_hint_filter(ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
    """Honour Envoy's ``envoy.lb.subset_hint``: pick only among the endpoints it names.

    An empty intersection is not a wait but a refusal (503): no slot freeing can help.
    """
    subset = ctx.target.subset
    if subset is None:
        return candidates
    out = [e for e in candidates if e.address in subset]
    if not out:
        raise NoEndpoints("no ready endpoint in the pool matches the subset hint")
    return out


def kv_holder_filter(ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
    """Chunk k+1 goes to the endpoint holding its KV cache while that endpoint is a candidate.

    If the holder's slots are all busy the chunk waits (empty list) -- unless ``holder_verdict``
    says waiting costs more than recomputing the prefix elsewhere: then it *migrates* to the other
    candidates with a free slot.  A holder that is not a candidate is ignored (the prefix is recomputed).
    """
    chunk = ctx.chunk
    if chunk is None or not chunk.kv_holder:
        return candidates
    holder = next((e for e in candidates if e.address == chunk.kv_holder), None)
    if holder is None:
        return candidates
    verdict = holder_verdict(chunk, holder, slots=ctx.slots, ahead=ctx.ahead_on_holder, cost_model=ctx.cost_model,
                             resident_tokens=ctx.resident_tokens)
    if verdict is Verdict.HOLDER:
        return [holder]
    if verdict is Verdict.MIGRATE:
        others = [e for e in candidates if e is not holder and e.granted < ctx.slots]
        if others:
            ctx.migrating = True
            return others
    return []


def free_slot_filter(ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
    """A chunk is dispatched only to an endpoint with a free chunk slot (client requests need none)."""
    if ctx.admission:
        return candidates
    return [e for e in candidates if e.granted < ctx.slots]
