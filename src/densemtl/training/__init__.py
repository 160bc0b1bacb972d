"""Training: the LightningModule, optimisers and schedules, CLI, reports, prediction."""

from .module import MultiTaskModule

__all__ = ["MultiTaskModule"]
