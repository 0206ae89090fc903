"""What a scheduling plugin may look at for one decision."""

from __future__ import annotations

from dataclasses import dataclass

from tokenslice_picker.flowcontrol.chunk import Chunk
from tokenslice_picker.scheduling.cost_model import CostModel


@dataclass(slots=True)
class PickContext:
    chunk: Chunk
    slots: int
    cost_model: CostModel
    ahead_on_holder: int = 0
    admission: bool = False
    """A client's own request (routed to a driver sidecar; takes no chunk slot)."""
    migrating: bool = False
