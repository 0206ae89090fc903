"""Jain's fairness index: the one definition, used by the picker's live gauge and the benchmark report."""

from __future__ import annotations

from collections.abc import Iterable


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 = perfectly fair, 1/n = one takes all.

    Every value given counts, zeros included: a tenant that was owed service and got none is the
    unfairness being measured (callers pass only the tenants that wanted service). With nothing to
    compare -- no values, or all zero -- nobody was treated unfairly: 1.0, so a live gauge never
    shows NaN and the report and the picker agree.
    """
    xs = [float(x) for x in values]
    square_sum = sum(x * x for x in xs)
    if not xs or square_sum == 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * square_sum)
