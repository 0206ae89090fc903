"""Flow control: which waiting chunk goes next (priority, aging, fair share) and who is shed."""

from tokenslice_picker.flowcontrol.chunk import Chunk, Shed
from tokenslice_picker.flowcontrol.fairness import VirtualCounters, jain_index
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.flowcontrol.queues import FlowQueues

__all__ = ["Chunk", "FlowQueues", "Shed", "TenantLimits", "VirtualCounters", "jain_index"]
