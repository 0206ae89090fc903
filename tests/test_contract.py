"""The chunk contract: what signs verifies, and nothing forged, altered or stale does."""

import time

import pytest

from tokenslice import contract
from tokenslice import contract as c

KEY = b"k" * 32


def chunk(**kw):
    base = dict(request_id="r1", chunk_index=3, tenant="batch-a", priority_class="batch",
                generated=96, prompt_tokens=12, slice=32, kv_holder="127.0.0.1:8001")
    base.update(kw)
    return c.ChunkHeaders(**base)


def test_round_trip():
    headers = chunk().sign(KEY)
    got = c.ChunkHeaders.verify(headers, KEY)
    assert got == chunk(expires=got.expires)
    assert all(c.is_internal_header(h) for h in headers)


@pytest.mark.parametrize("name,value", [
    (c.PRIORITY_CLASS, "interactive"),  # escalation
    (c.TENANT, "web"),                  # impersonation
    (c.KV_HOLDER, "10.0.0.9:80"),       # steering
    (c.GENERATED, "0"),                 # fair-share cheating
    (c.EXPIRES, "9999999999"),          # extending a captured header set
])
def test_any_altered_value_is_rejected(name, value):
    headers = chunk().sign(KEY)
    headers[name] = value
    with pytest.raises(c.ContractError, match="bad signature"):
        c.ChunkHeaders.verify(headers, KEY)


def test_wrong_key_unsigned_missing_expired():
    headers = chunk().sign(KEY)
    with pytest.raises(c.ContractError, match="bad signature"):
        c.ChunkHeaders.verify(headers, b"other")
    unsigned = {k: v for k, v in headers.items() if k != c.SIGNATURE}
    with pytest.raises(c.ContractError, match="unsigned"):
        c.ChunkHeaders.verify(unsigned, KEY)
    partial = {k: v for k, v in headers.items() if k != c.TENANT}
    with pytest.raises(c.ContractError, match="missing"):
        c.ChunkHeaders.verify(partial, KEY)
    stale = chunk(expires=int(time.time()) - 1).sign(KEY)
    with pytest.raises(c.ContractError, match="expired"):
        c.ChunkHeaders.verify(stale, KEY)


def test_admit_headers_cannot_pass_as_chunk_and_back():
    admit = c.AdmitHeaders("r1", "web", "interactive").sign(KEY)
    assert c.AdmitHeaders.verify(admit, KEY).priority_class == "interactive"
    with pytest.raises(c.ContractError):
        c.ChunkHeaders.verify(admit, KEY)
    with pytest.raises(c.ContractError, match="role"):
        c.AdmitHeaders.verify(chunk().sign(KEY), KEY)


def test_admit_chunk_size_round_trip_and_tamper():
    admit = c.AdmitHeaders("r1", "web", "interactive", chunk_size=16).sign(KEY)
    assert admit[c.SLICE] == "16"
    got = c.AdmitHeaders.verify(admit, KEY)
    assert got == c.AdmitHeaders("r1", "web", "interactive", got.expires, chunk_size=16)
    assert c.AdmitHeaders.verify(c.AdmitHeaders("r1", "web", "std").sign(KEY), KEY).chunk_size == 0  # default
    with pytest.raises(c.ContractError, match="bad signature"):  # a bigger slice is not the client's to choose
        c.AdmitHeaders.verify({**admit, c.SLICE: "4096"}, KEY)
    with pytest.raises(c.ContractError, match="missing"):  # always signed: absent is untrusted
        c.AdmitHeaders.verify({k: v for k, v in admit.items() if k != c.SLICE}, KEY)
    for bad in ("x", "-1"):
        forged = c.AdmitHeaders("r1", "web", "interactive").sign(KEY)
        forged[c.SLICE] = bad
        forged[c.SIGNATURE] = c._mac(KEY, [forged[h] for h in c.ADMIT_SIGNED])  # signed, yet malformed
        with pytest.raises(c.ContractError, match="malformed"):
            c.AdmitHeaders.verify(forged, KEY)


def test_load_key(tmp_path, monkeypatch):
    monkeypatch.delenv(c.KEY_ENV, raising=False)
    monkeypatch.delenv(c.KEY_FILE_ENV, raising=False)
    with pytest.raises(c.ContractError, match="no signing key"):
        c.load_key()
    f = tmp_path / "key"
    f.write_text("s" * 32 + "\n")
    assert c.load_key(key_file=f) == b"s" * 32
    f.write_text("")
    with pytest.raises(c.ContractError, match="empty"):
        c.load_key(key_file=f)
    with pytest.raises(c.ContractError, match="cannot read"):
        c.load_key(key_file=tmp_path / "absent")
    monkeypatch.setenv(c.KEY_ENV, "e" * 40)
    assert c.load_key() == b"e" * 40


@pytest.mark.parametrize("source", ["arg", "file", "env"])
def test_weak_keys_are_refused_and_never_echoed(tmp_path, monkeypatch, source):
    monkeypatch.delenv(c.KEY_FILE_ENV, raising=False)
    weak = "hunter2-is-weak"
    f = tmp_path / "key"
    f.write_text(weak)
    monkeypatch.setenv(c.KEY_ENV, weak)
    with pytest.raises(c.ContractError, match=f"at least {c.MIN_KEY_BYTES}") as err:
        c.load_key(**{"arg": {"key": weak}, "file": {"key_file": f}, "env": {}}[source])
    assert weak not in str(err.value)


