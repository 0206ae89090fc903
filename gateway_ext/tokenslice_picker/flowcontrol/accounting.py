"""What each tenant was served: the fair-share charge, its corrections, and who is active.

One home for the currency the picker shares.  Granting a chunk charges its (class, tenant) virtual
token counter ``(fairness.input x prefill tokens + fairness.output x slice) / weight``; prefill
tokens are the prompt for chunk 0, the whole prefix after a migration, and 0 for a continuation
that hits its KV cache.  The output part is an estimate (the slice) until the truth arrives -- the
next chunk's signed ``generated`` or the worker's ``x-tokenslice-chunk-tokens`` trailer -- and is
then *corrected* through the per-request ledger.

A tenant is *active* in a class while it has a chunk running there or ended one within
``idle_grace_s`` (the gap between a chunk's end and the driver's next chunk is not idleness); the
queues lift a tenant that comes back from idle to the floor of the active ones.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenslice.fairness import jain_index
from tokenslice.policy import SchedulingPolicySpec
from tokenslice_picker.flowcontrol.chunk import Chunk
from tokenslice_picker.flowcontrol.fairness import ServiceWindow, VirtualCounters
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.metrics import PickerMetrics


@dataclass(slots=True)
class _Entry:
    """What the last chunk of a request was charged, to correct it when the truth arrives."""

    priority_class: str
    tenant: str
    generated: int
    charged_output: int
    address: str = ""
    born: float = 0.0
    """When the request's first chunk was granted (a tenant's older requests go first)."""
    seconds: float = 0.0
    """Grant to end (0 while it runs)."""
    cut: bool = False
    settled: bool = False
    """What it produced is known (the trailer came, or the next chunk did)."""


@dataclass(frozen=True, slots=True)
class Settled:
    """A chunk's output became known: what it produced, where, in how long, and whether it was cut."""

    address: str
    produced: int
    seconds: float
    cut: bool


class ServiceLedger:
    def __init__(self, policy: SchedulingPolicySpec, limits: TenantLimits, metrics: PickerMetrics, *,
                 idle_grace_s: float = 2.0, ledger_size: int = 100_000) -> None:
        self.policy = policy
        self.limits = limits
        self.metrics = metrics
        self.idle_grace_s = idle_grace_s
        self.counters = VirtualCounters()
        self.window = ServiceWindow()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._ledger_size = ledger_size
        self._inflight: dict[tuple[str, str], int] = {}
        self._last_active: dict[tuple[str, str], float] = {}

    def set_policy(self, policy: SchedulingPolicySpec) -> None:
        self.policy = policy

    def weight(self, tenant: str) -> float:
        t = self.policy.tenant(tenant)
        return t.weight if t else 1.0

    # --- charging ------------------------------------------------------------------------
    def charge_grant(self, chunk: Chunk, address: str, now: float) -> None:
        """A chunk was granted a slot on ``address``: charge it, mark its tenant active."""
        key = (chunk.priority_class, chunk.tenant)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        self._last_active[key] = now
        fairness = self.policy.fairness
        recompute = chunk.index == 0 or chunk.kv_holder != address
        input_tokens = (chunk.prompt_tokens + (chunk.generated if chunk.index else 0)) if recompute else 0
        chunk.charged_output = chunk.slice
        self.counters.charge(chunk.priority_class, chunk.tenant,
                             fairness.input * input_tokens + fairness.output * chunk.slice, self.weight(chunk.tenant))
        self.limits.spend(self.policy.tenant(chunk.tenant), input_tokens + chunk.slice, now)
        self.window.add(chunk.tenant, chunk.slice, now)
        self.metrics.tokens_served.inc((chunk.tenant,), chunk.slice)
        prev = self._entries.get(chunk.request_id)
        born = prev.born if prev is not None else (chunk.born or now)
        self._entries[chunk.request_id] = _Entry(chunk.priority_class, chunk.tenant, chunk.generated, chunk.slice,
                                                 address, born)
        if len(self._entries) > self._ledger_size:
            self._entries.popitem(last=False)

    def reconcile(self, chunk: Chunk) -> Settled | None:
        """A continuation arrived: its signed ``generated`` tells what the previous chunk produced."""
        if chunk.index == 0:
            return None
        entry = self._entries.get(chunk.request_id)
        if entry is None:
            return None
        produced = chunk.generated - entry.generated
        if produced < 0:
            return None
        if produced != entry.charged_output:
            self._correct(entry.priority_class, entry.tenant, produced - entry.charged_output)
            entry.charged_output = produced
        if entry.settled or not entry.seconds:
            return None
        entry.settled = True
        return Settled(entry.address, produced, entry.seconds, entry.cut)

    def charge_end(self, chunk: Chunk, produced: int | None, now: float, *, cut: bool = False) -> Settled | None:
        """A chunk ended (``cut``: by a preemption); ``produced`` is the worker's token count if it sent one."""
        key = (chunk.priority_class, chunk.tenant)
        n = self._inflight.get(key, 1) - 1
        if n > 0:
            self._inflight[key] = n
        else:
            self._inflight.pop(key, None)
        self._last_active[key] = now
        entry = self._entries.get(chunk.request_id)
        if entry is not None:
            entry.seconds = max(1e-9, now - chunk.dispatched_at)
            entry.cut = cut
        if produced is None:
            return None
        if produced != chunk.charged_output:
            self._correct(chunk.priority_class, chunk.tenant, produced - chunk.charged_output)
            chunk.charged_output = produced
        if entry is None:
            return None
        entry.charged_output = produced
        entry.settled = True
        return Settled(entry.address, produced, entry.seconds, cut)

    def accrue(self, chunk: Chunk, produced: int) -> None:
        """A running chunk has produced about ``produced`` tokens so far: charge what its charge lacks.

        A long slice is charged one quantum at grant and the truth only at its end, so without this
        the counters lag by whole requests and the queues order (and the victim selector weighs)
        tenants by stale service.  Only ever raises the charge; the end's truth corrects either way.
        """
        if produced <= chunk.charged_output:
            return
        self._correct(chunk.priority_class, chunk.tenant, produced - chunk.charged_output)
        chunk.charged_output = produced
        entry = self._entries.get(chunk.request_id)
        if entry is not None and not entry.settled:
            entry.charged_output = produced

    def born(self, request_id: str) -> float | None:
        """When the request's first chunk was granted, if the ledger still knows the request."""
        entry = self._entries.get(request_id)
        return entry.born if entry is not None else None

    def forget(self, request_id: str) -> None:
        """The request is over: nothing will correct its charge any more."""
        self._entries.pop(request_id, None)

    def _correct(self, priority_class: str, tenant: str, delta_output: int) -> None:
        self.counters.charge(priority_class, tenant, self.policy.fairness.output * delta_output, self.weight(tenant))
        self.metrics.tokens_served.inc((tenant,), delta_output)
        self.window.add(tenant, delta_output)

    # --- activity ----------------------------------------------------------------------
    def active_tenants(self, priority_class: str, now: float) -> set[str]:
        """Tenants running a chunk of the class, or that ended one within the idle grace."""
        active = {t for (k, t), n in self._inflight.items() if k == priority_class and n > 0}
        active.update(t for (k, t), at in self._last_active.items()
                      if k == priority_class and now - at < self.idle_grace_s)
        return active

    def jain(self) -> float:
        """Jain index of weight-normalised tokens served per tenant over the service window."""
        return jain_index(v / self.weight(t) for t, v in self.window.per_tenant().items())
