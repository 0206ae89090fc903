"""The chunk contract: the one definition of tokenslice's internal headers and their signing.

Every chunk of a request -- the first included -- travels as an HTTP request
driver sidecar -> gateway (Envoy + gateway_ext) -> worker sidecar, carrying the
headers below.  They decide routing (KV holder), priority and fair-share
accounting, so they are signed: an HMAC-SHA256 over the header values and an
expiry, keyed by a secret shared by the gateway and the sidecars of one pool.
A client never holds the key, so it can never forge a continuation, a tenant,
a priority class or a destination.  The gateway strips every ``x-tokenslice-*``
header and the destination header from client traffic before anything else.

A chunk's signature also covers a digest of its path and body (``BODY_DIGEST``) and its slice,
and lives ``CHUNK_TTL_S``; the worker runs only the signed body, only up to the signed slice, and
each signature once (``SeenSignatures``). A chunk that waited in the picker's queue longer than its
life carries the picker's short-lived ``GRANT`` instead. So a captured chunk can neither be altered
nor replayed into an unbounded generation.

The same scheme signs the *admission* headers the gateway puts on a client's
own request (tenant and class it resolved) so the driver can trust them.

Both sides import this module; nothing else may spell these header names.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "x-tokenslice-"

# --- header names -----------------------------------------------------------
REQUEST_ID = "x-tokenslice-request-id"
"""Stable id of the client request; every chunk of it carries the same value."""
CHUNK_INDEX = "x-tokenslice-chunk-index"
"""0 for the first chunk (prefill + first slice), then 1, 2, ..."""
TENANT = "x-tokenslice-tenant"
PRIORITY_CLASS = "x-tokenslice-class"
GENERATED = "x-tokenslice-generated"
"""Completion tokens generated before this chunk (fair-share and aging input)."""
PROMPT_TOKENS = "x-tokenslice-prompt-tokens"
"""Length of the original prompt in tokens (cost model input)."""
SLICE = "x-tokenslice-slice"
"""Decode tokens this chunk may produce (its max_tokens); on *admit* headers: the chunk size the
gateway chose for the request's class (0 = the sidecar's default)."""
KV_HOLDER = "x-tokenslice-kv-holder"
"""``host:port`` of the endpoint that served the previous chunk ('' for chunk 0)."""
EXPIRES = "x-tokenslice-expires"
"""Unix time (integer seconds) after which the signature is void."""
SIGNATURE = "x-tokenslice-signature"
MAX_TOKENS = "x-tokenslice-max-tokens"
"""On admit headers: the policy's ceiling on max_tokens (0 = none)."""
MAX_N = "x-tokenslice-max-n"
"""On admit headers: the policy's ceiling on n / best_of (0 = none)."""
ROLE = "x-tokenslice-role"
"""``chunk`` (driver -> worker) or ``admit`` (gateway -> driver, client request)."""
BODY_DIGEST = "x-tokenslice-body-digest"
"""SHA-256 of the chunk's path and exact body bytes (``body_digest``): binds a signature to one body."""
GRANT = "x-tokenslice-grant"
"""``<expires>:<mac>`` set by the picker when it routes a chunk: a fresh, short-lived stamp bound to the
chunk's signature, so a chunk that waited in the queue longer than its own life still runs once granted."""

# response headers set by the worker / gateway (informational, never trusted for routing)
SERVED_BY = "x-tokenslice-served-by"
QUEUE_WAIT_MS = "x-tokenslice-queue-wait-ms"
CHUNK_TOKENS = "x-tokenslice-chunk-tokens"
"""Optional response *trailer* from the worker: tokens the chunk produced (lets the gateway correct
its fair-share charge at once instead of at the next chunk; needs HTTP/2 or HTTP/1.1 trailers)."""

# unsigned scheduling hint (driver -> gateway, first chunk only): it can only move a chunk between
# pool members, never outside the pool, so it needs no signature
PREFIX_HASHES = "x-tokenslice-prefix-hashes"
"""Comma-separated hashes of the prompt's leading token blocks (prefix-cache affinity scoring)."""

