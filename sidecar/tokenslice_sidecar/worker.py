"""What a worker checks before it runs a chunk, beyond the signature: body, slice, first use.

The signature proves the picker's peers wrote the headers; these checks make it prove the chunk too:
the body is the one the driver signed (``BODY_DIGEST``), it asks for no more decode tokens than the
signed slice (the picker charged for that many), and the signed headers run at most once here.
"""

from __future__ import annotations

import json
import time

from tokenslice import contract
from tokenslice.contract import ChunkHeaders, ContractError, SeenSignatures

CHUNK_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""vLLM endpoints a chunk may run on: token-id continuations, and unchunkable requests run as one chunk."""


def check_chunk(chunk: ChunkHeaders, signature: str, path: str, body: bytes, seen: SeenSignatures,
                now: float | None = None) -> None:
    """Raise ContractError unless ``body`` at ``path`` is what ``chunk`` signed, within its slice, unseen."""
    if contract.body_digest(path, body) != chunk.body_digest:
        raise ContractError("chunk body does not match its signed digest")
    try:
        data = json.loads(body)
    except ValueError:
        raise ContractError("chunk body is not JSON") from None
    if not isinstance(data, dict):
        raise ContractError("chunk body is not a JSON object")
    tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if type(tokens) is not int or tokens < 1:
        raise ContractError("a chunk must name its max_tokens")
    fanout = max(_count(data.get("n")), _count(data.get("best_of")))
    if tokens * fanout > chunk.slice:
        raise ContractError(f"chunk asks for {tokens} x {fanout} tokens, beyond its signed slice of {chunk.slice}")
    now = time.time() if now is None else now
    if not seen.first_use(signature, max(chunk.expires, now + contract.GRANT_TTL_S), now):
        raise ContractError("chunk already run (replayed)")


def _count(value: object) -> int:
    return value if type(value) is int and value > 1 else 1
