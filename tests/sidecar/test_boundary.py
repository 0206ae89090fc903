"""Chunk boundaries inside a multi-byte character, without an engine (BoundaryRepair).

The engine is modelled by the rule docs/sidecar.md states and the real-vLLM suite checks
(``test_multibyte_characters_split_at_boundaries``): vLLM's incremental detokenizer emits the text a
token completes; when a chunk's prompt ends inside a character, the event that completes it carries
the decoded *whole context* instead.  Tokens here are bytes (a byte-level vocabulary), so every
character of more than one byte can be split by a boundary.
"""

from __future__ import annotations

import pytest

from tokenslice_sidecar.boundary import BoundaryRepair

PROMPT = list(b"Say: ")
TEXTS = ["é☃日本語ü", "a☃b", "日本", "ascii only", "ü" * 5 + "x" + "語"]


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def vllm_events(context: list[int], ids: list[int], merge: int) -> list[tuple[str, list[int]]]:
    """The events of one chunk with prompt ``context``: (text, token ids), ``merge`` tokens per event."""
    mid_char = decode(context).endswith("\ufffd")
    shown = decode(context) if not mid_char else None
    per_token = []
    for i in range(len(ids)):
        full = decode(context + ids[:i + 1])
        if full.endswith("\ufffd"):
            per_token.append("")
        elif shown is None:  # the documented quirk: the whole context, prompt included
            per_token.append(full)
            shown = full
        else:
            per_token.append(full[len(shown):])
            shown = full
    return [("".join(per_token[i:i + merge]), ids[i:i + merge]) for i in range(0, len(ids), merge)]


class CountingDetokenizer:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ids: list[int]) -> str:
        self.calls += 1
        return decode(ids)


async def chunked_text(generated: list[int], chunk: int, merge: int, repair: BoundaryRepair | None) -> str:
    """The text the driver hands on, chunk by chunk (``repair=None``: vLLM's text kept as is)."""
    out = ""
    for start in range(0, len(generated), chunk):
        if repair:
            repair.start_chunk()
        for text, ids in vllm_events(PROMPT + generated[:start], generated[start:start + chunk], merge):
            out += await repair.feed(text, ids) if repair else text
    return out


@pytest.mark.parametrize("merge", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("text", TEXTS)
async def test_chunked_text_equals_unchunked(text, chunk, merge):
    generated = list(text.encode())
    unchunked = await chunked_text(generated, len(generated), merge, None)
    assert unchunked == text
    assert await chunked_text(generated, chunk, merge, BoundaryRepair(CountingDetokenizer())) == text


async def test_the_model_shows_the_fault_being_repaired():
    """Without the repair, a boundary inside a character leaks the whole context into the text."""
    generated = list("a☃b".encode())  # ☃ is 3 bytes: a chunk of 2 ends inside it
    broken = await chunked_text(generated, 2, 1, None)
    assert broken != "a☃b" and broken.count("Say:") == 1


async def test_ascii_never_calls_detokenize():
    detok = CountingDetokenizer()
    assert await chunked_text(list(b"plain ascii text"), 3, 1, BoundaryRepair(detok)) == "plain ascii text"
    assert detok.calls == 0


async def test_a_boundary_that_was_clean_after_all_costs_one_check():
    """Tokens without text (a merged event) before a boundary make it suspect; one check clears it."""
    detok = CountingDetokenizer()
    repair = BoundaryRepair(detok)
    assert await repair.feed("ab", [97, 98]) == "ab"  # two tokens in one event: not known clean
    repair.start_chunk()
    assert await repair.feed("c", [99]) == "c"
    calls = detok.calls
    repair.start_chunk()
    assert await repair.feed("d", [100]) == "d"
    assert calls > 0 and detok.calls == calls  # clean point re-established: no further calls
