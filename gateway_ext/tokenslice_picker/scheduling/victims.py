"""The preemption plugin slot: which running chunk to revoke so a more important waiter can run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import Chunk


class VictimSelector(Protocol):
    def select(self, waiter: Chunk, running: Sequence[Chunk], endpoints: Sequence[Endpoint]) -> Chunk | None:
        """A running chunk to cut for ``waiter`` (on an endpoint ``waiter`` may use), or None."""
        ...
