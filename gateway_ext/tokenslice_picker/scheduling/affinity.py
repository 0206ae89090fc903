"""The one migration rule: a paused chunk waits for its KV holder, runs there, or moves.

Used by ``kv_holder_filter`` (placement) and by the dispatch pass (to skip, cheaply, a chunk that
must wait for its busy holder), so both always agree.
"""

from __future__ import annotations

import enum

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import Chunk
from tokenslice_picker.scheduling.cost_model import CostModel


class Verdict(enum.Enum):
    HOLDER = "holder"
    """The holder has a free slot: run there (its KV cache is warm)."""
    WAIT = "wait"
    """The holder is full and recomputing elsewhere would cost more than waiting."""
    MIGRATE = "migrate"
    """The holder is full and waiting would cost more than recomputing the prefix elsewhere."""


def holder_verdict(chunk: Chunk, holder: Endpoint, *, slots: int, ahead: int, cost_model: CostModel,
                   resident_tokens: int | None = None) -> Verdict:
    """Decide for a chunk whose KV ``holder`` is a candidate; ``ahead`` = queued chunks before it bound there;
    ``resident_tokens`` = context the holder still caches (None: assume all; ``scheduling.residency``)."""
    if holder.granted < slots:
        return Verdict.HOLDER
    if cost_model.should_migrate(prompt_tokens=chunk.prompt_tokens, generated=chunk.generated, ahead=ahead,
                                 slots=slots, mean_chunk_s=holder.mean_chunk_s, resident_tokens=resident_tokens):
        return Verdict.MIGRATE
    return Verdict.WAIT
