"""PCGrad (Yu et al., 2020), TorchJD's Gramian form of gradient surgery."""

from __future__ import annotations

from typing import Any

from .base import GradientAggregation, make_aggregator, torchjd_class


class PCGrad(GradientAggregation):
    """Projects each task gradient off the normal plane of every task gradient it conflicts with,
    then sums them. No options (TorchJD's deterministic variant: all task orders averaged)."""

    name = "pcgrad"

    def build_aggregator(self) -> Any:
        cls = torchjd_class("aggregation", "PCGrad", self.name)
        return make_aggregator(self.name, lambda: cls())
