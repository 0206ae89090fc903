"""One port, three roles: signed chunk and admit headers on the wire, pass-through, refusals, metrics."""

from __future__ import annotations

import json
import time

import pytest

from tokenslice import contract
from tokenslice.contract import AdmitHeaders, ChunkHeaders

from .conftest import TEST_KEY
from .helpers import CHAT, PROMPTS, post_json, sample

pytestmark = pytest.mark.engine


# --- the contract on the wire -------------------------------------------------------------------------------

async def test_forged_chunk_headers_are_refused(http, vllm, sidecars):
    sc = await sidecars(16)
    body = json.dumps({"model": vllm.model, "prompt": [1, 2, 3], "max_tokens": 2, "stream": True}).encode()

    def hdr(**kw) -> ChunkHeaders:
        fields = dict(request_id="r1", chunk_index=1, tenant="t", priority_class="premium", generated=4,
                      prompt_tokens=3, slice=2, kv_holder="10.0.0.1:8000",
                      body_digest=contract.body_digest("/v1/completions", body))
        return ChunkHeaders(**(fields | kw))

    long = json.dumps({"model": vllm.model, "prompt": [1, 2, 3], "max_tokens": 5000, "stream": True}).encode()
    cases = {
        "unsigned": (body, {k: v for k, v in hdr().sign(TEST_KEY).items() if k != contract.SIGNATURE}),
        "wrong key": (body, hdr().sign(b"not-the-key")),
        "tampered": (body, {**hdr().sign(TEST_KEY), contract.PRIORITY_CLASS: "critical"}),
        "expired": (body, hdr(expires=int(time.time()) - 5).sign(TEST_KEY)),
        "another body": (long, hdr().sign(TEST_KEY)),
        "beyond its slice": (long, hdr(body_digest=contract.body_digest("/v1/completions", long)).sign(TEST_KEY)),
        "no max_tokens": (b"{}", hdr(body_digest=contract.body_digest("/v1/completions", b"{}")).sign(TEST_KEY)),
    }
    json_type = {"Content-Type": "application/json"}
    for name, (data, headers) in cases.items():
        async with http.post(f"{sc.url}/v1/completions", data=data, headers=headers | json_type) as resp:
            err = await resp.json()
            assert resp.status == 403, name
            assert err["error"]["type"] == "PermissionDeniedError", name
    good = hdr().sign(TEST_KEY)
    async with http.post(f"{sc.url}/v1/completions", data=body, headers=good | json_type) as resp:
        assert resp.status == 200
        assert resp.headers[contract.SERVED_BY] == sc.url.removeprefix("http://")
        text = await resp.text()
        assert text.rstrip().endswith("data: [DONE]")
    async with http.post(f"{sc.url}/v1/completions", data=body, headers=good | json_type) as resp:
        assert resp.status == 403 and "replayed" in (await resp.json())["error"]["message"]
    assert sample(sc, "tokenslice_sidecar_worker_chunks_total") >= 1


async def test_admit_headers(http, vllm, sidecars):
    """Signed admit headers name the request; forged ones are ignored (defaults), never an error."""
    sc = await sidecars(16)
    body = {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 3}
    good = AdmitHeaders("admitted-42", "acme", "premium").sign(TEST_KEY)
    async with http.post(f"{sc.url}/v1/completions", json=body, headers=good) as resp:
        assert (await resp.json())["id"] == "cmpl-admitted-42"
    forged = AdmitHeaders("forged-1", "acme", "premium").sign(b"wrong")
    async with http.post(f"{sc.url}/v1/completions", json=body, headers=forged) as resp:
        data = await resp.json()
        assert resp.status == 200 and data["id"] != "cmpl-forged-1"


