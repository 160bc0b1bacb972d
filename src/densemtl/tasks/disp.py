"""Self-supervised depth (``disp``): the depth head of the paper's semi-supervised setting.

The head outputs a disparity through a sigmoid, converted to metres with Monodepth2's rule
``1 / depth = 1 / max_depth + (1 / min_depth - 1 / max_depth) * sigmoid(raw)`` (0.1 m to
100 m). It learns from video (:mod:`densemtl.training.selfsup`), so its scale is arbitrary: it is
scored against the depth label with per-image median scaling by default. Its own loss is the
supervised part used only on samples that carry a depth label (none in the paper's setting).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..functional import as_4d, weighted_mean
from .base import Task, TaskLoss
from .depth import DepthMetric, DepthTask

MIN_DEPTH, MAX_DEPTH = 0.1, 100.0


def sigmoid_to_depth(sigma: Tensor, min_depth: float = MIN_DEPTH,
                     max_depth: float = MAX_DEPTH) -> Tensor:
    """A disparity in [0, 1] (the head's sigmoid) -> metres, in [min_depth, max_depth]."""
    return 1.0 / (1.0 / max_depth + (1.0 / min_depth - 1.0 / max_depth) * sigma)


def depth_to_sigmoid(depth: Tensor, min_depth: float = MIN_DEPTH,
                     max_depth: float = MAX_DEPTH) -> Tensor:
    """The inverse of :func:`sigmoid_to_depth` (depth clamped to the range)."""
    depth = depth.clamp(min_depth, max_depth)
    return (1.0 / depth - 1.0 / max_depth) / (1.0 / min_depth - 1.0 / max_depth)


class LogDepthL1Loss(TaskLoss):
    """|log(predicted depth) - log(label)| over the valid pixels (label > 0) of the samples
    that carry a depth label."""

    def __init__(self, min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH) -> None:
        super().__init__()
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = as_4d(target).float()
        valid = (target > 0) & torch.isfinite(target)
        weight = valid.float() * mask.unsqueeze(1)
        depth = sigmoid_to_depth(torch.sigmoid(pred), self.min_depth, self.max_depth)
        err = (depth.log() - torch.where(valid, target, torch.ones_like(target)).log()).abs()
        return weighted_mean(err * weight, weight)


class DispMetric(DepthMetric):
    """The depth errors of :class:`DepthMetric`, with per-image median scaling on by default
    (a depth learned from video has no scale of its own)."""

    task = "disp"

    def __init__(self, median_scaling: bool = True, **kwargs: Any) -> None:
        super().__init__(median_scaling=median_scaling, **kwargs)


class DispTask(DepthTask):
    """Depth learned without depth labels; scored on the ``depth`` label (metres)."""

    name = "disp"
    short = "D"
    label_key = "depth"
    shares_label = True
    loss = LogDepthL1Loss
    metric = DispMetric
    main_metric = "absRel"
    min_depth: ClassVar[float] = MIN_DEPTH
    max_depth: ClassVar[float] = MAX_DEPTH

    def disparity(self, raw: Tensor) -> Tensor:
        """The head's disparity in [0, 1] (what the smoothness term regularises)."""
        return torch.sigmoid(raw)

    def depth_from_disparity(self, disparity: Tensor) -> Tensor:
        """Disparity in [0, 1] -> metres."""
        return sigmoid_to_depth(disparity, self.min_depth, self.max_depth)

    def decode(self, raw: Tensor) -> Tensor:
        """Sigmoid disparity -> metres [B,1,H,W]."""
        return self.depth_from_disparity(self.disparity(raw))

    def build_loss(self, **options: Any) -> TaskLoss:
        return self.loss(**{"min_depth": self.min_depth, "max_depth": self.max_depth, **options})

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        depth = torch.full((shape[0], 1, *shape[1:]), self.constant(stats), dtype=torch.float64)
        return torch.logit(depth_to_sigmoid(depth, self.min_depth, self.max_depth),
                           eps=1e-6).float()

    domain_channels = Task.domain_channels
    domain_context = Task.domain_context
    domain_map = Task.domain_map
