"""Endpoint choice for one chunk: filters -> weighted scorers -> picker (as in the GIE EPP)."""

from gateway_ext.scheduling.cost_model import CostModel
from gateway_ext.scheduling.profile import Decision, PickContext, SchedulerProfile, default_profile

__all__ = ["CostModel", "Decision", "PickContext", "SchedulerProfile", "default_profile"]
