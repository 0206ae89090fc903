"""The migration cost model: wait for the KV holder, or recompute the prefix on an idle endpoint.

    recompute_seconds = (prompt_tokens + generated_tokens) / prefill_tokens_per_second
    expected_wait     = (floor(ahead / slots) + 1) * mean_chunk_seconds(holder)

With residency awareness (``scheduling.residency``) only the context the holder still has in its GPU
cache counts (``resident_tokens``): a continuation whose KV was evicted recomputes it on the holder
too, so moving it costs nothing extra and any free endpoint is as good as waiting.

``ahead`` is the number of queued chunks bound to the same holder that precede this one in the
dispatch order; every slot of the holder is busy (otherwise there is nothing to decide), so even
with nothing ahead the chunk waits about one chunk duration.  ``mean_chunk_seconds`` is an EWMA of
the holder's observed chunk durations.  Migrate when ``expected_wait > recompute_seconds``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModel:
    prefill_tokens_per_second: float = 4000.0

    def recompute_seconds(self, prompt_tokens: int, generated: int) -> float:
        return (prompt_tokens + generated) / self.prefill_tokens_per_second

    @staticmethod
    def expected_wait(ahead: int, slots: int, mean_chunk_s: float) -> float:
        return (ahead // max(1, slots) + 1) * mean_chunk_s

    def should_migrate(self, *, prompt_tokens: int, generated: int, ahead: int, slots: int,
                       mean_chunk_s: float, resident_tokens: int | None = None) -> bool:
        """``resident_tokens``: context the holder serves from cache (None: assume all of it)."""
        recompute = (self.recompute_seconds(prompt_tokens, generated) if resident_tokens is None
                     else resident_tokens / self.prefill_tokens_per_second)
        return self.expected_wait(ahead, slots, mean_chunk_s) > recompute
