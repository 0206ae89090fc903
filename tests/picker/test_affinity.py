"""The migration cost model and the one wait/holder/migrate rule, as the filter applies it."""

from __future__ import annotations

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import make_chunk
from tokenslice_picker.scheduling.affinity import Verdict, holder_verdict
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.filters import kv_holder_filter


def test_cost_model():
    m = CostModel(prefill_tokens_per_second=1000)
    assert m.recompute_seconds(500, 500) == 1.0
    assert m.expected_wait(ahead=0, slots=4, mean_chunk_s=0.5) == 0.5
    assert m.expected_wait(ahead=9, slots=4, mean_chunk_s=0.5) == 1.5
    assert m.should_migrate(prompt_tokens=100, generated=0, ahead=0, slots=1, mean_chunk_s=0.5)
    assert not m.should_migrate(prompt_tokens=1000, generated=0, ahead=0, slots=1, mean_chunk_s=0.5)


def test_holder_verdict():
    holder = Endpoint("10.0.0.1:80", granted=2, mean_chunk_s=1.0)
    c = make_chunk("r", "a", "hi", index=2, kv_holder=holder.address, prompt_tokens=100)
    assert holder_verdict(c, holder, slots=3, ahead=0, cost_model=CostModel(1.0)) is Verdict.HOLDER
    assert holder_verdict(c, holder, slots=2, ahead=0, cost_model=CostModel(1.0)) is Verdict.WAIT  # 100 s > 1 s
    assert holder_verdict(c, holder, slots=2, ahead=0, cost_model=CostModel(1e6)) is Verdict.MIGRATE
    # many chunks ahead on the holder make waiting longer than a 1 s recompute
    assert holder_verdict(c, holder, slots=2, ahead=400, cost_model=CostModel(100.0)) is Verdict.MIGRATE


def test_kv_holder_filter_waits_or_migrates():
    holder, idle = Endpoint("10.0.0.1:80", granted=2), Endpoint("10.0.0.2:80")
    c = make_chunk("r", "a", "hi", index=2, kv_holder=holder.address, prompt_tokens=100)
    slow = PickContext(c, slots=2, cost_model=CostModel(1.0))
    assert kv_holder_filter(slow, [holder, idle]) == []  # recompute 100 s > wait 1 s: wait
    fast = PickContext(c, slots=2, cost_model=CostModel(1e6))
    assert kv_holder_filter(fast, [holder, idle]) == [idle] and fast.migrating
    idle.granted = 2  # migrating pays, but nowhere has a free slot: wait
    assert kv_holder_filter(PickContext(c, 2, CostModel(1e6)), [holder, idle]) == []
    idle.granted = 0
    holder.granted = 1
    assert kv_holder_filter(slow, [holder, idle]) == [holder]
    gone = make_chunk("r", "a", "hi", index=2, kv_holder="10.9.9.9:1")
    assert kv_holder_filter(PickContext(gone, 2, CostModel()), [holder, idle]) == [holder, idle]
