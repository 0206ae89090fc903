"""Request planning without an engine: what is chunked, what runs unchunked and why, what is a 400."""

from __future__ import annotations

import pytest

from tokenslice_sidecar.requests import RequestError, chunk_seed, plan, tokenize_body

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("endpoint,extra,reason", [
    ("completions", {"n": 2}, "n"),
    ("completions", {"best_of": 3}, "beam_search"),
    ("completions", {"use_beam_search": True}, "beam_search"),
    ("chat", {"response_format": {"type": "json_object"}}, "structured_output"),
    ("chat", {"structured_outputs": {"regex": "a+"}}, "structured_output"),
    ("completions", {"guided_json": {}}, "structured_output"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("completions", {"presence_penalty": 0.5}, "output_penalties"),
    ("chat", {"frequency_penalty": -0.1}, "output_penalties"),
    ("completions", {"bad_words": ["x"]}, "bad_words"),
    ("completions", {"truncate_prompt_tokens": 3}, "truncate_prompt_tokens"),
    ("completions", {"kv_transfer_params": {"a": 1}}, "kv_transfer"),
    ("completions", {"prompt_embeds": "AAAA"}, "prompt_embeds"),
    ("completions", {"thinking_token_budget": 5}, "output_state"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"prompt": ["a", "b"]}, "batch_prompt"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "multimodal"),
])
def test_unchunkable_features_pass_through_with_their_reason(endpoint, extra, reason):
    base = {"prompt": "hello"} if endpoint == "completions" else {"messages": MSG}
    p = plan(endpoint, {**base, **extra})
    assert p.passthrough == reason
    assert p.chunk_params == {}  # nothing interpreted for a pass-through


@pytest.mark.parametrize("extra", [
    {}, {"n": 1}, {"best_of": 1}, {"response_format": {"type": "text"}}, {"presence_penalty": 0},
    {"prompt": ["one"]}, {"temperature": 0.7, "top_k": 5}, {"echo": False},
])
def test_chunkable_requests_are_chunked(extra):
    assert plan("completions", {"prompt": "hello", **extra}).passthrough is None


@pytest.mark.parametrize("endpoint,body,param", [
    ("completions", [], None),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": "x", "stop": ""}, "stop"),
    ("completions", {"prompt": "x", "stop": ["a", ""]}, "stop"),
    ("completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "n": 0}, "n"),
    ("completions", {"prompt": "x", "min_tokens": -2}, "min_tokens"),
    ("completions", {"prompt": "x", "seed": 2**63}, "seed"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": MSG, "max_completion_tokens": 0}, "max_tokens"),
])
def test_invalid_requests_are_400_with_param(endpoint, body, param):
    with pytest.raises(RequestError) as info:
        plan(endpoint, body)
    assert info.value.param == param


def test_completions_plan_reads_what_the_driver_owns():
    body = {"model": "m", "prompt": [[5, 6, 7]], "max_tokens": 9, "stop": "##", "min_tokens": 2, "seed": 4,
            "logprobs": 2, "stream": True, "stream_options": {"include_usage": True},
            "include_stop_str_in_output": True, "temperature": 0.5, "presence_penalty": None,
            "unknown_field": 1, "logit_bias": {"3": 1}}
    p = plan("completions", body)
    assert (p.prompt, p.max_tokens, p.stops, p.min_tokens, p.seed, p.logprobs) == ([5, 6, 7], 9, ["##"], 2, 4, 2)
    assert p.stream and p.include_usage and not p.continuous_usage and p.include_stop_str
    # only per-token, state-free sampling parameters travel to every chunk; never the budget or stops
    assert p.chunk_params == {"model": "m", "temperature": 0.5, "logit_bias": {"3": 1}}


def test_completions_default_max_tokens_is_16_chat_none():
    assert plan("completions", {"prompt": "x"}).max_tokens == 16
    assert plan("chat", {"messages": MSG}).max_tokens is None  # up to the context length


def test_chat_max_completion_tokens_wins_and_logprobs_map_to_completions_form():
    p = plan("chat", {"messages": MSG, "max_tokens": 5, "max_completion_tokens": 7, "logprobs": True,
                      "top_logprobs": 3})
    assert p.max_tokens == 7 and p.logprobs == 3 and p.chat_top_logprobs == 3
    assert plan("chat", {"messages": MSG, "logprobs": True}).logprobs == 0  # sampled token only
    assert plan("chat", {"messages": MSG}).logprobs is None


def test_tokenize_body_chat_matches_the_chat_endpoint_defaults():
    body = {"model": "m", "messages": MSG, "temperature": 0, "reasoning_effort": "none",
            "chat_template_kwargs": {"x": 1}, "add_generation_prompt": True}
    out = tokenize_body(plan("chat", body))
    assert out["add_special_tokens"] is False  # the chat endpoint's default, not /tokenize's
    assert out["messages"] == MSG and out["model"] == "m" and out["add_generation_prompt"] is True
    assert out["chat_template_kwargs"] == {"reasoning_effort": "none", "enable_thinking": False, "x": 1}
    assert "temperature" not in out


def test_tokenize_body_completions():
    assert tokenize_body(plan("completions", {"prompt": "hi"})) == {"prompt": "hi", "add_special_tokens": True}
    assert tokenize_body(plan("completions", {"prompt": "hi", "add_special_tokens": False}))[
        "add_special_tokens"] is False
    # token ids are used as given: the call only learns max_model_len
    assert tokenize_body(plan("completions", {"prompt": [1, 2]})) == {"prompt": "", "add_special_tokens": False}


def test_chunk_seed_advances_by_tokens_and_wraps_to_int64():
    assert chunk_seed(10, 0) == 10 and chunk_seed(10, 32) == 42
    assert chunk_seed(2**63 - 1, 1) == -(2**63)
    assert chunk_seed(-(2**63), -1) == 2**63 - 1
    assert len({chunk_seed(7, g) for g in range(0, 64, 16)}) == 4  # no chunk replays another's stream