@pytest.mark.parametrize("admitted,chunks", [(3, 4), (7, 2), (0, 1)])
async def test_admitted_chunk_size_governs_the_slice(http, vllm, sidecars, admitted, chunks):
    """The gateway's signed chunk size (the policy's, per class) wins over --chunk-size; 0 means ours (16)."""
    sc = await sidecars(16)
    body = {"model": vllm.model, "prompt": PROMPTS[1], "max_tokens": 10, "ignore_eos": True}
    before = sample(sc, "tokenslice_sidecar_chunks_total")
    headers = AdmitHeaders("sized", "acme", "premium", chunk_size=admitted).sign(TEST_KEY)
    got = await post_json(http, f"{sc.url}/v1/completions", body | {"return_token_ids": True}, headers=headers)
    assert sample(sc, "tokenslice_sidecar_chunks_total") - before == chunks  # ceil(10 / size)
    assert len(got["choices"][0]["token_ids"]) == 10 and got["usage"]["completion_tokens"] == 10


async def test_policy_class_chunk_size_through_the_real_gateway(http, vllm, gateway_stack):
    """Client -> Envoy -> picker (admits with the class's chunk size) -> driver -> chunks -> Envoy -> worker.

    The sidecar's own --chunk-size (16) loses to the policy: class ``small`` slices by 5, class ``std`` by
    the policy's chunkSize 8, each counted by the picker's dispatches and the sidecar's chunks.  The picker
    runs per-slice mode (``max_slice_tokens=0``): slices of the class's chunk size are this test's point (by
    default a request runs as one long slice, e2e/test_preemption.py).
    """
    from tokenslice.policy import PriorityClass, SchedulingPolicySpec
    from tokenslice_sidecar.app import SidecarConfig, start
    from tokenslice_sidecar.metrics import SidecarMetrics

    policy = SchedulingPolicySpec(chunk_size=8, priority_classes=[
        PriorityClass(name="small", priority=2, chunk_size=5), PriorityClass(name="std", priority=1)])
    stack = await gateway_stack(endpoints=[], policy=policy, max_slice_tokens=0)
    metrics = SidecarMetrics()
    runner, port = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=stack.url, chunk_size=16, key=stack.key),
                               metrics=metrics)
    try:
        stack.picker.datastore.set_endpoints([f"127.0.0.1:{port}"])
        dispatches = stack.picker.metrics.dispatches
        for klass, chunks in (("small", 4), ("std", 3)):  # 18 tokens: ceil(18/5) = 4, ceil(18/8) = 3
            before = metrics.registry.get_sample_value("tokenslice_sidecar_chunks_total") or 0
            body = {"model": vllm.model, "prompt": PROMPTS[2], "max_tokens": 18, "ignore_eos": True}
            got = await post_json(http, f"{stack.url}/v1/completions", body,
                                  headers={"x-priority-class": klass})
            assert got["usage"]["completion_tokens"] == 18
            assert metrics.registry.get_sample_value("tokenslice_sidecar_chunks_total") - before == chunks
            served = sum(dispatches.get(klass, "default", kind) for kind in ("first", "continuation"))
            assert served == chunks, klass
    finally:
        await runner.cleanup()


