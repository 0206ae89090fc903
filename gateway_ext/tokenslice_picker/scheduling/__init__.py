"""Endpoint choice for one chunk: filters -> weighted scorers -> picker (as in the GIE EPP)."""

from tokenslice_picker.scheduling.affinity import Verdict, holder_verdict
from tokenslice_picker.scheduling.context import PickContext
from tokenslice_picker.scheduling.cost_model import CostModel
from tokenslice_picker.scheduling.profile import (
           Decision,
           SchedulerProfile,
           default_profile,
)
from tokenslice_picker.scheduling.victims import (
           LowestClassFirst,
           Preemption,
           VictimSelector,
)

__all__ = ["CostModel", "Decision", "LowestClassFirst", "PickContext", "Preemption", "SchedulerProfile", "Verdict",
           "VictimSelector", "default_profile", "holder_verdict"]
