"""One seamless OpenAI response out of many chunks' deltas, without an engine (ResponseBuilder)."""

from __future__ import annotations

import json

from tokenslice_sidecar.openai_stream import Delta, ResponseBuilder, chat_logprobs
from tokenslice_sidecar.requests import plan

MSG = [{"role": "user", "content": "hi"}]


def _events(raw: bytes) -> list[dict | str]:
    out: list[dict | str] = []
    for block in raw.decode().split("\n\n"):
        if block:
            assert block.startswith("data: ")
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _lp(tokens: list[str], offset: int = 0) -> dict:
    return {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
            "top_logprobs": [{t: -0.5, "zz": -2.0} for t in tokens],
            "text_offset": list(range(offset, offset + len(tokens)))}


def test_chat_stream_is_one_response_across_chunk_boundaries():
    p = plan("chat", {"messages": MSG, "stream": True, "stream_options": {"include_usage": True}})
    out = ResponseBuilder(p, "r1", model="m", prompt_ids=[1, 2, 3], created=100)
    raw = out.start_events()
    # three deltas as two chunks produce them: the boundary (after "b") shows nowhere
    for d in (Delta("a", [7]), Delta("b", [8]), Delta("", [9]), Delta("c", [10], None, "length", None)):
        raw += out.event(d)
    raw += out.end_events()
    events = _events(raw)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    objs = [e for e in events if isinstance(e, dict)]
    assert {e["id"] for e in objs} == {"chatcmpl-r1"} and {e["created"] for e in objs} == {100}
    assert {e["object"] for e in objs} == {"chat.completion.chunk"}
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["delta"].get("content") for e in objs[1:-1] for c in e["choices"]] == ["a", "b", "c"]
    finishes = [c["finish_reason"] for e in objs for c in e["choices"]]
    assert finishes == [None, None, None, "length"]  # an event without text or ids to show is dropped
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 4
    assert objs[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4,
                                 "prompt_tokens_details": None, "completion_tokens_details": None}
    assert all("usage" not in e for e in objs[:-1])


def test_completions_stream_token_ids_and_continuous_usage():
    p = plan("completions", {"prompt": "x", "stream": True, "return_token_ids": True,
                             "stream_options": {"continuous_usage_stats": True}})
    out = ResponseBuilder(p, "r2", prompt_ids=[1, 2])
    assert out.start_events() == b""  # no role delta for completions
    first = _events(out.event(Delta("a", [5, 6])))[0]
    second = _events(out.event(Delta("b", [7], None, "stop", "b")))[0]
    assert first["id"] == "cmpl-r2" and first["object"] == "text_completion"
    assert first["choices"][0]["prompt_token_ids"] == [1, 2]  # the prompt's ids once, first
    assert "prompt_token_ids" not in second["choices"][0]
    assert [first["choices"][0]["token_ids"], second["choices"][0]["token_ids"]] == [[5, 6], [7]]
    assert [first["usage"]["completion_tokens"], second["usage"]["completion_tokens"]] == [2, 3]
    assert (second["choices"][0]["finish_reason"], second["choices"][0]["stop_reason"]) == ("stop", "b")
    assert _events(out.end_events()) == ["[DONE]"]  # include_usage not asked for


def test_non_streaming_body_concatenates_chunks():
    p = plan("completions", {"prompt": "x", "logprobs": 1, "return_token_ids": True})
    out = ResponseBuilder(p, "r3", model="m", prompt_ids=[1])
    out.system_fingerprint = "fp"
    out.add(Delta("ab", [1, 2], _lp(["a", "b"])))
    out.add(Delta("c", [3], _lp(["c"], 2), "length"))
    body = out.body()
    choice = body["choices"][0]
    assert (choice["text"], choice["token_ids"], choice["finish_reason"]) == ("abc", [1, 2, 3], "length")
    assert choice["logprobs"]["tokens"] == ["a", "b", "c"] and choice["logprobs"]["text_offset"] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 3 and body["usage"]["prompt_tokens"] == 1
    assert body["object"] == "text_completion" and body["system_fingerprint"] == "fp"


def test_chat_body_and_logprobs_follow_vllm_chat_rules():
    p = plan("chat", {"messages": MSG, "logprobs": True, "top_logprobs": 1})
    out = ResponseBuilder(p, "r4")
    out.add(Delta("é", [1], _lp(["é"]), "stop", None))
    body = out.body()
    msg, lp = body["choices"][0]["message"], body["choices"][0]["logprobs"]["content"]
    assert msg["role"] == "assistant" and msg["content"] == "é" and body["object"] == "chat.completion"
    assert lp[0]["bytes"] == [0xC3, 0xA9] and len(lp[0]["top_logprobs"]) == 1  # first top_logprobs only
    assert chat_logprobs(_lp(["a"]), -1)[0]["top_logprobs"][1]["token"] == "zz"  # -1: all of them
    assert chat_logprobs({"tokens": ["a"], "token_logprobs": [None], "top_logprobs": [None]}, 0)[0][
        "logprob"] == -9999.0
