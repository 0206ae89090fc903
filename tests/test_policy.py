"""The SchedulingPolicy schema: defaults, cross-field checks and the class-resolution rule."""

import pytest
from pydantic import ValidationError

from tokenslice.policy import SchedulingPolicySpec, load_policy

POLICY = {
    "chunkSize": 32,
    "priorityClasses": [
        {"name": "interactive", "priority": 1000, "preemptible": False, "chunkSize": 16},
        {"name": "standard", "priority": 100},
        {"name": "batch", "priority": 10, "starvationSeconds": 60},
    ],
    "tenants": [
        {"name": "web", "weight": 1, "allowedClasses": ["interactive", "standard"], "defaultClass": "standard"},
        {"name": "batch-a", "weight": 2, "allowedClasses": ["batch"]},
        {"name": "default", "allowedClasses": ["standard", "batch"], "defaultClass": "standard"},
    ],
}


def spec(**over):
    return SchedulingPolicySpec.model_validate({**POLICY, **over})


def test_camel_case_on_the_wire_and_defaults():
    p = spec()
    assert p.klass("interactive").chunk_size == 16 and p.klass("standard").chunk_size is None
    assert p.fairness.input == 1.0 and p.fairness.output == 2.0
    dumped = p.model_dump(by_alias=True, exclude_none=True)
    assert dumped["priorityClasses"][0]["chunkSize"] == 16 and "tenantHeader" in dumped


def test_resolve_never_escalates():
    p = spec()
    assert p.resolve("web", None)[1].name == "standard"
    assert p.resolve("web", "interactive")[1].name == "interactive"
    assert p.resolve("web", "batch")[1].name == "batch"              # lower is allowed
    assert p.resolve("batch-a", "interactive")[1].name == "batch"    # higher is clamped to the default
    assert p.resolve("nobody", "interactive") == ("default", p.klass("standard"))
    assert p.resolve(None, "no-such-class")[1].name == "standard"


def test_no_class_outside_the_allowed_list_at_or_near_the_ceiling():
    """Equal priority is no licence: another class at the ceiling may be non-preemptible or differently sliced."""
    p = SchedulingPolicySpec.model_validate({
        "reservedSlotsPerEndpoint": 1,
        "priorityClasses": [{"name": "standard", "priority": 100},
                            {"name": "premium", "priority": 100, "preemptible": False},
                            {"name": "held", "priority": 50, "preemptible": False},
                            {"name": "batch", "priority": 10}],
        "tenants": [{"name": "t", "allowedClasses": ["standard"]}]})
    assert p.resolve("t", "premium")[1].name == "standard"  # same priority, outside the list
    assert p.resolve("t", "held")[1].name == "standard"     # lower, but would escape preemption
    assert p.resolve("t", "batch")[1].name == "batch"       # lower and preemptible: nothing gained
    assert p.resolve("t", "standard")[1].name == "standard"


@pytest.mark.parametrize("over,msg", [
    ({"priorityClasses": [{"name": "a", "priority": 1}, {"name": "a", "priority": 2}]}, "duplicate priority classes"),
    ({"tenants": [{"name": "t"}, {"name": "t"}]}, "duplicate tenants"),
    ({"tenants": [{"name": "t", "allowedClasses": ["gold"]}]}, "unknown class 'gold'"),
    ({"defaultClass": "gold"}, "defaultClass 'gold'"),
    ({"chunkSize": 0}, "greater than or equal to 1"),
    ({"priorityClasses": [{"name": "Bad_Name", "priority": 1}]}, "pattern"),
    ({"unknownField": 1}, "Extra inputs"),
    ({"tenants": [{"name": "t", "allowedClasses": []}]}, "empty allowedClasses"),  # resolving it crashed (500)
])
def test_invalid_policies_are_rejected_with_reasons(over, msg):
    with pytest.raises(ValidationError, match=msg):
        spec(**over)


def test_load_policy_accepts_bare_spec_or_whole_object(tmp_path):
    import yaml
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(POLICY))
    whole = tmp_path / "whole.yaml"
    whole.write_text(yaml.safe_dump({"apiVersion": "tokenslice.io/v1alpha1", "kind": "SchedulingPolicy",
                                     "metadata": {"name": "p"}, "spec": POLICY}))
    assert load_policy(bare) == load_policy(whole)


def test_reserved_slots_and_class_chunk_size():
    p = spec(slotsPerEndpoint=8, reservedSlotsPerEndpoint=2)
    assert p.reserved_slots_per_endpoint == 2
    assert p.class_slots(p.klass("interactive")) == 8  # non-preemptible: may use the reserve
    assert p.class_slots(p.klass("standard")) == 6
    assert p.class_chunk_size(p.klass("interactive")) == 16 and p.class_chunk_size(p.klass("batch")) == 32
    assert spec().reserved_slots_per_endpoint == 0 and spec().class_slots(spec().klass("batch")) == 8
    with pytest.raises(ValidationError, match=r"reservedSlotsPerEndpoint \(8\) must be less than slotsPerEndpoint"):
        spec(slotsPerEndpoint=8, reservedSlotsPerEndpoint=8)
    with pytest.raises(ValidationError, match="every priority class is preemptible"):
        spec(reservedSlotsPerEndpoint=1, priorityClasses=[{"name": "standard", "priority": 1}], tenants=[])
