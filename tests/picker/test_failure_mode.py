"""The InferencePool's ``failureMode`` through a REAL Envoy: the picker stopped, FailOpen vs FailClose.

Upstreams are recording servers (tests/picker/upstream.py): what is asserted is where Envoy sends a request
without the picker and what it carries, not what a model computes (tests/sidecar/test_fail_open.py runs the
same with real sidecars and vLLM).
"""

from __future__ import annotations

import json

import pytest

from tests.picker.test_extproc import MODES
from tokenslice import contract
from tokenslice.policy import PriorityClass, SchedulingPolicySpec

POLICY = SchedulingPolicySpec(priority_classes=[PriorityClass(name="standard", priority=100)])


@pytest.mark.parametrize("mode", ["ours", "response-headers-SEND", "BUFFERED", "STREAMED"])
async def test_fail_open_routes_to_the_pool_while_the_picker_is_down(gateway_stack, upstreams, mode):
    """Not with FULL_DUPLEX_STREAMED request bodies: Envoy fails open only until it sent the picker the first body
    piece (envoyproxy/envoy#41276), which in that mode goes right after the headers (docs/kubernetes.md)."""
    a, b, outsider = await upstreams(3)
    stack = await gateway_stack(endpoints=[a.address, b.address], policy=POLICY, modes=MODES[mode],
                                fail_open=[a.address, b.address])
    # picker up: it routes (signed admission, its chosen endpoint), the fail-open route is not taken
    for _ in range(4):
        status, _, _ = await stack.post(headers={contract.DESTINATION_ENDPOINT: outsider.address})
        assert status == 200
        got = (a.received + b.received)[-1]
        assert contract.AdmitHeaders.verify(got.headers, stack.key).priority_class == "standard"
        assert got.headers[contract.DESTINATION_ENDPOINT] in (a.address, b.address)

    await stack.picker.stop(0)
    before = len(a.received), len(b.received)
    for i in range(4):
        # a client's destination header must not choose the address while nobody checks it
        status, _, body = await stack.post(headers={contract.DESTINATION_ENDPOINT: outsider.address},
                                           json={"prompt": f"p{i}"})
        assert status == 200 and body.endswith(b"data: [DONE]\n\n"), (status, body[:300])
    served = a.received[before[0]:] + b.received[before[1]:]
    assert sorted(json.loads(r.body)["prompt"] for r in served) == ["p0", "p1", "p2", "p3"]
    assert len(a.received) > before[0] and len(b.received) > before[1]  # round robin over the pool
    assert all(contract.ROLE not in r.headers for r in served)  # unadmitted: no picker signed anything
    assert outsider.received == []
    # a driver's chunk still arrives signed by its driver (no grant): the worker checks it as always
    chunk = stack.chunk_headers(slice=2)
    status, _, _ = await stack.post(headers=chunk)
    assert status == 200
    (got,) = [r for r in a.received + b.received if r.request_id == chunk[contract.REQUEST_ID]]
    assert got.headers[contract.SIGNATURE] == chunk[contract.SIGNATURE] and contract.GRANT not in got.headers
    assert outsider.received == []


async def test_fail_close_answers_an_openai_error_while_the_picker_is_down(gateway_stack, upstreams):
    (a,) = await upstreams(1)
    stack = await gateway_stack(endpoints=[a.address], policy=POLICY)
    assert (await stack.post())[0] == 200
    await stack.picker.stop(0)
    for headers in ({}, stack.chunk_headers(slice=1)):
        status, resp_headers, body = await stack.post(headers=headers)
        assert status == 500 and resp_headers["content-type"] == "application/json"
        err = json.loads(body)["error"]
        assert err["type"] == "InternalServerError" and err["message"], err
    assert len(a.received) == 1
