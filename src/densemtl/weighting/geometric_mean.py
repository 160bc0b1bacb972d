"""Geometric mean of the task losses (MultiNet++'s geometric loss strategy), via TorchJD."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import LossScalarisation, as_vector, torchjd_class


class GeometricMean(LossScalarisation):
    """``(prod_t w_t L_t)^(1/T)``: each task's gradient is scaled by the inverse of its loss, so
    tasks with small losses are not drowned out. Losses must be non-negative. No options."""

    name = "geometric_mean"

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.scalariser = torchjd_class("scalarization", "GeometricMean", self.name)()

    def combine(self, values: Tensor) -> Tensor:
        return self.scalariser(as_vector(values))