# --- the Gateway API Inference Extension endpoint-picker protocol -----------
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
"""Header the EPP sets to the picked ``ip:port``; Envoy's ORIGINAL_DST cluster forwards there."""
LB_METADATA_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
OBJECTIVE_HEADERS = ("x-llm-d-router-inference-objective", "x-llm-d-inference-objective",
                     "x-gateway-inference-objective")
"""A client's InferenceObjective (GIE ``pkg/epp/metadata``; llm-d's newer names first, GIE's kept by llm-d as a
deprecated alias). tokenslice reads its value as a priority class name, granted only within the tenant's classes."""
FAIRNESS_ID_HEADERS = ("x-llm-d-router-inference-fairness-id", "x-llm-d-inference-fairness-id",
                       "x-gateway-inference-fairness-id")
"""A client's flow-control fairness id (same sources): read as the tenant, and trusted only as the policy's
tenant header is (``tokenslice.identity``)."""

ROLE_CHUNK = "chunk"
ROLE_ADMIT = "admit"
ROLE_CUT = "cut"

CUT_REASON = "x-tokenslice-cut-reason"
"""Why the picker revoked a running chunk (``priority``, ``fair_share``, ...): metrics label, signed."""

PREFIX_BLOCK = 16
"""Tokens per hashed prompt block (the picker only compares hashes, so any fixed size works)."""
MAX_PREFIX_HASHES = 64
"""At most this many block hashes travel (and are read) per request: bounds header size and work."""

# Headers covered by the signature for each role, in signing order.
CHUNK_SIGNED = (ROLE, REQUEST_ID, CHUNK_INDEX, TENANT, PRIORITY_CLASS, GENERATED,
                PROMPT_TOKENS, SLICE, KV_HOLDER, BODY_DIGEST, EXPIRES)
ADMIT_SIGNED = (ROLE, REQUEST_ID, TENANT, PRIORITY_CLASS, SLICE, MAX_TOKENS, MAX_N, EXPIRES)
CUT_SIGNED = (ROLE, REQUEST_ID, CHUNK_INDEX, CUT_REASON, EXPIRES)

CUT_TTL_S = 10
"""A cut order is acted on at once or never: a short life keeps a captured one from being replayed."""

DEFAULT_TTL_S = 300
"""Life of admit headers: the driver reads them once, on arrival, but the client may upload slowly."""
CHUNK_TTL_S = 30
"""Life of a chunk's signature from the driver to the picker. A captured chunk is worth little after it:
the worker then also wants the picker's ``GRANT`` (``GRANT_TTL_S``), and within it the body digest and the
slice bound what a replay can run to one slice of the very same tokens."""
GRANT_TTL_S = 10
"""Life of the picker's grant stamp: the time from routing to the worker reading the headers."""
MIN_KEY_BYTES = 32
"""Shortest signing key accepted anywhere (256 bits, the HMAC-SHA256 block strength we rely on)."""
KEY_ENV = "TOKENSLICE_SIGNING_KEY"
KEY_FILE_ENV = "TOKENSLICE_SIGNING_KEY_FILE"


class ContractError(ValueError):
    """A header set that must not be trusted (unsigned, forged, expired, malformed)."""


def check_key(key: bytes, source: str = "signing key") -> bytes:
    """``key`` if it is strong enough to sign with, else ContractError (naming the source, never the key)."""
    if len(key) < MIN_KEY_BYTES:
        raise ContractError(f"{source} is {len(key)} bytes; at least {MIN_KEY_BYTES} are required "
                            f"(e.g. `openssl rand -hex 32`)")
    return key


