"""Training: the LightningModule, optimisers and schedules, CLI, reports, prediction."""

from .module import MultiTaskModule
from .uda import AdaptationModule

__all__ = ["AdaptationModule", "MultiTaskModule"]