def test_signature_binds_the_body_and_path():
    body = b'{"prompt":[1,2,3],"max_tokens":32}'
    headers = chunk(body_digest=c.body_digest("/v1/completions", body)).sign(KEY)
    assert c.ChunkHeaders.verify(headers, KEY).body_digest == c.body_digest("/v1/completions", body)
    assert c.body_digest("/v1/completions", body + b" ") != headers[c.BODY_DIGEST]
    assert c.body_digest("/v1/chat/completions", body) != headers[c.BODY_DIGEST]
    with pytest.raises(c.ContractError, match="bad signature"):  # another body's digest
        c.ChunkHeaders.verify({**headers, c.BODY_DIGEST: c.body_digest("/v1/completions", b"{}")}, KEY)


def test_chunks_live_briefly_and_a_grant_extends_only_the_granted_one():
    headers = chunk().sign(KEY)
    assert int(headers[c.EXPIRES]) - time.time() <= c.CHUNK_TTL_S
    later = time.time() + c.CHUNK_TTL_S + 60  # it waited a minute in the picker's queue
    with pytest.raises(c.ContractError, match="expired"):
        c.ChunkHeaders.verify(headers, KEY, now=later)
    with pytest.raises(c.ContractError, match="no valid grant"):
        c.ChunkHeaders.verify(headers, KEY, now=later, granted=True)
    granted = {**headers, c.GRANT: c.grant(headers, KEY, now=later)}
    assert c.ChunkHeaders.verify(granted, KEY, now=later + 1, granted=True).request_id == "r1"
    with pytest.raises(c.ContractError, match="expired grant"):
        c.ChunkHeaders.verify(granted, KEY, now=later + c.GRANT_TTL_S + 1, granted=True)
    other = chunk(chunk_index=4).sign(KEY)  # a grant is bound to one chunk's signature
    with pytest.raises(c.ContractError, match="no valid grant"):
        c.ChunkHeaders.verify({**other, c.GRANT: granted[c.GRANT]}, KEY, now=later, granted=True)
    with pytest.raises(c.ContractError, match="no valid grant"):  # and only the key holder makes one
        c.ChunkHeaders.verify({**headers, c.GRANT: c.grant(headers, b"x" * 32, now=later)}, KEY, now=later,
                              granted=True)


def test_seen_signatures_refuse_a_replay_and_forget_expired_ones():
    seen = c.SeenSignatures()
    assert seen.first_use("a", until=100, now=0)
    assert not seen.first_use("a", until=100, now=50)
    assert seen.first_use("b", until=200, now=50)
    assert seen.first_use("c", until=300, now=150) and len(seen) == 2  # "a" could no longer verify


def test_client_headers_are_internal():
    assert c.is_internal_header("x-tokenslice-anything")
    assert c.is_internal_header(c.DESTINATION_ENDPOINT)
    assert not c.is_internal_header("x-tenant-id")


def test_role_is_decided_by_the_role_header_alone():
    assert contract.role_of({contract.ROLE: contract.ROLE_CHUNK}) == contract.ROLE_CHUNK
    assert contract.role_of({contract.ROLE: contract.ROLE_ADMIT}) == contract.ROLE_ADMIT
    # a chunk index without the (signed) role is a client request: its internal headers get stripped
    assert contract.role_of({contract.CHUNK_INDEX: "3"}) is None
    assert contract.role_of({contract.ROLE: "root"}) is None


def test_prefix_hashes_round_trip_and_are_capped():
    ids = list(range(16 * 70 + 5))
    hashes = contract.prefix_hashes(ids)
    assert len(hashes) == contract.MAX_PREFIX_HASHES  # only full blocks, at most the cap
    assert contract.prefix_hashes(ids[:16 * 3 + 15]) == hashes[:3]  # chained: a prefix shares its hashes
    assert contract.decode_prefix_hashes(contract.encode_prefix_hashes(hashes)) == tuple(hashes)
    assert contract.decode_prefix_hashes(",".join(["x"] * 500)) == ("x",) * contract.MAX_PREFIX_HASHES
    assert contract.decode_prefix_hashes("") == ()


def test_one_openai_error_shape():
    from tokenslice.errors import openai_error

    assert openai_error(429, "full", code="queue_full") == {
        "error": {"message": "full", "type": "RateLimitError", "param": None, "code": "queue_full"}}
    assert openai_error(400, "bad", param="n")["error"] == {
        "message": "bad", "type": "BadRequestError", "param": "n", "code": 400}


def test_cut_orders_are_signed_and_short_lived():
    key = b"k" * 32
    headers = contract.CutHeaders("r1", 4, "priority").sign(key)
    got = contract.CutHeaders.verify(headers, key)
    assert (got.request_id, got.chunk_index, got.reason) == ("r1", 4, "priority")
    assert got.expires - time.time() <= contract.CUT_TTL_S
    with pytest.raises(contract.ContractError):
        contract.CutHeaders.verify(headers, b"other-key" * 4)
    with pytest.raises(contract.ContractError):
        contract.CutHeaders.verify({**headers, contract.CHUNK_INDEX: "5"}, key)
    with pytest.raises(contract.ContractError):  # a chunk's signature is no cut order
        contract.CutHeaders.verify(contract.ChunkHeaders("r1", 4, "t", "batch").sign(key), key)
