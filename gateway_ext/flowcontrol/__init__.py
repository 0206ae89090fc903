"""Flow control: which waiting chunk goes next (priority, aging, fair share) and who is shed."""

from gateway_ext.flowcontrol.chunk import Chunk, Shed
from gateway_ext.flowcontrol.fairness import VirtualCounters, jain_index
from gateway_ext.flowcontrol.limits import TenantLimits
from gateway_ext.flowcontrol.queues import FlowQueues

__all__ = ["Chunk", "FlowQueues", "Shed", "TenantLimits", "VirtualCounters", "jain_index"]
