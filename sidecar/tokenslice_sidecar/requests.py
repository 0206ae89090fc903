"""A client's request, read once: what the driver must interpret, and how it is run.

The raw JSON body stays the source of truth (unknown fields travel to vLLM untouched in
pass-through); only the fields whose meaning changes under chunking are parsed here, with
pydantic.  ``plan`` decides per request whether it can be continued faithfully across
chunks, or must run unchunked (a reason that ends up in logs and metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Endpoint = Literal["completions", "chat"]

_INT64 = 2**63

# Sampling parameters forwarded verbatim to every chunk: per-token, state-free, hence faithful.
CHUNK_PASS_KEYS = (
    "model", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "logit_bias",
    "allowed_token_ids", "stop_token_ids", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "user", "priority", "cache_salt", "logprob_token_ids",
    "return_tokens_as_token_ids", "vllm_xargs", "watermarking", "session_id", "stream_interval",
)

# Chat fields that shape the prompt: they go to /tokenize once, never to a chunk.
CHAT_TEMPLATE_KEYS = (
    "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    "chat_template", "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs",
)


class RequestError(ValueError):
    """The client's request is invalid: answered with a 400 OpenAI error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Interpreted(BaseModel):
    """The fields whose meaning the driver owns (validated; everything else passes through)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)
    return_token_ids: bool | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "" or (isinstance(v, list) and any(s == "" for s in v)):
            raise ValueError("stop strings must not be empty")
        return v


class _CompletionFields(_Interpreted):
    prompt: str | list[int] | list[list[int]] | list[str] | None = None
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=-1)
    echo: bool | None = False
    suffix: str | None = None


class _ChatFields(_Interpreted):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=0, ge=-1)
    echo: bool = False


@dataclass(slots=True)
class Plan:
    """How one client request is served."""

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    passthrough: str | None = None
    """Reason to run unchunked, or None to run as chunks."""
    include_usage: bool = False
    continuous_usage: bool = False
    max_tokens: int | None = None
    """Completion tokens asked for; None means 'up to the context length'."""
    max_tokens_ceiling: int | None = None
    """The policy's ceiling (admit headers): the budget of a request that names no max_tokens."""
    fanout: int = 1
    """Sequences generated at once (``n``, ``best_of``): an unchunked request's slice is max_tokens x fanout."""
    stops: list[str] = field(default_factory=list)
    include_stop_str: bool = False
    min_tokens: int = 0
    seed: int | None = None
    logprobs: int | None = None
    """Top-logprobs count to ask each chunk for (completions semantics), None for none."""
    chat_top_logprobs: int = 0
    return_token_ids: bool = False
    model: str | None = None
    prompt: str | list[int] | None = None
    """Completions prompt (text or ids); chat prompts are built from ``body`` by /tokenize."""
    chunk_params: dict[str, Any] = field(default_factory=dict)
    """Sampling parameters copied into every chunk."""


def _passthrough_reason(endpoint: Endpoint, body: dict[str, Any], f: _Interpreted) -> str | None:
    """Features whose state lives inside one engine request: they cannot be cut into chunks."""
    if (f.n or 1) > 1:
        return "n"
    if body.get("best_of") not in (None, 1) or body.get("use_beam_search"):
        return "beam_search"
    rf = body.get("response_format")
    if (isinstance(rf, dict) and rf.get("type") not in (None, "text")) or body.get("structured_outputs") \
            or any(k.startswith("guided_") and body.get(k) is not None for k in body):
        return "structured_output"
    if body.get("echo"):
        return "echo"
    if body.get("prompt_logprobs") is not None:
        return "prompt_logprobs"
    if f.presence_penalty or f.frequency_penalty:
        return "output_penalties"  # they count output tokens only; a chunk's prompt hides earlier output
    if body.get("bad_words"):
        return "bad_words"  # multi-token bad words are matched against this request's output only
    if body.get("truncate_prompt_tokens") is not None:
        return "truncate_prompt_tokens"
    if body.get("kv_transfer_params") or body.get("ec_transfer_params"):
        return "kv_transfer"
    if body.get("prompt_embeds") is not None:
        return "prompt_embeds"
    if body.get("repetition_detection") or body.get("thinking_token_budget") is not None:
        return "output_state"
    if endpoint == "completions":
        if body.get("suffix"):
            return "suffix"
        p = body.get("prompt")
        if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) != 1:
            return "batch_prompt"
    else:
        if body.get("tools"):
            return "tools"
        if any(_has_non_text_content(m) for m in body.get("messages") or []):
            return "multimodal"
    return None


def _has_non_text_content(message: dict[str, Any]) -> bool:
    content = message.get("content")
    if isinstance(content, list):
        return any(isinstance(p, dict) and p.get("type") not in (None, "text") for p in content)
    return False


