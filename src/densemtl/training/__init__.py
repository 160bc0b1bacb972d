"""Training: the LightningModule, optimisers and schedules, CLI, reports, prediction."""

from .conflict import GradientConflict
from .module import MultiTaskModule
from .selfsup import SelfSupervisedDepthModule
from .uda import AdaptationModule

__all__ = ["AdaptationModule", "GradientConflict", "MultiTaskModule",
           "SelfSupervisedDepthModule"]
