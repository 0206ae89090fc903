"""Small HTTP helpers for the sidecar tests: plain JSON calls and SSE collection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a kingdom by the sea,",
    "def fibonacci(n):",
    "Numbers: 1, 2, 3,",
    "Über café naïve — ünïcødé ☃ 日本語",
]

CHAT = [
    [{"role": "user", "content": "Tell me a story about a robot."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Écris un poème ☃"}],
]


async def post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                    status: int = 200, headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with http.post(url, json=body, headers=headers) as resp:
        data = await resp.json(content_type=None)
        assert resp.status == status, (resp.status, data)
        return data


@dataclass
class Streamed:
    events: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    usage: dict[str, Any] | None = None
    logprobs: list[Any] = field(default_factory=list)


async def post_stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      headers: dict[str, str] | None = None) -> Streamed:
    """Collect an SSE response; checks framing (``[DONE]`` exactly once, last)."""
    out = Streamed()
    chat = url.endswith("/chat/completions")
    async with http.post(url, json={**body, "stream": True}, headers=headers) as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        assert out.done == 0, "event after [DONE]"
        data = block[len("data: "):]
        if data == "[DONE]":
            out.done += 1
            continue
        ev = json.loads(data)
        out.events.append(ev)
        if ev.get("usage"):
            out.usage = ev["usage"]
        for ch in ev.get("choices") or []:
            if chat:
                out.text += ch["delta"].get("content") or ""
                if ch.get("logprobs"):
                    out.logprobs.extend(ch["logprobs"]["content"])
            else:
                out.text += ch["text"]
                if ch.get("logprobs"):
                    out.logprobs.append(ch["logprobs"])
            out.token_ids.extend(ch.get("token_ids") or [])
            if ch.get("finish_reason") is not None:
                assert out.finish_reason is None, "two finish reasons"
                out.finish_reason = ch["finish_reason"]
                out.stop_reason = ch.get("stop_reason")
    assert out.done == 1
    return out


def choice_text(resp: dict[str, Any]) -> str:
    ch = resp["choices"][0]
    return ch["message"]["content"] if "message" in ch else ch["text"]


def greedy(**extra: Any) -> dict[str, Any]:
    return {"temperature": 0.0, "return_token_ids": True, **extra}


async def reference(http: aiohttp.ClientSession, vllm: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The same request sent straight to vLLM (unchunked): what the sidecar must reproduce."""
    return await post_json(http, f"{vllm.url}{path}", {"model": vllm.model, **body})


async def token_texts(http: aiohttp.ClientSession, vllm: Any, prompt: str, n: int) -> tuple[list[int], list[str]]:
    """Token ids and the text each one added, from an unchunked greedy request (the model writes ASCII)."""
    ref = await reference(http, vllm, "/v1/completions",
                          greedy(prompt=prompt, max_tokens=n, ignore_eos=True, logprobs=0))
    ids, texts = ref["choices"][0]["token_ids"], ref["choices"][0]["logprobs"]["tokens"]
    assert "".join(texts) == ref["choices"][0]["text"] and len(texts) == len(ids)
    return ids, texts


def sample(sc: Any, name: str, **labels: str) -> float:
    """A sidecar metric's current value (0 when never set)."""
    return sc.metrics.registry.get_sample_value(name, labels or None) or 0.0