def plan(endpoint: Endpoint, body: Any) -> Plan:
    """Validate the fields the driver interprets and decide how the request runs."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = _CompletionFields if endpoint == "completions" else _ChatFields
    try:
        f = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        raise RequestError(f"{param}: {err['msg']}" if param else err["msg"], param) from None
    if f.stream_options is not None and not f.stream:
        raise RequestError("stream_options can only be set when stream is true", "stream_options")
    p = Plan(endpoint=endpoint, body=body, stream=bool(f.stream), model=f.model)
    p.passthrough = _passthrough_reason(endpoint, body, f)
    if p.passthrough:
        if isinstance(f, _CompletionFields):
            p.max_tokens = f.max_tokens
        else:
            p.max_tokens = f.max_completion_tokens if f.max_completion_tokens is not None else f.max_tokens
        best_of = body.get("best_of")
        p.fanout = max(f.n or 1, best_of if type(best_of) is int and best_of > 1 else 1)
        if p.max_tokens == 0:
            raise RequestError("max_tokens must be at least 1", "max_tokens")
        return p
    if f.stream_options is not None:
        p.include_usage = bool(f.stream_options.include_usage)
        p.continuous_usage = bool(f.stream_options.continuous_usage_stats)
    p.stops = [f.stop] if isinstance(f.stop, str) else list(f.stop or [])
    p.include_stop_str = f.include_stop_str_in_output
    p.min_tokens = f.min_tokens
    p.seed = f.seed
    p.return_token_ids = bool(f.return_token_ids)
    if isinstance(f, _CompletionFields):
        if f.prompt is None or f.prompt == "" or f.prompt == []:
            raise RequestError("prompt must not be empty", "prompt")
        prompt = f.prompt
        if isinstance(prompt, list) and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a one-element batch
        if isinstance(prompt, list) and not prompt:
            raise RequestError("prompt must not be empty", "prompt")
        p.prompt = prompt
        p.max_tokens = f.max_tokens
        p.logprobs = f.logprobs
    else:
        p.max_tokens = f.max_completion_tokens if f.max_completion_tokens is not None else f.max_tokens
        if f.logprobs:
            p.chat_top_logprobs = f.top_logprobs or 0
            p.logprobs = p.chat_top_logprobs
        elif f.top_logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    if p.max_tokens == 0:
        raise RequestError("max_tokens must be at least 1", "max_tokens")
    p.chunk_params = {k: body[k] for k in CHUNK_PASS_KEYS if k in body and body[k] is not None}
    return p


def apply_ceilings(p: Plan, max_tokens: int, max_n: int) -> None:
    """Refuse (400) what the policy's RequestLimits do not allow; 0 means no ceiling."""
    if max_n and p.fanout > max_n:
        raise RequestError(f"n (and best_of) must be at most {max_n}", "n")
    if max_tokens:
        if p.max_tokens is not None and p.max_tokens > max_tokens:
            raise RequestError(f"max_tokens must be at most {max_tokens}", "max_tokens")
        p.max_tokens_ceiling = max_tokens


def chunk_seed(seed: int, generated: int) -> int:
    """Seed for a chunk: the client's seed advanced by the tokens already generated.

    Deterministic for a given (seed, chunk size), distinct per chunk so chunks do not
    replay the same random stream; wrapped into int64 like vLLM's field.
    """
    return (seed + generated + _INT64) % (2 * _INT64) - _INT64


def tokenize_body(p: Plan) -> dict[str, Any]:
    """The /tokenize request that reproduces exactly what vLLM would feed the model unchunked."""
    if p.endpoint == "chat":
        out = {k: p.body[k] for k in CHAT_TEMPLATE_KEYS if k in p.body}
        out.setdefault("add_special_tokens", False)  # the chat endpoint's default, not /tokenize's
        # the chat endpoint hands these to the template; /tokenize only takes chat_template_kwargs
        extra = {k: p.body[k] for k in ("documents", "reasoning_effort") if p.body.get(k) is not None}
        if extra:
            kwargs = dict(p.body.get("chat_template_kwargs") or {})
            if "reasoning_effort" in extra and "enable_thinking" not in kwargs:
                kwargs["enable_thinking"] = extra["reasoning_effort"] != "none"
            out["chat_template_kwargs"] = {**extra, **kwargs}
    elif isinstance(p.prompt, list):
        out = {"prompt": "", "add_special_tokens": False}  # ids are used as given: this only learns max_model_len
    else:
        out = {"prompt": p.prompt, "add_special_tokens": p.body.get("add_special_tokens", True)}
    if p.model:
        out["model"] = p.model
    return out