def load_key(key: str | bytes | None = None, key_file: str | os.PathLike[str] | None = None) -> bytes:
    """Resolve the signing key: explicit value, explicit file, $TOKENSLICE_SIGNING_KEY, or its _FILE.

    There is no fallback: a missing, empty or short key is a ContractError, so a part never starts
    signing with a key its peers do not share (which would refuse every chunk) or one easy to guess.
    """
    if key:
        return check_key(key.encode() if isinstance(key, str) else key)
    path = key_file or os.environ.get(KEY_FILE_ENV)
    if path:
        try:
            data = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ContractError(f"cannot read signing key file {path}: {exc.strerror}") from None
        if data:
            return check_key(data, f"signing key file {path}")
        raise ContractError(f"signing key file {path} is empty")
    env = os.environ.get(KEY_ENV)
    if env:
        return check_key(env.encode(), f"${KEY_ENV}")
    raise ContractError(f"no signing key: set {KEY_ENV} or {KEY_FILE_ENV}, or pass --signing-key-file")


def body_digest(path: str, body: bytes) -> str:
    """What ``BODY_DIGEST`` carries: the request path and body exactly as sent, hashed together."""
    h = hashlib.sha256(path.encode())
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


def _mac(key: bytes, values: list[str]) -> str:
    return hmac.new(key, "\n".join(values).encode(), hashlib.sha256).hexdigest()


@dataclass(slots=True)
class ChunkHeaders:
    """What one chunk claims about itself; trusted only once ``verify`` accepted it."""

    request_id: str
    chunk_index: int
    tenant: str
    priority_class: str
    generated: int = 0
    prompt_tokens: int = 0
    slice: int = 0
    kv_holder: str = ""
    body_digest: str = ""
    """``body_digest(path, body)`` of the chunk request; the worker refuses any other body."""
    expires: int = field(default_factory=lambda: int(time.time()) + CHUNK_TTL_S)

    def _values(self) -> dict[str, str]:
        return {
            ROLE: ROLE_CHUNK,
            REQUEST_ID: self.request_id,
            CHUNK_INDEX: str(self.chunk_index),
            TENANT: self.tenant,
            PRIORITY_CLASS: self.priority_class,
            GENERATED: str(self.generated),
            PROMPT_TOKENS: str(self.prompt_tokens),
            SLICE: str(self.slice),
            KV_HOLDER: self.kv_holder,
            BODY_DIGEST: self.body_digest,
            EXPIRES: str(self.expires),
        }

    def sign(self, key: bytes) -> dict[str, str]:
        """Headers to put on the chunk request, signature included."""
        values = self._values()
        values[SIGNATURE] = _mac(key, [values[h] for h in CHUNK_SIGNED])
        return values

    @classmethod
    def verify(cls, headers: Mapping[str, str], key: bytes, now: float | None = None, *,
               granted: bool = False) -> ChunkHeaders:
        """Parse and authenticate chunk headers (lower-case names); raise ContractError if untrusted.

        ``granted=True`` (the worker): a chunk whose own life ended while it waited in the picker's
        queue is still accepted when it carries a fresh ``GRANT`` the picker bound to its signature.
        """
        now = time.time() if now is None else now
        values = _checked(headers, key, CHUNK_SIGNED, ROLE_CHUNK, now, check_expiry=not granted)
        if granted and int(values[EXPIRES]) < now:
            check_grant(headers, key, now)
        try:
            return cls(
                request_id=values[REQUEST_ID],
                chunk_index=int(values[CHUNK_INDEX]),
                tenant=values[TENANT],
                priority_class=values[PRIORITY_CLASS],
                generated=int(values[GENERATED]),
                prompt_tokens=int(values[PROMPT_TOKENS]),
                slice=int(values[SLICE]),
                kv_holder=values[KV_HOLDER],
                body_digest=values[BODY_DIGEST],
                expires=int(values[EXPIRES]),
            )
        except ValueError as exc:
            raise ContractError(f"malformed chunk header: {exc}") from None


def grant(headers: Mapping[str, str], key: bytes, now: float | None = None) -> str:
    """The picker's ``GRANT`` value for a chunk it verified and routes now."""
    expires = int(time.time() if now is None else now) + GRANT_TTL_S
    return f"{expires}:{_mac(key, ['grant', headers[SIGNATURE], str(expires)])}"


