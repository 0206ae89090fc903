"""The virtual token counter (the Jain index is tokenslice.fairness's: tests/bench/test_loadgen.py)."""

from __future__ import annotations

from tokenslice_picker.flowcontrol.fairness import VirtualCounters


def test_vtc_weighted_service_and_no_banked_credit():
    vtc = VirtualCounters()
    served = {"a": 0, "b": 0}
    for _ in range(300):  # both backlogged: always serve the smaller counter, 10 tokens a time
        t = min(("a", "b"), key=lambda t: (vtc.get("c", t), t))
        vtc.charge("c", t, 10, {"a": 2, "b": 1}[t])
        served[t] += 10
    assert abs(served["a"] / served["b"] - 2) < 0.05
    # c was idle the whole time: it returns at the floor of the active tenants, not at 0
    vtc.lift("c", "c", ["a", "b"])
    assert vtc.get("c", "c") == min(vtc.get("c", "a"), vtc.get("c", "b"))

