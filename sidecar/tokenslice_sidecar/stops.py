"""Stop strings over the whole generation, not one chunk.

vLLM checks stop strings only inside the text of one engine request, so a stop string
that starts in chunk k and ends in chunk k+1 is invisible to it.  The driver therefore
does all stop-string matching itself, with vLLM's own rules (vllm/v1/engine/detokenizer.py):
earliest-completing match wins, nothing is checked before ``min_tokens`` tokens, and while
a stop string could still be completing the last ``max(len(stop)) - 1`` characters are held
back so the client never sees stop text that is later cut off.
"""

from __future__ import annotations

import sys


def find_stop(text: str, new_chars: int, stops: list[str], include_in_output: bool) -> tuple[str, int] | None:
    """The stop string completing earliest in the last ``new_chars`` of ``text`` and where to cut.

    Returns ``(stop, cut)``: the text is truncated to ``text[:cut]``.  Mirrors vLLM's
    ``check_stop_strings`` so chunked and unchunked generation stop at the same place.
    """
    if not new_chars or not stops:
        return None
    best: str | None = None
    best_index = 0
    best_end = sys.maxsize
    for stop in stops:
        index = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if index == -1:
            continue
        end = index + len(stop)
        if end < best_end:
            best, best_index, best_end = stop, index, end
    if best is None:
        return None
    return best, (best_end if include_in_output else best_index)


class StopScanner:
    """Accumulates generated text, finds stop strings, and says what may be released to the client."""

    __slots__ = ("hold", "include_in_output", "min_tokens", "released", "stop_end", "stops", "text", "tokens")

    def __init__(self, stops: list[str], include_in_output: bool = False, min_tokens: int = 0) -> None:
        self.stops = stops
        self.include_in_output = include_in_output
        self.min_tokens = min_tokens
        self.hold = max(len(s) for s in stops) - 1 if stops and not include_in_output else 0
        self.text = ""
        self.released = 0
        self.tokens = 0
        self.stop_end = 0
        """Where the matched stop string ends in the untruncated text (which token completed it)."""

    def feed(self, text: str, num_tokens: int) -> tuple[str, str | None]:
        """Add the text of ``num_tokens`` new tokens; return (text to release now, matched stop)."""
        start = len(self.text)
        self.text += text
        self.tokens += num_tokens
        if self.stops and self.tokens > self.min_tokens and text:
            found = find_stop(self.text, len(self.text) - start, self.stops, self.include_in_output)
            if found is not None:
                stop, cut = found
                self.stop_end = cut if self.include_in_output else cut + len(stop)
                self.text = self.text[:cut]
                return self.flush(), stop
        end = len(self.text) - self.hold
        if end <= self.released:
            return "", None
        out = self.text[self.released:end]
        self.released = end
        return out, None

    def flush(self) -> str:
        """Release everything held back (the generation has ended)."""
        out = self.text[self.released:]
        self.released = len(self.text)
        return out
