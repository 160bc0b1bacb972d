"""Fixed weights: the sum of the weighted task losses (the paper's training objective)."""

from __future__ import annotations

from torch import Tensor

from .base import LossScalarisation


class Fixed(LossScalarisation):
    """``sum_t w_t L_t`` with the loss's fixed weights ``w_t`` (``loss.weights``). No options."""

    name = "fixed"
    linear = True

    def combine(self, values: Tensor) -> Tensor:
        return values.sum()
