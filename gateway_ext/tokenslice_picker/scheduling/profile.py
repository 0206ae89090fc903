"""A scheduling profile: the filters, weighted scorers and picker that place one chunk or request,
and the plugins told when a placement starts and ends (GIE's PreRequest / PostResponse)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tokenslice_picker.datastore.endpoints import Endpoint
from tokenslice_picker.flowcontrol.chunk import Chunk, ClientRequest
from tokenslice_picker.scheduling import filters, scorers
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.pickers import max_score_picker
from tokenslice_picker.scheduling.victims import LowestClassFirst, VictimSelector

Filter = Callable[[PickContext, list[Endpoint]], list[Endpoint]]
"""Narrows the candidates; an empty list means "wait", raising ``NoEndpoints`` means "never here"."""
Scorer = Callable[[PickContext, list[Endpoint]], list[float] | None]
Picker = Callable[[list[Endpoint], list[float], int], Endpoint]


class LifecyclePlugin(Protocol):
    def on_grant(self, target: Chunk | ClientRequest, endpoint: Endpoint) -> None:
        """``target`` was placed on ``endpoint`` (a chunk got its slot, a request its driver)."""
        ...

    def on_done(self, target: Chunk | ClientRequest) -> None:
        """``target`` ended (a client request's response is over)."""
        ...


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
    plugins: list[LifecyclePlugin] = field(default_factory=list)
    victim_selector: VictimSelector | None = None
    """Preemption: picks a running chunk to cut for a waiter (None: never cut)."""
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

    def on_grant(self, target: Chunk | ClientRequest, endpoint: Endpoint) -> None:
        for plugin in self.plugins:
            plugin.on_grant(target, endpoint)

    def on_done(self, target: Chunk | ClientRequest) -> None:
        for plugin in self.plugins:
            plugin.on_done(target)


def default_profile(*, load_weight: float = 1.0, prefix_weight: float = 2.0, kv_cache_weight: float = 0.5,
                    driver_weight: float = 0.5) -> SchedulerProfile:
    prefix = scorers.PrefixAffinityScorer()
    driver = scorers.DriverAffinityScorer()
    return SchedulerProfile(
        filters=[filters.subset_hint_filter, filters.kv_holder_filter, filters.free_slot_filter],
        scorers=[(scorers.least_load_scorer, load_weight), (prefix, prefix_weight),
                 (scorers.kv_cache_scorer, kv_cache_weight), (driver, driver_weight)],
        plugins=[prefix, driver], victim_selector=LowestClassFirst())
