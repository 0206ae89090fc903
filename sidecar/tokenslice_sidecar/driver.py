"""The driver: runs one client request as a sequence of chunks with token-id continuation.

The prompt is tokenized once (chat template applied once).  Chunk k is a plain vLLM
``/v1/completions`` call whose prompt is the prompt ids plus every id generated so far and
whose ``max_tokens`` is the slice; vLLM's prefix cache keeps the KV between chunks, and the
gateway may pause or move the request at every boundary.  Text comes from vLLM's
detokenizer primed with the whole context, so a chunk's text continues the previous one
exactly; token ids come from ``return_token_ids``, never from re-tokenized text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tokenslice import contract
from tokenslice.contract import PREFIX_HASHES, SERVED_BY, ChunkHeaders
from tokenslice.errors import openai_error

from .metrics import SidecarMetrics
from .openai_stream import Delta
from .requests import Plan, RequestError, chunk_seed, tokenize_body
from .stops import StopScanner
from .upstream import UpstreamError, error_from_response, sse_events

log = logging.getLogger("tokenslice.sidecar.driver")

CHUNK_PATH = "/v1/completions"
"""Every continuation chunk is a token-id completion; ``ChunkTarget.chunk_url`` ends with it."""


@dataclass(slots=True)
class ChunkTarget:
    """Where chunks go and who this driver is."""

    session: aiohttp.ClientSession
    vllm_url: str
    chunk_url: str
    """``.../v1/completions`` of the gateway, or of the local vLLM when there is no gateway."""
    advertise: str
    key: bytes = field(repr=False)
    timeout: aiohttp.ClientTimeout


async def tokenize(target: ChunkTarget, plan: Plan, max_model_len: int | None = None) -> tuple[list[int], int]:
    """Prompt token ids exactly as unchunked vLLM would build them, and the model's context length.

    A token-id prompt needs no call once the context length is known (``max_model_len``).
    """
    if isinstance(plan.prompt, list) and max_model_len:
        return list(plan.prompt), max_model_len
    try:
        async with target.session.post(f"{target.vllm_url}/tokenize", json=tokenize_body(plan),
                                       timeout=target.timeout) as resp:
            if resp.status != 200:
                raise await error_from_response(resp, "vLLM /tokenize")
            data = await resp.json()
    except asyncio.TimeoutError:  # first: aiohttp's socket timeouts are connection errors too
        raise UpstreamError.timeout("vLLM /tokenize") from None
    except aiohttp.ClientConnectionError as exc:
        raise UpstreamError.unreachable("vLLM", exc) from None
    ids = plan.prompt if isinstance(plan.prompt, list) else data["tokens"]
    return list(ids), int(data["max_model_len"])


@dataclass(slots=True)
class Generation:
    """One client request's chunk loop; iterate ``run()`` for the deltas the client sees."""

    target: ChunkTarget
    plan: Plan
    request_id: str
    tenant: str
    priority_class: str
    chunk_size: int
    prompt_ids: list[int]
    max_model_len: int
    metrics: SidecarMetrics
    generated: list[int] = field(default_factory=list)
    model: str = ""
    system_fingerprint: str | None = None
    chunks: int = 0
    kv_holder: str = ""
    since_clean: list[int] = field(default_factory=list)
    """Generated ids after the last point known to end on a character boundary with all text emitted."""
    text_since_clean: str = ""

    def budget(self) -> int:
        """Completion tokens this request may produce in total."""
        room = self.max_model_len - len(self.prompt_ids)
        if room <= 0:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt contains {len(self.prompt_ids)} tokens, leaving no room for completion tokens.",
                "messages" if self.plan.endpoint == "chat" else "prompt")
        wanted = self.plan.max_tokens
        if wanted is None:
            return room
        if wanted > room:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {wanted} output tokens and your prompt contains {len(self.prompt_ids)} input "
                f"tokens, for a total of {wanted + len(self.prompt_ids)} tokens.", "max_tokens")
        return wanted

    def _chunk_body(self, max_tokens: int) -> dict[str, Any]:
        plan = self.plan
        body = dict(plan.chunk_params)
        body.update(prompt=self.prompt_ids + self.generated, max_tokens=max_tokens, stream=True,
                    return_token_ids=True, request_id=f"{self.request_id}-{self.chunks}")
        left = plan.min_tokens - len(self.generated)
        if left > 0:
            body["min_tokens"] = left
        if plan.seed is not None:
            body["seed"] = chunk_seed(plan.seed, len(self.generated))
        if plan.logprobs is not None:
            body["logprobs"] = plan.logprobs
        return body

    async def _repair_boundary(self, text: str, ids: list[int]) -> tuple[str, bool]:
        """The text unchunked vLLM would emit, where a chunk boundary may have split a character.

        vLLM primes its detokenizer (tokenizers' DecodeStream) with the chunk's prompt; when that
        prompt ends inside a multi-byte character, the event completing the character carries the
        decoded *whole context* instead of the new text.  Only checked when the previous chunk did
        not end on an event known to be clean (one token, text emitted); the new text is then
        re-derived with /detokenize from the last clean point.  Returns the text and whether the
        clean point was moved past this event.
        """
        base, emitted = self.since_clean, self.text_since_clean
        decoded = await asyncio.gather(*(_detokenize(self.target, base + ids[:j], self.plan.model)
                                         for j in range(len(ids) + 1)))
        if decoded[0] == emitted and not emitted.endswith("\ufffd"):
            self.since_clean.clear()  # the boundary was clean after all
            self.text_since_clean = ""
            return text, False
        for j in range(len(ids), 0, -1):  # the token at which vLLM emitted: the last one that completes text
            if not decoded[j].endswith("\ufffd") and len(decoded[j]) > len(emitted) \
                    and decoded[j].startswith(emitted):
                new = decoded[j][len(emitted):]
                if text.endswith(new):
                    self.since_clean, self.text_since_clean = list(ids[j:]), ""
                    return new, True
                break
        log.warning("request %s: unexpected text at a chunk boundary; keeping vLLM's", self.request_id)
        return text, False

    async def _tokens_covering(self, ids: list[int], chars: int) -> int:
        context = (self.prompt_ids + self.generated)[-8:]
        return await _tokens_covering(self.target, context, ids, chars, self.plan.model)

    async def run(self) -> AsyncIterator[Delta]:
        budget = self.budget()
        scanner = StopScanner(self.plan.stops, self.plan.include_stop_str, self.plan.min_tokens)
        last_end: float | None = None
        while True:
            remaining = budget - len(self.generated)
            slice_ = min(self.chunk_size, remaining)
            data = json.dumps(self._chunk_body(slice_), separators=(",", ":")).encode()
            headers = ChunkHeaders(request_id=self.request_id, chunk_index=self.chunks, tenant=self.tenant,
                                   priority_class=self.priority_class, generated=len(self.generated),
                                   prompt_tokens=len(self.prompt_ids), slice=slice_, kv_holder=self.kv_holder,
                                   body_digest=contract.body_digest(CHUNK_PATH, data)).sign(self.target.key)
            headers["Content-Type"] = "application/json"
            if self.chunks == 0:
                hashes = contract.encode_prefix_hashes(contract.prefix_hashes(self.prompt_ids))
                if hashes:
                    headers[PREFIX_HASHES] = hashes
            text_base = len(scanner.text)
            produced = 0
            started = time.monotonic()
            first_token = True
            dirty = bool(self.since_clean)  # the context may end inside a character
            end: Delta | None = None
            self.metrics.chunks.inc()
            self.metrics.inflight.inc()
            try:
                async with self.target.session.post(self.target.chunk_url, data=data, headers=headers,
                                                    timeout=self.target.timeout) as resp:
                    if resp.status != 200:
                        raise await error_from_response(resp, "chunk upstream")
                    self.kv_holder = resp.headers.get(SERVED_BY) or self.target.advertise
                    finish: str | None = None
                    async for event in sse_events(resp):
                        choices = event.get("choices")
                        if "system_fingerprint" in event:
                            self.system_fingerprint = event["system_fingerprint"]
                        if not choices or finish is not None:
                            continue  # read on to [DONE] so the connection is reused for the next chunk
                        if not self.model:
                            self.model = event.get("model") or ""
                        choice = choices[0]
                        ids = choice.get("token_ids") or []
                        if first_token and ids:
                            first_token = False
                            if last_end is not None:
                                self.metrics.pause.observe(time.monotonic() - last_end)
                        raw = choice.get("text") or ""
                        moved = False
                        if dirty and raw:
                            dirty = False
                            raw, moved = await self._repair_boundary(raw, ids)
                        if moved:
                            pass
                        elif raw and len(ids) == 1:
                            self.since_clean.clear()
                            self.text_since_clean = ""
                        else:
                            self.since_clean.extend(ids)
                            self.text_since_clean += raw
                        start = len(scanner.text)
                        text, stop = scanner.feed(raw, len(ids))
                        lp = _rebased(choice.get("logprobs"), text_base)
                        if stop is not None:
                            resp.close()  # abort the rest of this chunk upstream: the generation is over
                            if len(ids) > 1:  # vLLM merged tokens into one event: keep those up to the stop
                                keep = await self._tokens_covering(ids, scanner.stop_end - start)
                                ids = ids[:keep]
                                lp = {k: v[:keep] for k, v in lp.items()} if lp else lp
                            self.generated.extend(ids)
                            yield Delta(text, ids, lp, "stop", stop)
                            return
                        produced += len(ids)
                        self.generated.extend(ids)
                        finish = choice.get("finish_reason")
                        if finish is None:
                            if text or ids:
                                yield Delta(text, ids, lp)
                        elif finish == "length" and produced == slice_ and len(self.generated) < budget:
                            yield Delta(text, ids, lp)  # the slice is used up: a chunk boundary, not an end
                        elif finish in ("stop", "length"):
                            end = Delta(text + scanner.flush(), ids, lp, finish, choice.get("stop_reason"))
                            yield end
                        else:
                            raise UpstreamError(500, openai_error(500, f"chunk ended with finish_reason {finish!r}"))
                    if finish is None:
                        raise UpstreamError(502, openai_error(502, "chunk stream ended without a finish_reason",
                                                              err_type="UpstreamError"))

            except asyncio.TimeoutError:  # first: aiohttp's socket timeouts are connection errors too
                self.metrics.errors.labels("chunk").inc()
                raise UpstreamError.timeout("chunk upstream") from None
            except aiohttp.ClientConnectionError as exc:
                self.metrics.errors.labels("chunk").inc()
                raise UpstreamError.unreachable("chunk upstream", exc) from None
            except UpstreamError:
                self.metrics.errors.labels("chunk").inc()
                raise
            finally:
                self.metrics.inflight.dec()
            last_end = time.monotonic()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request %s chunk %d: %d tokens in %.1f ms from %s", self.request_id, self.chunks,
                          produced, 1000 * (last_end - started), self.kv_holder)
            self.metrics.chunk_latency.observe(last_end - started)
            self.metrics.chunk_tokens.observe(produced)
            self.chunks += 1
            if end is not None:
                return


