"""Uncertainty weighting (Kendall et al., 2018), as TorchJD's ``UW`` scalariser."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import LossScalarisation, as_vector, torchjd_class


class Uncertainty(LossScalarisation):
    """``sum_t 0.5 exp(-s_t) w_t L_t + 0.5 s_t`` with learned log-variances ``s_t`` (start at 0),
    learned by the model's optimiser with the non-encoder learning rate. No options."""

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.uw = torchjd_class("scalarization", "UW", self.name)(len(self.tasks))

    def optimised_parameters(self) -> list[nn.Parameter]:
        return list(self.uw.parameters())

    def combine(self, values: Tensor) -> Tensor:
        return self.uw(as_vector(values))