async def test_unchunkable_requests_are_scheduled_as_one_chunk(http, vllm, gateway_stack):
    """``presence_penalty`` or ``n`` once escaped the picker (run straight on vLLM, unqueued, uncharged).

    Now such a request is one chunk through Envoy and the picker: dispatched and charged to its tenant
    for max_tokens x n, routed to a worker; other generating routes of vLLM are refused.
    """
    from tokenslice.policy import PriorityClass, SchedulingPolicySpec
    from tokenslice_sidecar.app import SidecarConfig, start

    policy = SchedulingPolicySpec(priority_classes=[PriorityClass(name="std", priority=1)])
    stack = await gateway_stack(endpoints=[], policy=policy)
    runner, port = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=stack.url, chunk_size=4, key=stack.key))
    try:
        stack.picker.datastore.set_endpoints([f"127.0.0.1:{port}"])
        dispatches = stack.picker.metrics.dispatches
        cases = [({"prompt": PROMPTS[0], "max_tokens": 6, "presence_penalty": 0.001}, 1),
                 ({"prompt": PROMPTS[1], "max_tokens": 5, "n": 2, "temperature": 0.5, "seed": 3}, 2)]
        for extra, n in cases:
            before = sum(dispatches.get("std", "default", kind) for kind in ("first", "continuation"))
            async with http.post(f"{stack.url}/v1/completions", json={"model": vllm.model, **extra}) as resp:
                got = await resp.json()
                assert resp.status == 200 and not any(contract.is_internal_header(h.lower()) for h in resp.headers)
            assert len(got["choices"]) == n
            assert sum(dispatches.get("std", "default", kind) for kind in ("first", "continuation")) == before + 1
        chat = {"model": vllm.model, "messages": CHAT[0], "presence_penalty": 0.5}  # no max_tokens: no known size
        err = await post_json(http, f"{stack.url}/v1/chat/completions", chat, 400)
        assert err["error"]["param"] == "max_tokens"
        got = await post_json(http, f"{stack.url}/v1/chat/completions", chat | {"max_tokens": 3, "stream": False})
        assert got["choices"][0]["message"]["role"] == "assistant"
        for path in ("/v1/responses", "/v1/messages", "/v1/embeddings"):
            err = await post_json(http, f"{stack.url}{path}", {"model": vllm.model, "input": "hi"}, 404)
            assert err["error"]["type"] == "NotFoundError" and "schedules" in err["error"]["message"]
    finally:
        await runner.cleanup()


async def test_policy_ceilings_on_max_tokens_n_and_body_size(http, vllm, gateway_stack):
    """The policy's limits reach the driver in the signed admission: beyond them a 400, never a run.

    Before, one request with ``"n": 10000`` held the engine for over a minute, and a request naming no
    max_tokens generated up to the context length.
    """
    from tokenslice.policy import PriorityClass, RequestLimits, SchedulingPolicySpec
    from tokenslice_sidecar.app import SidecarConfig, start

    policy = SchedulingPolicySpec(priority_classes=[PriorityClass(name="std", priority=1)],
                                  limits=RequestLimits(max_tokens=6, max_n=2))
    stack = await gateway_stack(endpoints=[], policy=policy)
    runner, port = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=stack.url, chunk_size=4, key=stack.key,
                                             max_body_bytes=64 * 1024))
    try:
        stack.picker.datastore.set_endpoints([f"127.0.0.1:{port}"])
        base = {"model": vllm.model, "prompt": PROMPTS[0]}
        for extra, param in (({"max_tokens": 7}, "max_tokens"), ({"max_tokens": 4, "n": 3}, "n"),
                             ({"max_tokens": 4, "n": 10000}, "n"), ({"max_tokens": 2, "best_of": 3}, "n")):
            err = await post_json(http, f"{stack.url}/v1/completions", base | extra, 400)
            assert err["error"]["param"] == param, extra
        got = await post_json(http, f"{stack.url}/v1/chat/completions",
                              {"model": vllm.model, "messages": CHAT[0], "ignore_eos": True})
        assert got["usage"]["completion_tokens"] == 6  # no max_tokens: the ceiling is its budget
        assert len((await post_json(http, f"{stack.url}/v1/completions", base | {"max_tokens": 3, "n": 2}))
                   ["choices"]) == 2
        err = await post_json(http, f"{stack.url}/v1/completions", base | {"prompt": "x" * 70_000}, 413)
        assert err["error"]["type"] == "RequestTooLargeError"
    finally:
        await runner.cleanup()


async def test_forged_admitted_chunk_size_is_ignored(http, vllm, sidecars):
    sc = await sidecars(16)
    body = {"model": vllm.model, "prompt": PROMPTS[1], "max_tokens": 10, "ignore_eos": True}
    before = sample(sc, "tokenslice_sidecar_chunks_total")
    rejected = sample(sc, "tokenslice_sidecar_rejected_total", reason="bad_admit_headers")
    good = AdmitHeaders("sized", "acme", "premium", chunk_size=16).sign(TEST_KEY)
    await post_json(http, f"{sc.url}/v1/completions", body, headers={**good, contract.SLICE: "1"})
    assert sample(sc, "tokenslice_sidecar_chunks_total") - before == 1  # tampered: our own 16, not 1
    assert sample(sc, "tokenslice_sidecar_rejected_total", reason="bad_admit_headers") == rejected + 1


