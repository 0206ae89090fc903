"""Flow control: which waiting chunk goes next (priority, aging, fair share), what it is charged, who is shed."""

from tokenslice_picker.flowcontrol.accounting import ServiceLedger
from tokenslice_picker.flowcontrol.chunk import Chunk, ClientRequest, NoEndpoints, Shed
from tokenslice_picker.flowcontrol.fairness import VirtualCounters
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.flowcontrol.queues import FlowQueues

__all__ = ["Chunk", "ClientRequest", "FlowQueues", "NoEndpoints", "ServiceLedger", "Shed", "TenantLimits",
           "VirtualCounters"]
