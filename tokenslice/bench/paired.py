"""Two systems of one bench run, request by request: is one's latency tail really worse than the other's?

Every system of a run replays the same trace, so request *i* of system A and request *i* of system B
arrived at the same offset with the same prompt and output lengths.  Comparing their p99s alone is
weak when a stream has ~100 requests (the p99 is the second slowest request); the pairs say more:

* how many pairs B lost (B slower than A) and the two-sided sign-test p-value of that count;
* the median paired difference;
* a bootstrap interval of the p99 difference (pairs resampled together, fixed seed).

    python -m tokenslice.bench.paired RESULTS.json SYSTEM_A SYSTEM_B [--stream hi] [--metric ttft]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenslice.bench.stats import percentile


@dataclass(frozen=True, slots=True)
class Paired:
    n: int
    b_slower: int
    sign_p: float
    """Two-sided sign-test p-value (ties dropped): how likely a split this uneven is if neither is worse."""
    median_diff: float
    """Median of B - A over the pairs (seconds)."""
    a_p: tuple[float, float, float]
    b_p: tuple[float, float, float]
    """p50 / p90 / p99 of A and of B over the paired requests."""
    p99_diff_ci: tuple[float, float]
    """95% bootstrap interval of p99(B) - p99(A)."""


def sign_test(wins: int, n: int) -> float:
    """Two-sided binomial p-value of ``wins`` successes in ``n`` fair coin flips."""
    if n == 0:
        return 1.0
    k = min(wins, n - wins)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> Paired:
    """``a[i]`` and ``b[i]`` are one request's latency under system A and system B."""
    if len(a) != len(b) or not a:
        raise ValueError("need the same non-zero number of paired values")
    diffs = [y - x for x, y in zip(a, b)]
    untied = [d for d in diffs if d != 0]
    slower = sum(1 for d in untied if d > 0)
    rng = random.Random(seed)
    idx = range(len(a))
    boot = []
    for _ in range(resamples):
        pick = [rng.choice(idx) for _ in idx]
        boot.append(percentile([b[i] for i in pick], 99) - percentile([a[i] for i in pick], 99))
    return Paired(n=len(a), b_slower=slower, sign_p=sign_test(slower, len(untied)),
                  median_diff=statistics.median(diffs),
                  a_p=(percentile(a, 50), percentile(a, 90), percentile(a, 99)),
                  b_p=(percentile(b, 50), percentile(b, 90), percentile(b, 99)),
                  p99_diff_ci=(percentile(boot, 2.5), percentile(boot, 97.5)))


def pairs_from_results(results: dict, system_a: str, system_b: str, *, stream: str,
                       metric: str = "ttft") -> tuple[list[float], list[float]]:
    """The paired values of one stream from a bench ``results.json``; requests either system did not
    finish (no value) are left out of both."""
    by_label = {s["summary"]["label"]: s for s in results["systems"]}
    for label in (system_a, system_b):
        if label not in by_label:
            raise KeyError(f"system {label!r} is not in the results ({', '.join(by_label)})")

    def values(label: str) -> dict[int, float]:
        return {r["index"]: r[metric] for r in by_label[label]["requests"]
                if r["stream"] == stream and r.get(metric) is not None}
    va, vb = values(system_a), values(system_b)
    common = sorted(va.keys() & vb.keys())
    return [va[i] for i in common], [vb[i] for i in common]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenslice.bench.paired", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a bench run's results.json")
    parser.add_argument("system_a")
    parser.add_argument("system_b")
    parser.add_argument("--stream", default="hi", help="the stream compared (default hi)")
    parser.add_argument("--metric", default="ttft", choices=("ttft", "e2e", "tpot", "longest_pause"))
    args = parser.parse_args(argv)
    a, b = pairs_from_results(json.loads(args.results.read_text()), args.system_a, args.system_b,
                              stream=args.stream, metric=args.metric)
    p = compare(a, b)
    print(f"{args.stream} {args.metric}: {p.n} paired requests")
    print(f"  {args.system_a}: p50 {p.a_p[0]:.3f} p90 {p.a_p[1]:.3f} p99 {p.a_p[2]:.3f} s")
    print(f"  {args.system_b}: p50 {p.b_p[0]:.3f} p90 {p.b_p[1]:.3f} p99 {p.b_p[2]:.3f} s")
    print(f"  {args.system_b} slower in {p.b_slower} of {p.n} pairs (sign test p = {p.sign_p:.3f}); "
          f"median difference {p.median_diff * 1e3:+.0f} ms")
    lo, hi = p.p99_diff_ci
    print(f"  p99 difference, 95% bootstrap interval: [{lo * 1e3:+.0f}, {hi * 1e3:+.0f}] ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
