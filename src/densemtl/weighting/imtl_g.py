"""IMTL-G (Liu et al., 2021), impartial multi-task learning of gradients, via TorchJD."""

from __future__ import annotations

from typing import Any

from .base import GradientAggregation, make_aggregator, torchjd_class


class IMTLG(GradientAggregation):
    """Finds the combination whose projections on every task gradient's direction are equal.
    No options."""

    name = "imtl_g"

    def build_aggregator(self) -> Any:
        cls = torchjd_class("aggregation", "IMTLG", self.name)
        return make_aggregator(self.name, lambda: cls())
