"""Admission: tenant limits, the queue bound, the driver pick, and the slice a request is admitted with."""

from __future__ import annotations

import pytest

from tokenslice.policy import PriorityClass, SchedulingPolicySpec, Tenant
from tokenslice_picker.admission import Admission
from tokenslice_picker.datastore.endpoints import Datastore
from tokenslice_picker.dispatcher import Dispatcher
from tokenslice_picker.flowcontrol.chunk import ClientRequest, NoEndpoints, Shed
from tokenslice_picker.metrics import PickerMetrics
from tokenslice_picker.server import PickerSettings

POLICY = SchedulingPolicySpec(chunk_size=32, priority_classes=[
    PriorityClass(name="chat", priority=10, chunk_size=16), PriorityClass(name="batch", priority=1)],
    tenants=[Tenant(name="t", max_concurrency=1)])


def admission(addresses: list[str], max_slice_tokens: int = 0) -> Admission:
    d = Dispatcher(POLICY, Datastore(addresses), PickerMetrics(), max_slice_tokens=max_slice_tokens)
    return Admission(d.datastore, d.queues, d.ledger, d.limits, d.profile, d.cost_model,
                     max_slice_tokens=max_slice_tokens)


def test_admit_picks_a_driver_and_enforces_tenant_limits():
    adm = admission(["10.0.0.1:80"])
    req = ClientRequest("r1", "t", "batch")
    assert adm.admit(req).address == "10.0.0.1:80"
    with pytest.raises(Shed) as exc:
        adm.admit(ClientRequest("r2", "t", "batch"))
    assert exc.value.reason == "tenant_limit"
    adm.done(req)
    adm.admit(ClientRequest("r3", "t", "batch"))
    with pytest.raises(NoEndpoints):
        admission([]).admit(ClientRequest("r4", "t", "batch"))
    with pytest.raises(NoEndpoints):
        adm.admit(ClientRequest("r5", "u", "batch", subset=frozenset({"10.9.9.9:1"})))


def test_slice_is_the_class_chunk_size_or_the_long_slice():
    classes = {c.name: c for c in POLICY.priority_classes}
    short = admission(["10.0.0.1:80"])
    assert short.slice_tokens(classes["chat"]) == 16 and short.slice_tokens(classes["batch"]) == 32
    long = admission(["10.0.0.1:80"], max_slice_tokens=4096)
    assert long.slice_tokens(classes["chat"]) == 4096 and long.slice_tokens(classes["batch"]) == 4096


def test_the_picker_default_is_long_slices_and_0_is_per_slice():
    """Issue 12: one slice per request unless cut is the default; the class chunk size only with 0."""
    default = PickerSettings(signing_key=b"k" * 32).max_slice_tokens
    classes = {c.name: c for c in POLICY.priority_classes}
    adm = admission(["10.0.0.1:80"], max_slice_tokens=default)
    assert adm.slice_tokens(classes["chat"]) == default and adm.slice_tokens(classes["batch"]) == default
