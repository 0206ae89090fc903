"""A scheduling profile: the filters, weighted scorers and picker that place one chunk."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.scheduling import filters, scorers
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.pickers import max_score_picker

Filter = Callable[[PickContext, list[Endpoint]], list[Endpoint]]
Scorer = Callable[[PickContext, list[Endpoint]], list[float] | None]
Picker = Callable[[list[Endpoint], list[float], int], Endpoint]


@dataclass(slots=True)
class Decision:
    endpoint: Endpoint | None
    """None: no free candidate now (the chunk waits)."""
    migrated: bool = False


@dataclass
class SchedulerProfile:
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker = max_score_picker
    prefix_scorer: scorers.PrefixAffinityScorer = field(default_factory=scorers.PrefixAffinityScorer)
    driver_scorer: scorers.DriverAffinityScorer = field(default_factory=scorers.DriverAffinityScorer)
    _rotation: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self, ctx: PickContext, candidates: list[Endpoint]) -> Decision:
        """Run filters then scorers then the picker over the pool members ``candidates``."""
        for f in self.filters:
            candidates = f(ctx, candidates)
            if not candidates:
                return Decision(None)
        if len(candidates) == 1:
            return Decision(candidates[0], ctx.migrating)
        total = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            scores = scorer(ctx, candidates)
            if scores is not None:
                for i, s in enumerate(scores):
                    total[i] += weight * s
        return Decision(self.picker(candidates, total, next(self._rotation)), ctx.migrating)


def default_profile(*, load_weight: float = 1.0, prefix_weight: float = 2.0, kv_cache_weight: float = 0.5,
                    driver_weight: float = 0.5) -> SchedulerProfile:
    prefix = scorers.PrefixAffinityScorer()
    driver = scorers.DriverAffinityScorer()
    return SchedulerProfile(
        filters=[filters.kv_holder_filter, filters.free_slot_filter],
        scorers=[(scorers.least_load_scorer, load_weight), (prefix, prefix_weight),
                 (scorers.kv_cache_scorer, kv_cache_weight), (driver, driver_weight)],
        prefix_scorer=prefix, driver_scorer=driver)
