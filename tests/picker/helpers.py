"""Shared test data of the picker suite."""

from __future__ import annotations

from tokenslice.policy import PriorityClass, SchedulingPolicySpec, Tenant

TWO_CLASSES = SchedulingPolicySpec(
    priority_classes=[PriorityClass(name="hi", priority=10, starvation_seconds=5),
                      PriorityClass(name="lo", priority=1, starvation_seconds=5),
                      PriorityClass(name="rt", priority=5, preemptible=False)],
    tenants=[Tenant(name="a", weight=2), Tenant(name="b", weight=1)])
