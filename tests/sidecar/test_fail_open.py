"""failureMode FailOpen with the picker gone: real Envoy, two real sidecars, the real vLLM.

What happens to a chunked request when nobody schedules it: Envoy routes the client's request to a pool
member round robin (no admission, so the sidecar's default tenant and class), that driver still cuts it into
chunks and sends each through the gateway, and Envoy routes each chunk round robin too. Every chunk still
carries its driver's signature, which is all a worker needs within the chunk's 30 s life (the picker's grant
matters only to a chunk that outlived it in the picker's queue), so the worker runs it after the same checks
as always (body digest, slice, first use): the request is served, chunked and unscheduled, with its exact
tokens, and a forged chunk is still refused.
"""

from __future__ import annotations

import json

import pytest

from tokenslice import contract
from tokenslice.procs import free_port
from tokenslice_sidecar.app import SidecarConfig, start
from tokenslice_sidecar.metrics import SidecarMetrics

from .helpers import PROMPTS, greedy, post_stream, reference

pytestmark = pytest.mark.engine


def _worker_chunks(metrics: SidecarMetrics) -> float:
    return metrics.registry.get_sample_value("tokenslice_sidecar_worker_chunks_total") or 0


async def test_fail_open_serves_chunked_requests_with_signatures_checked(http, vllm, gateway_stack):
    key = b"fail-open-test-key-" * 2
    port = free_port()  # the gateway's: the sidecars send their chunks there
    metrics = [SidecarMetrics(), SidecarMetrics()]
    runners, addresses = [], []
    for m in metrics:
        runner, bound = await start(SidecarConfig(vllm_url=vllm.url, chunk_url=f"http://127.0.0.1:{port}",
                                                  chunk_size=8, key=key), metrics=m)
        runners.append(runner)
        addresses.append(f"127.0.0.1:{bound}")
    try:
        stack = await gateway_stack(endpoints=addresses, fail_open=addresses, listen_port=port, signing_key=key)
        body = {"model": vllm.model, **greedy(prompt=PROMPTS[0], max_tokens=24, ignore_eos=True)}
        ref = (await reference(http, vllm, "/v1/completions", body))["choices"][0]

        await stack.picker.stop(0)
        before = [_worker_chunks(m) for m in metrics]
        got = await post_stream(http, f"{stack.url}/v1/completions", body)
        assert got.token_ids == ref["token_ids"] and got.text == ref["text"] and got.done == 1
        ran = [_worker_chunks(m) - b for m, b in zip(metrics, before, strict=True)]
        assert sum(ran) == 3 and all(ran), ran  # three slices of 8, round robin over both pods

        forged = contract.ChunkHeaders(request_id="x", chunk_index=0, tenant="t", priority_class="standard",
                                       slice=8).sign(b"not-the-pool-key-" * 2)
        async with http.post(f"{stack.url}/v1/completions", headers=forged,
                             json={"model": vllm.model, "prompt": [1, 2, 3], "max_tokens": 8}) as resp:
            assert resp.status == 403, await resp.text()
            assert json.loads(await resp.read())["error"]["type"] == "PermissionDeniedError"
        assert sum(_worker_chunks(m) for m in metrics) == sum(before) + 3
    finally:
        for runner in runners:
            await runner.cleanup()