# --- pass-through and refusals ------------------------------------------------------------------------------

async def test_passthrough_endpoints(http, vllm, sidecars):
    sc = await sidecars(16)
    async with http.get(f"{sc.url}/v1/models") as a, http.get(f"{vllm.url}/v1/models") as b:
        assert a.status == b.status == 200
        assert [m["id"] for m in (await a.json())["data"]] == [m["id"] for m in (await b.json())["data"]]
    async with http.get(f"{sc.url}/health") as resp:
        assert resp.status == 200
    tok = {"model": vllm.model, "prompt": PROMPTS[4]}
    assert await post_json(http, f"{sc.url}/tokenize", tok) == await post_json(http, f"{vllm.url}/tokenize", tok)
    async with http.get(f"{sc.url}/metrics") as resp:
        assert "vllm:num_requests_running" in await resp.text()
    async with http.get(f"{sc.url}{contract.SIDECAR_METRICS_PATH}") as resp:
        text = await resp.text()
        assert "tokenslice_sidecar_chunks_total" in text and "vllm:" not in text


async def test_unchunkable_features_run_unchunked(http, vllm, sidecars):
    sc = await sidecars(4)
    body = {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 1}
    got = await post_json(http, f"{sc.url}/v1/completions", body)
    assert len(got["choices"]) == 2
    echo = await post_json(http, f"{sc.url}/v1/completions", {**body, "n": 1, "echo": True, "temperature": 0})
    assert echo["choices"][0]["text"].startswith(PROMPTS[0])
    assert sample(sc, "tokenslice_sidecar_passthrough_total", reason="n") >= 1
    assert sample(sc, "tokenslice_sidecar_passthrough_total", reason="echo") >= 1


async def test_bad_requests(http, vllm, sidecars):
    sc = await sidecars(4)
    async with http.post(f"{sc.url}/v1/completions", data=b"{not json",
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == 400
    cases = [
        ("/v1/completions", {"prompt": "x", "stop": ""}),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**7}),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": CHAT[0], "temperature": -3}),
    ]
    for path, body in cases:
        data = await post_json(http, f"{sc.url}{path}", {"model": vllm.model, **body}, 400)
        assert data["error"]["type"] and data["error"]["message"], body


async def test_sidecar_metrics_count_chunks(http, vllm, sidecars):
    sc = await sidecars(3)
    before = sample(sc, "tokenslice_sidecar_chunks_total")
    await post_json(http, f"{sc.url}/v1/completions",
                    {"model": vllm.model, "prompt": PROMPTS[0], "max_tokens": 10, "ignore_eos": True})
    assert sample(sc, "tokenslice_sidecar_chunks_total") - before == 4  # 3 + 3 + 3 + 1
    async with http.get(f"{sc.url}{contract.SIDECAR_METRICS_PATH}") as resp:
        text = await resp.text()
    assert "tokenslice_sidecar_pause_seconds_count" in text
    assert "tokenslice_sidecar_chunk_tokens_bucket" in text


def test_no_signing_key_no_start():
    """No silent fallback: without a (strong enough) key the sidecar refuses to start, saying why."""
    import os
    import subprocess
    import sys

    from tokenslice_sidecar.app import SidecarConfig, build_app

    for weak in (b"", b"short"):
        with pytest.raises(contract.ContractError, match=f"at least {contract.MIN_KEY_BYTES}"):
            build_app(SidecarConfig(key=weak))
    env = {k: v for k, v in os.environ.items() if k not in (contract.KEY_ENV, contract.KEY_FILE_ENV)}
    proc = subprocess.run([sys.executable, "-m", "tokenslice", "sidecar", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "no signing key" in proc.stderr
