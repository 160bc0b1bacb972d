"""Nash-MTL (Navon et al., 2022), a bargaining solution over task gradients, via TorchJD."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import GradientAggregation, make_aggregator, torchjd_class


class NashMTL(GradientAggregation):
    """Options: ``max_norm`` (1.0: the update's norm is clipped to it, 0 for no clipping),
    ``update_weights_every`` (1) and ``optim_niter`` (20). Needs cvxpy and ecos. Its state (the
    last weights, the solver's warm start) is not saved with checkpoints: it is rebuilt within
    one step after a resume."""

    name = "nash_mtl"

    def __init__(self, tasks: Sequence[str], max_norm: float = 1.0, update_weights_every: int = 1,
                 optim_niter: int = 20) -> None:
        self.options = {"n_tasks": len(tasks), "max_norm": float(max_norm),
                        "update_weights_every": int(update_weights_every),
                        "optim_niter": int(optim_niter)}
        super().__init__(tasks)

    def build_aggregator(self) -> Any:
        cls = torchjd_class("aggregation", "NashMTL", self.name)
        return make_aggregator(self.name, lambda: cls(**self.options), "cvxpy and ecos")