def check_grant(headers: Mapping[str, str], key: bytes, now: float | None = None) -> None:
    """Raise ContractError unless ``headers`` carry a fresh grant bound to their signature."""
    value = headers.get(GRANT, "")
    expires, _, mac = value.partition(":")
    if not expires.isdigit() or not hmac.compare_digest(_mac(key, ["grant", headers.get(SIGNATURE, ""), expires]),
                                                        mac):
        raise ContractError("expired tokenslice headers and no valid grant")
    if int(expires) < (time.time() if now is None else now):
        raise ContractError("expired grant")


@dataclass(slots=True)
class AdmitHeaders:
    """The gateway's verdict on a client request: tenant, class, and the slice its chunks use.

    ``chunk_size`` is the resolved class's chunk size (``PriorityClass.chunkSize`` or the policy's
    ``chunkSize``), carried in the ``SLICE`` header and signed like the rest, so the policy -- not
    each sidecar's ``--chunk-size`` -- governs the time slice; 0 means "the sidecar's default".
    """

    request_id: str
    tenant: str
    priority_class: str
    expires: int = field(default_factory=lambda: int(time.time()) + DEFAULT_TTL_S)
    chunk_size: int = 0
    max_tokens: int = 0
    """The policy's ceiling on the request's max_tokens (``RequestLimits.max_tokens``); 0: none."""
    max_n: int = 0
    """The policy's ceiling on n / best_of; 0: none."""

    def sign(self, key: bytes) -> dict[str, str]:
        values = {
            ROLE: ROLE_ADMIT,
            REQUEST_ID: self.request_id,
            TENANT: self.tenant,
            PRIORITY_CLASS: self.priority_class,
            SLICE: str(self.chunk_size),
            MAX_TOKENS: str(self.max_tokens),
            MAX_N: str(self.max_n),
            EXPIRES: str(self.expires),
        }
        values[SIGNATURE] = _mac(key, [values[h] for h in ADMIT_SIGNED])
        return values

    @classmethod
    def verify(cls, headers: Mapping[str, str], key: bytes, now: float | None = None) -> AdmitHeaders:
        values = _checked(headers, key, ADMIT_SIGNED, ROLE_ADMIT, now)
        try:
            chunk_size, max_tokens, max_n = int(values[SLICE]), int(values[MAX_TOKENS]), int(values[MAX_N])
        except ValueError:
            raise ContractError("malformed admit header: chunk size or ceiling is not an integer") from None
        if min(chunk_size, max_tokens, max_n) < 0:
            raise ContractError("malformed admit header: negative chunk size or ceiling")
        return cls(values[REQUEST_ID], values[TENANT], values[PRIORITY_CLASS], int(values[EXPIRES]),
                   chunk_size=chunk_size, max_tokens=max_tokens, max_n=max_n)


@dataclass(slots=True)
class CutHeaders:
    """The picker's order to end one running chunk now (a revoked slice).

    Sent as ``POST CUT_PATH`` to the worker sidecar the chunk was routed to. The worker closes that
    chunk's vLLM stream (its full KV blocks stay in the prefix cache) and ends the chunk to the driver
    cleanly with the tokens generated so far, exactly like a slice end; the driver then continues from
    those token ids. Signed like the chunk headers, so only the picker can revoke a slice.
    """

    request_id: str
    chunk_index: int
    reason: str = "priority"
    expires: int = field(default_factory=lambda: int(time.time()) + CUT_TTL_S)

    def sign(self, key: bytes) -> dict[str, str]:
        values = {ROLE: ROLE_CUT, REQUEST_ID: self.request_id, CHUNK_INDEX: str(self.chunk_index),
                  CUT_REASON: self.reason, EXPIRES: str(self.expires)}
        values[SIGNATURE] = _mac(key, [values[h] for h in CUT_SIGNED])
        return values

    @classmethod
    def verify(cls, headers: Mapping[str, str], key: bytes, now: float | None = None) -> CutHeaders:
        values = _checked(headers, key, CUT_SIGNED, ROLE_CUT, now)
        try:
            return cls(values[REQUEST_ID], int(values[CHUNK_INDEX]), values[CUT_REASON], int(values[EXPIRES]))
        except ValueError as exc:
            raise ContractError(f"malformed cut header: {exc}") from None


