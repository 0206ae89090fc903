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
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from tokenslice import contract
from tokenslice.contract import PREFIX_HASHES, ChunkHeaders
from tokenslice.errors import openai_error

from .boundary import BoundaryRepair, Detokenize
from .metrics import SidecarMetrics
from .openai_stream import Delta
from .requests import Plan, RequestError, chunk_seed
from .stops import StopScanner
from .vllm import CHUNK_PATH, ChunkStream, UpstreamError, VllmClient

log = logging.getLogger("tokenslice.sidecar.driver")

@dataclass(slots=True)
class Generation:
    """One client request's chunk loop; iterate ``run()`` for the deltas the client sees."""

    client: VllmClient
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
    finished: bool = False
    """The generation reached its real end (stop, EOS, budget); no further chunk is issued."""
    max_failovers: int = 3
    """Chunks that may fail by a fault of the serving side (``UpstreamError.fault``) and be run again."""
    failover_backoff_s: float = 0.5
    """Pause before failover n: n times this (the gateway learns meanwhile that an endpoint is gone)."""

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
            return min(room, self.plan.max_tokens_ceiling or room)
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
        if left > 0:  # what is still owed, within this chunk's slice (vLLM refuses min_tokens > max_tokens)
            body["min_tokens"] = min(left, max_tokens)
        if plan.seed is not None:
            body["seed"] = chunk_seed(plan.seed, len(self.generated))
        if plan.logprobs is not None:
            body["logprobs"] = plan.logprobs
        return body

    def _chunk_headers(self, slice_: int, data: bytes) -> dict[str, str]:
        """Signed headers binding this chunk's slice and body (``data``, as sent) to the request."""
        headers = ChunkHeaders(request_id=self.request_id, chunk_index=self.chunks, tenant=self.tenant,
                               priority_class=self.priority_class, generated=len(self.generated),
                               prompt_tokens=len(self.prompt_ids), slice=slice_, kv_holder=self.kv_holder,
                               body_digest=contract.body_digest(CHUNK_PATH, data)).sign(self.client.key)
        headers["Content-Type"] = "application/json"
        if self.chunks == 0:
            hashes = contract.encode_prefix_hashes(contract.prefix_hashes(self.prompt_ids))
            if hashes:
                headers[PREFIX_HASHES] = hashes
        return headers

    async def _detokenize(self, ids: list[int]) -> str:
        return await self.client.detokenize(ids, self.plan.model)

    async def run(self) -> AsyncIterator[Delta]:
        """For each chunk: stream it, repair its boundary text, scan for stops, yield what the client sees."""
        budget = self.budget()
        scanner = StopScanner(self.plan.stops, self.plan.include_stop_str, self.plan.min_tokens)
        repair = BoundaryRepair(self._detokenize)
        last_end: float | None = None
        failovers = 0
        while not self.finished:
            slice_ = min(self.chunk_size, budget - len(self.generated))
            before = len(self.generated)
            started = time.monotonic()
            repair.start_chunk()
            self.metrics.chunks.inc()
            self.metrics.inflight.inc()
            try:
                data = json.dumps(self._chunk_body(slice_), separators=(",", ":")).encode()
                async with self.client.stream_chunk(data, self._chunk_headers(slice_, data)) as chunk:
                    self.kv_holder = chunk.served_by
                    deltas = self._chunk_deltas(chunk, slice_, budget, scanner, repair, last_end)
                    async with aclosing(deltas):
                        async for delta in deltas:
                            yield delta
            except UpstreamError as exc:
                self.metrics.errors.labels("chunk").inc()
                if exc.fault is None or failovers >= self.max_failovers:
                    raise
                failovers += 1
                self.metrics.failovers.labels(exc.fault).inc()
                log.warning("request %s: chunk %d failed after %d of its tokens (%s); resuming from token %d, "
                            "failover %d of %d", self.request_id, self.chunks, len(self.generated) - before, exc,
                            len(self.generated), failovers, self.max_failovers)
                self.kv_holder = ""  # the holder may be the part that died: the gateway places the rest
                self.chunks += 1
                await asyncio.sleep(self.failover_backoff_s * failovers)
                continue
            finally:
                self.metrics.inflight.dec()
            last_end = time.monotonic()
            produced = len(self.generated) - before
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request %s chunk %d: %d tokens in %.1f ms from %s", self.request_id, self.chunks,
                          produced, 1000 * (last_end - started), self.kv_holder)
            self.metrics.chunk_latency.observe(last_end - started)
            self.metrics.chunk_tokens.observe(produced)
            self.chunks += 1

    async def _chunk_deltas(self, chunk: ChunkStream, slice_: int, budget: int, scanner: StopScanner,
                            repair: BoundaryRepair, last_end: float | None) -> AsyncIterator[Delta]:
        """The deltas of one chunk; sets ``finished`` when the generation ends in it."""
        text_base = len(scanner.text)
        produced = 0
        finish: str | None = None
        async with aclosing(chunk.events()) as events:
            async for event in events:
                if "system_fingerprint" in event:
                    self.system_fingerprint = event["system_fingerprint"]
                choices = event.get("choices")
                if not choices or finish is not None:
                    continue  # read on to [DONE] so the connection is reused for the next chunk
                self.model = self.model or event.get("model") or ""
                choice = choices[0]
                ids = choice.get("token_ids") or []
                if ids and produced == 0 and last_end is not None:
                    self.metrics.pause.observe(time.monotonic() - last_end)
                raw = await repair.feed(choice.get("text") or "", ids)
                start = len(scanner.text)
                text, stop = scanner.feed(raw, len(ids))
                lp = _rebased(choice.get("logprobs"), text_base)
                if stop is not None:
                    await chunk.aclose()  # abort the rest of this chunk upstream: the generation is over
                    if len(ids) > 1:  # vLLM merged tokens into one event: keep those up to the stop
                        context = (self.prompt_ids + self.generated)[-8:]
                        keep = await tokens_covering(self._detokenize, context, ids, scanner.stop_end - start)
                        ids = ids[:keep]
                        lp = {k: v[:keep] for k, v in lp.items()} if lp else lp
                    self.generated.extend(ids)
                    self.finished = True
                    yield Delta(text, ids, lp, "stop", stop)
                    return
                produced += len(ids)
                self.generated.extend(ids)
                finish = choice.get("finish_reason")
                if finish is None:
                    if text or ids:
                        yield Delta(text, ids, lp)
                elif finish == "length" and len(self.generated) < budget:
                    # a chunk boundary, not an end: the slice is used up, or the picker cut it short (a
                    # "length" before the slice and the budget end has no other cause)
                    if produced < slice_:
                        self.metrics.slices_cut.inc()
                    if text or ids or lp:
                        yield Delta(text, ids, lp)
                elif finish in ("stop", "length"):
                    self.finished = True
                    yield Delta(text + scanner.flush(), ids, lp, finish, choice.get("stop_reason"))
                else:
                    raise UpstreamError(500, openai_error(500, f"chunk ended with finish_reason {finish!r}"))
        if finish is None:
            raise UpstreamError.broken("chunk stream ended without a finish_reason")


async def tokens_covering(detokenize: Detokenize, context: list[int], ids: list[int], chars: int) -> int:
    """How many of ``ids`` it takes to produce ``chars`` characters of text after ``context``.

    vLLM sometimes merges several tokens into one stream event; when a stop string completes
    inside such an event, the tokens after the completing one must not count (as vLLM
    itself drops them).  The per-token text lengths are recovered with /detokenize.
    """
    try:
        texts = await asyncio.gather(*(detokenize(context + ids[:j]) for j in range(len(ids) + 1)))
    except UpstreamError as exc:
        log.warning("cannot split a merged stream event (%s); counting all its tokens", exc)
        return len(ids)
    for j in range(1, len(ids) + 1):
        if len(texts[j]) - len(texts[0]) >= chars:
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
