"""MGDA (Désidéri, 2012; Sener and Koltun, 2018), TorchJD's Frank-Wolfe solver."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import GradientAggregation, make_aggregator, torchjd_class


class MGDA(GradientAggregation):
    """The minimum-norm convex combination of the task gradients. Options: ``epsilon`` (0.001) and
    ``max_iters`` (100) of the Frank-Wolfe solver."""

    name = "mgda"

    def __init__(self, tasks: Sequence[str], epsilon: float = 1e-3, max_iters: int = 100) -> None:
        self.options = {"epsilon": float(epsilon), "max_iters": int(max_iters)}
        super().__init__(tasks)

    def build_aggregator(self) -> Any:
        cls = torchjd_class("aggregation", "MGDA", self.name)
        return make_aggregator(self.name, lambda: cls(**self.options))
