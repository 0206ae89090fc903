"""Text at chunk boundaries: the repair for a multi-byte character split across two chunks.

vLLM primes its detokenizer (tokenizers' ``DecodeStream``) with the chunk's prompt, so a chunk's text
continues the previous one exactly -- except when that prompt ends inside a multi-byte UTF-8
character: then the event that completes the character carries the decoded *whole context* instead of
the new text.  ``BoundaryRepair`` tracks the last point where the text is known to be complete (an
event of one token that carried text) and, at the first text event of a chunk that starts after such
a point, re-derives the new text with ``/detokenize``.  An ASCII stream never pays a call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("tokenslice.sidecar.boundary")

Detokenize = Callable[[list[int]], Awaitable[str]]
"""Token ids to text, as vLLM's ``/detokenize`` decodes them."""


class BoundaryRepair:
    """Feeds each stream event's text through; returns the text unchunked vLLM would have emitted."""

    __slots__ = ("_check", "_detokenize", "_since_clean", "_text_since_clean")

    def __init__(self, detokenize: Detokenize) -> None:
        self._detokenize = detokenize
        self._since_clean: list[int] = []
        """Generated ids after the last point known to end on a character boundary with all text emitted."""
        self._text_since_clean = ""
        self._check = False

    def start_chunk(self) -> None:
        """A new chunk begins: its prompt may end inside a character if tokens since the clean point exist."""
        self._check = bool(self._since_clean)

    async def feed(self, text: str, ids: list[int]) -> str:
        """The text of one event of the current chunk (``ids`` are the tokens it carries)."""
        if self._check and text:
            self._check = False
            repaired = await self._repair(text, ids)
            if repaired is not None:
                return repaired
        if text and len(ids) == 1:
            self._since_clean.clear()
            self._text_since_clean = ""
        else:
            self._since_clean.extend(ids)
            self._text_since_clean += text
        return text

    async def _repair(self, text: str, ids: list[int]) -> str | None:
        """The new text of the first event after a possibly split boundary; None: keep ``text``.

        Decodes the tokens since the clean point with each prefix of this event's tokens; the
        token at which vLLM emitted is the last one that completes text beyond what was emitted.
        """
        base, emitted = self._since_clean, self._text_since_clean
        decoded = await asyncio.gather(*(self._detokenize(base + ids[:j]) for j in range(len(ids) + 1)))
        if decoded[0] == emitted and not emitted.endswith("\ufffd"):
            self._since_clean.clear()  # the boundary was clean after all
            self._text_since_clean = ""
            return None
        for j in range(len(ids), 0, -1):
            if not decoded[j].endswith("\ufffd") and len(decoded[j]) > len(emitted) \
                    and decoded[j].startswith(emitted):
                new = decoded[j][len(emitted):]
                if text.endswith(new):
                    self._since_clean, self._text_since_clean = list(ids[j:]), ""
                    return new
                break
        log.warning("unexpected text at a chunk boundary; keeping vLLM's")
        return None