def _checked(headers: Mapping[str, str], key: bytes, names: tuple[str, ...], role: str,
             now: float | None, *, check_expiry: bool = True) -> dict[str, str]:
    signature = headers.get(SIGNATURE)
    if not signature:
        raise ContractError("unsigned tokenslice headers")
    if headers.get(ROLE) != role:
        raise ContractError(f"role {headers.get(ROLE)!r} where {role!r} was expected")
    missing = [h for h in names if h not in headers]
    if missing:
        raise ContractError(f"missing signed header(s): {', '.join(missing)}")
    values = {h: headers[h] for h in names}
    if not hmac.compare_digest(_mac(key, [values[h] for h in names]), signature):
        raise ContractError("bad signature on tokenslice headers")
    try:
        expires = int(values[EXPIRES])
    except ValueError:
        raise ContractError("malformed expiry") from None
    if check_expiry and expires < (time.time() if now is None else now):
        raise ContractError("expired tokenslice headers")
    return values


class SeenSignatures:
    """Signatures already acted on, remembered until they could no longer be accepted anyway.

    Bounded by the signatures' lives: each entry is dropped once ``until`` has passed, when the
    contract would refuse the headers as expired in any case.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def first_use(self, signature: str, until: float, now: float | None = None) -> bool:
        """Record ``signature``; False when it was seen before (a replay)."""
        now = time.time() if now is None else now
        while self._heap and self._heap[0][0] < now:
            _, old = heapq.heappop(self._heap)
            self._until.pop(old, None)
        if signature in self._until:
            return False
        self._until[signature] = until
        heapq.heappush(self._heap, (until, signature))
        return True


def role_of(headers: Mapping[str, str]) -> str | None:
    """``ROLE_CHUNK``, ``ROLE_ADMIT``, ``ROLE_CUT`` or None for a client's own request (lower-case header names).

    One rule for every part: the (signed) role header alone decides. A request with the chunk role must
    then pass ``ChunkHeaders.verify`` or is refused; anything else is a client request, whose internal
    headers are stripped before they could route or escalate anything.
    """
    role = headers.get(ROLE)
    return role if role in (ROLE_CHUNK, ROLE_ADMIT, ROLE_CUT) else None


def prefix_hashes(ids: Sequence[int], block: int = PREFIX_BLOCK, limit: int = MAX_PREFIX_HASHES) -> list[str]:
    """Chained hashes of the prompt's leading full blocks: hash i names the whole prefix up to block i.

    The picker's prefix-affinity scorer remembers which endpoint served which hash, so a new request
    sharing a long prompt prefix (a system prompt, a conversation) is steered to the cache holding it.
    """
    out = []
    h = hashlib.blake2b(digest_size=8)
    for start in range(0, min(len(ids) // block, limit) * block, block):
        h.update(b",".join(str(t).encode() for t in ids[start:start + block]) + b";")
        out.append(h.copy().hexdigest())
    return out


def encode_prefix_hashes(hashes: Sequence[str]) -> str:
    """The ``PREFIX_HASHES`` header value (comma-separated, at most ``MAX_PREFIX_HASHES``)."""
    return ",".join(hashes[:MAX_PREFIX_HASHES])


def decode_prefix_hashes(value: str) -> tuple[str, ...]:
    """Inverse of ``encode_prefix_hashes``; tolerant of empties, capped like the encoder."""
    return tuple(h for h in value.split(",")[:MAX_PREFIX_HASHES] if h) if value else ()


def is_internal_header(name: str) -> bool:
    """True for headers a client must never be able to set (lower-case name)."""
    return name.startswith(PREFIX) or name == DESTINATION_ENDPOINT

# --- paths ------------------------------------------------------------------
SIDECAR_METRICS_PATH = "/tokenslice/metrics"
"""The sidecar's own Prometheus metrics; ``/metrics`` on the same port passes through to vLLM."""
CUT_PATH = "/tokenslice/v1/cut"
"""Worker sidecar endpoint the picker POSTs a signed ``CutHeaders`` to (200: cut, 404: not running)."""
