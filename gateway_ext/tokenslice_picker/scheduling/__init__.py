"""Endpoint choice for one chunk: filters -> weighted scorers -> picker (as in the GIE EPP)."""

from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.profile import Decision, PickContext, SchedulerProfile, default_profile

__all__ = ["CostModel", "Decision", "PickContext", "SchedulerProfile", "default_profile"]
