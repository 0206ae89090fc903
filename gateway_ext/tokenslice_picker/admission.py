"""Admission of a client's own request: tenant limits, the queue bound, and the driver it goes to.

A client request takes no chunk slot; it is refused (429) here rather than after its driver has
started, and its driver is chosen by the same profile that places chunks (so its first chunk's
driver-affinity plugin learns where it went).
"""

from __future__ import annotations

from tokenslice.policy import PriorityClass
from tokenslice_picker.datastore.endpoints import Datastore, Endpoint
from tokenslice_picker.flowcontrol.accounting import ServiceLedger
from tokenslice_picker.flowcontrol.chunk import ClientRequest, NoEndpoints, Shed
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.flowcontrol.queues import FlowQueues
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.profile import SchedulerProfile


class Admission:
    def __init__(self, datastore: Datastore, queues: FlowQueues, ledger: ServiceLedger, limits: TenantLimits,
                 profile: SchedulerProfile, cost_model: CostModel, *, max_slice_tokens: int) -> None:
        """``max_slice_tokens``: as ``PickerSettings.max_slice_tokens`` (its one default); 0 = per-slice."""
        self.datastore = datastore
        self.queues = queues
        self.ledger = ledger
        self.limits = limits
        self.profile = profile
        self.cost_model = cost_model
        self.max_slice_tokens = max_slice_tokens

    def admit(self, request: ClientRequest) -> Endpoint:
        """The driver sidecar for ``request``. Raises Shed (429) or NoEndpoints (503)."""
        members = self.datastore.endpoints()
        if not members:
            raise NoEndpoints("no ready endpoint in the pool")
        policy = self.queues.policy
        decision = self.profile.pick(PickContext(request, policy.slots_per_endpoint, self.cost_model), members)
        if decision.endpoint is None:
            raise NoEndpoints("no ready endpoint in the pool")
        bound = policy.queue.max_queued_chunks
        if len(self.queues) >= bound:
            raise Shed("queue_full", f"the picker queue is full ({bound} chunks)")
        cap = policy.queue.max_open_requests
        if self.limits.total_open >= cap:
            raise Shed("overloaded", f"the picker has {cap} open requests")
        why = self.limits.check(policy, request.tenant)
        if why:
            raise Shed("tenant_limit", why)
        self.profile.on_grant(request, decision.endpoint)
        self.limits.opened(request.tenant)
        return decision.endpoint

    def slice_tokens(self, pclass: PriorityClass) -> int:
        """The slice its driver cuts the request into (signed in the admit headers).

        The class's chunk size, or -- with long slices -- ``max_slice_tokens`` if larger: a slice end
        then costs nothing while nobody waits, and a waiter gets its slot by a cut instead.
        """
        return max(self.queues.policy.class_chunk_size(pclass), self.max_slice_tokens)

    def done(self, request: ClientRequest) -> None:
        """The request's response ended (or its client went away)."""
        self.limits.closed(request.tenant)
        self.profile.on_done(request)
        self.ledger.forget(request.request_id)
