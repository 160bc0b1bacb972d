"""UPGrad (Quinton and Rey, 2024): TorchJD's unconflicting projection of gradients."""

from __future__ import annotations

from typing import Any

from .base import GradientAggregation, make_aggregator, torchjd_class


class UPGrad(GradientAggregation):
    """Projects every task gradient onto the dual cone of all of them and averages the projections:
    the update never increases any task's loss to first order. No options (quadprog solver)."""

    name = "upgrad"

    def build_aggregator(self) -> Any:
        cls = torchjd_class("aggregation", "UPGrad", self.name)
        return make_aggregator(self.name, lambda: cls())
