"""OpenAI response assembly: one seamless response out of many chunks.

The driver produces ``Delta``s (text, token ids, logprobs in the completions shape,
and on the last one the finish reason); ``ResponseBuilder`` turns them into SSE events
of ``text_completion`` / ``chat.completion.chunk`` objects with a stable id and
``created``, or into one final JSON body.  Chunk boundaries never show: no
intermediate ``finish_reason``, one role delta, one ``[DONE]``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .requests import Plan

DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Delta:
    """What one upstream event added to the generation, as released to the client."""

    text: str
    token_ids: list[int]
    logprobs: dict[str, list[Any]] | None = None
    """Completions-shaped logprobs fragment: tokens, token_logprobs, top_logprobs, text_offset."""
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def chat_logprobs(fragment: dict[str, list[Any]], top: int) -> list[dict[str, Any]]:
    """Completions logprobs -> chat ``logprobs.content`` entries (vLLM's chat rules: first ``top`` items)."""
    out = []
    for token, lp, tops in zip(fragment["tokens"], fragment["token_logprobs"], fragment["top_logprobs"],
                               strict=False):
        entry: dict[str, Any] = {"token": token, "logprob": lp if lp is not None else -9999.0,
                                 "bytes": list(token.encode("utf-8", errors="replace"))}
        items = list((tops or {}).items())
        if top != -1:
            items = items[:top]
        entry["top_logprobs"] = [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8", errors="replace"))}
                                 for t, v in items]
        out.append(entry)
    return out


@dataclass(slots=True)
class ResponseBuilder:
    """Renders one client response; holds the stable id, created time and running totals."""

    plan: Plan
    request_id: str
    model: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: dict[str, list[Any]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    system_fingerprint: str | None = None
    _first: bool = True

    @property
    def chat(self) -> bool:
        return self.plan.endpoint == "chat"

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def usage(self) -> dict[str, Any]:
        prompt = len(self.prompt_ids)
        return {"prompt_tokens": prompt, "total_tokens": prompt + self.completion_tokens,
                "completion_tokens": self.completion_tokens, "prompt_tokens_details": None,
                "completion_tokens_details": None}

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.response_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}

    # --- streaming -------------------------------------------------------------
    def start_events(self) -> bytes:
        """Events sent before any token: the chat role delta."""
        if not self.chat:
            return b""
        choice: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}
        if self.plan.return_token_ids:
            choice["prompt_token_ids"] = self.prompt_ids
        self._first = False
        obj = self._envelope([choice])
        if self.plan.continuous_usage:
            obj["usage"] = self.usage()
        return sse(obj)

    def event(self, d: Delta) -> bytes:
        """One SSE event for one delta (empty bytes when it carries nothing the client can see)."""
        self.completion_tokens += len(d.token_ids)
        if not d.text and d.finish_reason is None and not d.logprobs and not self.plan.return_token_ids:
            return b""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": d.text} if d.text else {},
                                      "logprobs": None, "finish_reason": d.finish_reason}
            if d.logprobs:
                choice["logprobs"] = {"content": chat_logprobs(d.logprobs, self.plan.chat_top_logprobs)}
        else:
            choice = {"index": 0, "text": d.text, "logprobs": d.logprobs, "finish_reason": d.finish_reason}
        if d.finish_reason is not None or not self.chat:
            choice["stop_reason"] = d.stop_reason
        if self.plan.return_token_ids:
            choice["token_ids"] = d.token_ids
            if self._first:
                choice["prompt_token_ids"] = self.prompt_ids
        self._first = False
        obj = self._envelope([choice])
        if d.finish_reason is not None and self.system_fingerprint:
            obj["system_fingerprint"] = self.system_fingerprint
        if self.plan.continuous_usage:
            obj["usage"] = self.usage()
        return sse(obj)

    def end_events(self) -> bytes:
        """Trailing usage event (only when asked for) and the single ``[DONE]``."""
        out = b""
        if self.plan.include_usage:
            obj = self._envelope([])
            obj["usage"] = self.usage()
            out += sse(obj)
        return out + DONE

    # --- non-streaming ---------------------------------------------------------
    def add(self, d: Delta) -> None:
        self.completion_tokens += len(d.token_ids)
        self.text_parts.append(d.text)
        self.token_ids.extend(d.token_ids)
        if d.logprobs:
            if self.logprobs is None:
                self.logprobs = {k: list(v) for k, v in d.logprobs.items()}
            else:
                for k, v in d.logprobs.items():
                    self.logprobs.setdefault(k, []).extend(v)
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason

    def body(self) -> dict[str, Any]:
        text = "".join(self.text_parts)
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                            "audio": None, "function_call": None, "reasoning": None},
                "logprobs": ({"content": chat_logprobs(self.logprobs, self.plan.chat_top_logprobs)}
                             if self.logprobs else None),
                "finish_reason": self.finish_reason, "stop_reason": self.stop_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs, "finish_reason": self.finish_reason,
                      "stop_reason": self.stop_reason, "prompt_logprobs": None}
        if self.plan.return_token_ids:
            choice["token_ids"] = self.token_ids
            choice["prompt_token_ids"] = self.prompt_ids
        return {"id": self.response_id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(),
                "system_fingerprint": self.system_fingerprint}
