"""Pickers choose one endpoint from the scored candidates."""

from __future__ import annotations

from tokenslice_picker.datastore.endpoints import Endpoint


def max_score_picker(candidates: list[Endpoint], scores: list[float], rotation: int) -> Endpoint:
    """Highest total score; ties rotate (``rotation`` grows per decision) so equal pods share load."""
    best = max(scores)
    top = [e for e, s in zip(candidates, scores, strict=True) if s >= best - 1e-9]
    return top[rotation % len(top)]