async def _detokenize(target: ChunkTarget, tokens: list[int], model: str | None) -> str:
    body: dict[str, Any] = {"tokens": tokens}
    if model:
        body["model"] = model
    try:
        async with target.session.post(f"{target.vllm_url}/detokenize", json=body, timeout=target.timeout) as r:
            if r.status != 200:
                raise await error_from_response(r, "vLLM /detokenize")
            return (await r.json())["prompt"]
    except asyncio.TimeoutError:  # first: aiohttp's socket timeouts are connection errors too
        raise UpstreamError.timeout("vLLM /detokenize") from None
    except aiohttp.ClientConnectionError as exc:
        raise UpstreamError.unreachable("vLLM", exc) from None


async def _tokens_covering(target: ChunkTarget, context: list[int], ids: list[int], chars: int,
                           model: str | None) -> int:
    """How many of ``ids`` it takes to produce ``chars`` characters of text after ``context``.

    vLLM sometimes merges several tokens into one stream event; when a stop string completes
    inside such an event, the tokens after the completing one must not count (as vLLM
    itself drops them).  The per-token text lengths are recovered with /detokenize.
    """

    async def length(tokens: list[int]) -> int:
        return len(await _detokenize(target, tokens, model))

    try:
        lengths = await asyncio.gather(*(length(context + ids[:j]) for j in range(len(ids) + 1)))
    except (aiohttp.ClientError, asyncio.TimeoutError, UpstreamError) as exc:
        log.warning("cannot split a merged stream event (%s); counting all its tokens", exc)
        return len(ids)
    for j in range(1, len(ids) + 1):
        if lengths[j] - lengths[0] >= chars:
            return j
    return len(ids)


def _rebased(logprobs: dict[str, list[Any]] | None, text_base: int) -> dict[str, list[Any]] | None:
    """A chunk's completions logprobs with ``text_offset`` counted from the start of the whole completion."""
    if not logprobs:
        return None
    if text_base and logprobs.get("text_offset"):
        logprobs = dict(logprobs)
        logprobs["text_offset"] = [o + text_base for o in logprobs["text_offset"]]
    return logprobs
