"""ServiceLedger: the fair-share charge, its corrections, tenant activity."""

from __future__ import annotations

import pytest

from tests.picker.helpers import TWO_CLASSES
from tokenslice.policy import FairnessWeights
from tokenslice_picker.flowcontrol.accounting import ServiceLedger
from tokenslice_picker.flowcontrol.chunk import make_chunk
from tokenslice_picker.flowcontrol.limits import TenantLimits
from tokenslice_picker.metrics import PickerMetrics

HOLDER = "10.0.0.1:80"


def ledger(**kw: object) -> ServiceLedger:
    policy = TWO_CLASSES.model_copy(update={"fairness": FairnessWeights(input=1, output=2)})
    return ServiceLedger(policy, TenantLimits(), PickerMetrics(), **kw)  # type: ignore[arg-type]


def test_charge_is_prefill_plus_output_over_weight():
    led = ledger()
    led.charge_grant(make_chunk("r", "a", "hi", index=0, prompt_tokens=100, slice=10), HOLDER, now=0)
    assert led.counters.get("hi", "a") == pytest.approx((100 + 2 * 10) / 2)  # a has weight 2
    # a continuation on its KV holder recomputes nothing; one that moved pays the whole prefix again
    led.charge_grant(make_chunk("r", "a", "hi", index=1, prompt_tokens=100, generated=10, slice=10,
                           kv_holder=HOLDER), HOLDER, now=0)
    assert led.counters.get("hi", "a") == pytest.approx(60 + 20 / 2)
    led.charge_grant(make_chunk("r", "a", "hi", index=2, prompt_tokens=100, generated=20, slice=10,
                           kv_holder=HOLDER), "10.0.0.2:80", now=0)
    assert led.counters.get("hi", "a") == pytest.approx(70 + (120 + 20) / 2)


def test_next_chunk_or_trailer_corrects_the_output_charge():
    led = ledger()
    c1 = make_chunk("r", "b", "lo", index=1, slice=32, kv_holder=HOLDER)
    led.charge_grant(c1, HOLDER, now=0)
    led.charge_end(c1, None, now=1)
    assert led.counters.get("lo", "b") == pytest.approx(2 * 32)
    led.reconcile(make_chunk("r", "b", "lo", index=2, generated=10, slice=32, kv_holder=HOLDER))
    assert led.counters.get("lo", "b") == pytest.approx(2 * 10)  # chunk 1 produced 10, not 32
    c2 = make_chunk("r", "b", "lo", index=2, generated=10, slice=32, kv_holder=HOLDER)
    led.charge_grant(c2, HOLDER, now=1)
    led.charge_end(c2, 5, now=2)  # the worker's trailer: 5 tokens
    assert led.counters.get("lo", "b") == pytest.approx(2 * 10 + 2 * 5)
    assert led.metrics.tokens_served.get("b") == 15
    led.forget("r")  # the request is over: a late continuation corrects nothing
    led.reconcile(make_chunk("r", "b", "lo", index=3, generated=100, kv_holder=HOLDER))
    assert led.counters.get("lo", "b") == pytest.approx(30)


def test_a_tenant_stays_active_while_running_and_for_the_idle_grace():
    led = ledger(idle_grace_s=2.0)
    c = make_chunk("r", "a", "hi", index=1)
    assert led.active_tenants("hi", 0) == set()
    led.charge_grant(c, HOLDER, now=0)
    assert led.active_tenants("hi", 100) == {"a"}  # running, however long
    led.charge_end(c, None, now=100)
    assert led.active_tenants("hi", 101.9) == {"a"} and led.active_tenants("lo", 101) == set()
    assert led.active_tenants("hi", 102.1) == set()
