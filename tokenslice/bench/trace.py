"""The arrival trace: every request of a run, with its send time, fixed by the scenario's seed.

Generated once and replayed against every system, so the baselines and
tokenslice see exactly the same requests at exactly the same offsets.  Each
stream draws from its own generator (seeded by scenario seed + stream name), so
adding a stream does not reshuffle the others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenslice.bench.scenario import Arrivals, Scenario, Stream

# Plain words for prompts: with the tiny byte-level BPE most are one or two tokens, so a prompt of N words is
# roughly N tokens (the real count comes back in `usage` and is what the report uses).
_WORDS = (
    "time slice token chunk engine request queue tenant batch model cache block prefix decode prefill "
    "river mountain garden window orange yellow purple silver golden copper marble paper pencil table "
    "chair lamp clock bridge tower harbor island forest desert valley meadow ocean planet comet rocket "
    "signal number letter story music rhythm melody poem novel chapter market bakery coffee butter bread "
    "apple cherry lemon mango peach grape melon onion pepper carrot potato tomato winter summer autumn "
    "spring morning evening night shadow light cloud storm thunder rain snow wind stone sand glass metal "
    "wood cotton wool silk engine motor wheel gear lever spring anchor sail rope knot ladder hammer nail"
).split()


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of the trace (``at`` = seconds after the run starts)."""

    index: int
    at: float
    stream: str
    tenant: str
    priority_class: str
    prompt: str
    prompt_words: int
    max_tokens: int
    ignore_eos: bool


def arrival_times(arrivals: Arrivals, window_s: float, rng: random.Random) -> list[float]:
    """Send offsets in [start_s, stop_s) of a Poisson process, or of Poisson-timed bursts."""
    stop = min(arrivals.stop_s or window_s, window_s)
    times: list[float] = []
    if arrivals.process == "poisson":
        t = arrivals.start_s + rng.expovariate(arrivals.rate)
        while t < stop:
            times.append(t)
            t += rng.expovariate(arrivals.rate)
    else:
        burst_rate = arrivals.rate / arrivals.burst_size
        t = arrivals.start_s + rng.expovariate(burst_rate)
        while t < stop:
            times.extend([t] * arrivals.burst_size)
            t += rng.expovariate(burst_rate)
    return times


def _prompt(rng: random.Random, words: int, tag: str) -> str:
    # The tag makes every prompt's first block unique, so no two requests share a cached prefix by accident.
    return tag + " " + " ".join(rng.choice(_WORDS) for _ in range(max(0, words - 1)))


def stream_requests(scenario: Scenario, stream: Stream) -> list[tuple[float, str, int, int]]:
    rng = random.Random(f"{scenario.seed}:{stream.name}")
    out = []
    for n, at in enumerate(arrival_times(stream.arrivals, scenario.window_s, rng)):
        words = stream.prompt_tokens.sample(rng)
        out.append((at, _prompt(rng, words, f"{stream.name}-{scenario.seed}-{n}:"), words,
                    stream.output_tokens.sample(rng)))
    return out


def build_trace(scenario: Scenario, streams: list[str] | None = None) -> list[TraceRequest]:
    """All requests of the scenario (or of the named streams only), ordered by send time."""
    rows = []
    for stream in scenario.streams:
        if streams is not None and stream.name not in streams:
            continue
        for at, prompt, words, max_tokens in stream_requests(scenario, stream):
            rows.append((at, stream, prompt, words, max_tokens))
    rows.sort(key=lambda r: (r[0], r[1].name))
    return [TraceRequest(index=i, at=at, stream=s.name, tenant=s.tenant, priority_class=s.priority_class,
                         prompt=prompt, prompt_words=words, max_tokens=max_tokens, ignore_eos=s.ignore_eos)
            for i, (at, s, prompt, words, max_tokens) in enumerate(rows)]
