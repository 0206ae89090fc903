"""What a scheduling plugin may look at for one decision."""

from __future__ import annotations

from dataclasses import dataclass

from tokenslice_picker.flowcontrol.chunk import Chunk, ClientRequest
from tokenslice_picker.scheduling.cost_model import CostModel


@dataclass(slots=True)
class PickContext:
    target: Chunk | ClientRequest
    """A chunk (needs a slot) or a client's own request (routed to a driver sidecar; no slot)."""
    slots: int
    """Slots of an endpoint the target's class may fill."""
    cost_model: CostModel
    ahead_on_holder: int = 0
    migrating: bool = False
    resident_tokens: int | None = None
    """Context the chunk's KV holder still caches (``scheduling.residency``); None: unknown, assume all."""

    @property
    def chunk(self) -> Chunk | None:
        return self.target if isinstance(self.target, Chunk) else None

    @property
    def admission(self) -> bool:
        return not isinstance(self.target, Chunk)
