"""CAGrad (Liu et al., 2021), conflict-averse gradient descent, via TorchJD."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import GradientAggregation, make_aggregator, torchjd_class


class CAGrad(GradientAggregation):
    """Maximises the worst task improvement within a ball around the average gradient. Options:
    ``c`` (0.4, the ball's radius relative to the average gradient's norm). Needs cvxpy."""

    name = "cagrad"

    def __init__(self, tasks: Sequence[str], c: float = 0.4) -> None:
        self.options = {"c": float(c)}
        super().__init__(tasks)

    def build_aggregator(self) -> Any:
        cls = torchjd_class("aggregation", "CAGrad", self.name)
        return make_aggregator(self.name, lambda: cls(**self.options), "cvxpy")
