"""Aligned-MTL (Senushkin et al., 2023), via TorchJD."""

from __future__ import annotations

from typing import Any

from .base import GradientAggregation, make_aggregator, torchjd_class


class AlignedMTL(GradientAggregation):
    """Aligns the principal components of the task gradients so that the update has condition
    number 1. No options."""

    name = "aligned_mtl"

    def build_aggregator(self) -> Any:
        cls = torchjd_class("aggregation", "AlignedMTL", self.name)
        return make_aggregator(self.name, lambda: cls())
