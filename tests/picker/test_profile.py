"""The scheduling profile: filters (subset hint first), weighted scorers, the lifecycle plugins."""

from __future__ import annotations

import pytest

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import ClientRequest, NoEndpoints, make_chunk
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.filters import subset_hint_filter
from tokenslice_picker.scheduling.profile import default_profile


def test_subset_filter_runs_in_the_profile_and_an_empty_subset_is_a_refusal():
    a, b, c = Endpoint("10.0.0.1:80"), Endpoint("10.0.0.2:80"), Endpoint("10.0.0.3:80")
    hinted = make_chunk("r", "t", "hi", subset=frozenset({b.address, c.address}))
    assert subset_hint_filter(PickContext(hinted, 8, CostModel()), [a, b, c]) == [b, c]
    prof = default_profile()
    a.granted = 0
    b.granted = c.granted = 7
    assert prof.pick(PickContext(hinted, 8, CostModel()), [a, b, c]).endpoint in (b, c)  # a is idler, not hinted
    b.granted = c.granted = 8
    assert prof.pick(PickContext(hinted, 8, CostModel()), [a, b, c]).endpoint is None  # hinted ones full: wait
    nowhere = make_chunk("r", "t", "hi", subset=frozenset({"10.9.9.9:1"}))
    with pytest.raises(NoEndpoints):
        prof.pick(PickContext(nowhere, 8, CostModel()), [a, b, c])


def test_profile_prefers_prefix_and_low_load():
    a, b = Endpoint("10.0.0.1:80"), Endpoint("10.0.0.2:80", granted=3)
    c = Endpoint("10.0.0.3:80")
    prof = default_profile()
    first = make_chunk("r1", "t", "hi", index=0, prefix_hashes=("h1", "h2"))
    prof.on_grant(first, b)  # the prefix plugin learns where the first chunk's blocks are cached
    warm = make_chunk("r2", "t", "hi", prefix_hashes=("h1", "h2", "h3"))
    assert prof.pick(PickContext(warm, 8, CostModel()), [a, b, c]).endpoint is b  # affinity outweighs load
    b.granted, a.granted = 0, 5
    cold = make_chunk("r3", "t", "hi")
    assert prof.pick(PickContext(cold, 8, CostModel()), [a, b]).endpoint is b  # no affinity: least loaded


def test_driver_affinity_follows_the_admission_hooks():
    a, b = Endpoint("10.0.0.1:80"), Endpoint("10.0.0.2:80")
    prof = default_profile(load_weight=0, prefix_weight=0, kv_cache_weight=0)
    req = ClientRequest("req", "t", "hi")
    prof.on_grant(req, b)  # the client request went to b's driver
    assert prof.pick(PickContext(make_chunk("req", "t", "hi"), 8, CostModel()), [a, b]).endpoint is b
    prof.on_done(req)  # forgotten once the request ended: ties rotate again
    picks = {prof.pick(PickContext(make_chunk("req", "t", "hi"), 8, CostModel()), [a, b]).endpoint.address
             for _ in range(4)}
    assert picks == {a.address, b.address}
