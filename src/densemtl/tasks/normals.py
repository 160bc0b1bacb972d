"""Surface normals: unit camera-frame vectors per pixel, 1 - cosine loss, angular metrics.

The label is float32 [3,H,W] in the camera frame (x right, y down, z forward), pointing towards
the camera; the 0-vector marks invalid pixels. Datasets without normals files derive them from
metric depth and the intrinsics ``K`` after the transforms (``derive``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..data.geometry import normals_from_depth
from ..functional import channel_sq_norm, safe_div, unit_vectors, weighted_mean
from .base import Task, TaskLoss, TaskMetric

_NORM_TOL = 1e-3


class NormalsLoss(TaskLoss):
    """``1 - cos`` between the (normalised) prediction and GT over pixels with a non-zero GT."""

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = target.float()
        valid = channel_sq_norm(target) > 0
        cos = (unit_vectors(pred) * unit_vectors(target)).sum(1)
        return weighted_mean(1.0 - cos, valid.float() * mask)


class NormalsMetric(TaskMetric):
    """Per-pixel angular error (degrees) over pixels with a non-zero ground-truth normal.

    Both vectors are normalised; the angle is ``2 atan2(|p - g|, |p + g|)`` (accurate near 0 and
    180 degrees). Pixel-pooled mean, RMSE and fractions under 11.25 / 22.5 / 30 degrees are exact;
    the median is read from a histogram with ``bin_width`` degrees (linear interpolation inside
    the bin), so it is within one bin width of the exact median.
    """

    task = "normals"
    directions: ClassVar[dict[str, bool]] = {
        "mean": False, "median": False, "rmse": False,
        "within11": True, "within22": True, "within30": True}
    fractions: ClassVar[frozenset[str]] = frozenset({"within11", "within22", "within30"})
    units: ClassVar[dict[str, str]] = {"mean": "degrees", "median": "degrees",
                                       "rmse": "degrees"}
    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, bin_width: float = 0.01, decoded: bool = False, **kwargs: Any) -> None:
        super().__init__(decoded=decoded, **kwargs)
        if not 0 < bin_width <= 180:
            raise ValueError(f"bin_width must be in (0, 180], got {bin_width}")
        self.bin_width = float(bin_width)
        self.num_bins = math.ceil(180.0 / bin_width - 1e-9)
        self.add_state("sums", torch.zeros(2 + len(self.THRESHOLDS), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        g = target.float()
        valid = (channel_sq_norm(g) > 0) & mask  # [B,H,W]
        p, g = unit_vectors(pred.float()), unit_vectors(g)
        angle = 2.0 * torch.atan2(channel_sq_norm(p - g).sqrt(), channel_sq_norm(p + g).sqrt())
        angle = torch.rad2deg(angle)
        angle = torch.where(valid, angle, torch.zeros_like(angle))
        stats = torch.stack([angle, angle * angle]
                            + [(angle < t).float() * valid for t in self.THRESHOLDS], dim=1)
        self.sums += stats.sum(dim=(0, 2, 3), dtype=torch.float64)
        self.count += valid.sum()
        index = (torch.nan_to_num(angle, nan=180.0) / self.bin_width).long()
        index = index.clamp(0, self.num_bins - 1)
        self.hist.index_add_(0, index.flatten(), valid.flatten().long())

    def _median(self) -> Tensor:
        cum = self.hist.cumsum(0).double()
        half = self.count.double() / 2
        k = torch.searchsorted(cum, half.reshape(1)).clamp(max=self.num_bins - 1)[0]
        below = torch.where(k > 0, cum[(k - 1).clamp_min(0)], torch.zeros_like(half))
        inside = safe_div(half - below, self.hist[k].double())
        median = (k.double() + inside) * self.bin_width
        return torch.where(self.count > 0, median, torch.full_like(median, float("nan")))

    def compute(self) -> dict[str, Tensor]:
        mean = self.sums / self.count
        out = {"mean": mean[0], "median": self._median(), "rmse": mean[1].sqrt()}
        for name, value in zip(("within11", "within22", "within30"), mean[2:]):
            out[name] = value
        return out


def colourise_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals [3,H,W] -> uint8 [H,W,3] as (n + 1) / 2; zero vectors are black."""
    n = np.asarray(normals, dtype=np.float32)
    rgb = np.empty((*n.shape[1:], 3), dtype=np.uint8)
    for c in range(3):  # one channel at a time: no float [H,W,3] volume for big images
        rgb[..., c] = np.rint(np.clip((n[c] + 1.0) * 127.5, 0, 255))
    rgb[(n == 0).all(axis=0)] = 0
    return rgb


class NormalsTask(Task):
    """Unit normals float32 [3,H,W]; three output channels (normalised by ``decode``)."""

    name = "normals"
    short = "N"
    label_channels = 3
    derived_from = ("depth", "K")
    default_channels = 3
    loss = NormalsLoss
    metric = NormalsMetric
    main_metric = "mean"

    def decode(self, raw: Tensor) -> Tensor:
        """Raw 3-vectors -> unit camera-frame normals [B,3,H,W]."""
        return unit_vectors(raw)

    def resize_label(self, label: Tensor, size: tuple[int, int]) -> Tensor:
        """Nearest resize, then renormalised (0-vectors stay 0)."""
        n = super().resize_label(label, size)
        return n / n.norm(dim=0, keepdim=True).clamp_min(1e-12)

    def hflip_label(self, label: Tensor) -> Tensor:
        """Mirrored maps also mirror the x component of every vector."""
        n = label.flip(-1).clone()
        n[0] = -n[0]
        return n

    def check_label(self, label: Tensor, num_classes: int | None = None) -> str | None:
        norm = label.norm(dim=0)
        if not bool(((norm < _NORM_TOL) | ((norm - 1).abs() < _NORM_TOL)).all()):
            return f"'{self.label_key}' must be unit vectors or 0 (invalid)"
        return None

    def derive(self, sample: Mapping[str, Any]) -> Tensor:
        """Normals from metric depth and the intrinsics of the sample's current size."""
        return normals_from_depth(sample["depth"], sample["K"])

    def random_label(self, batch: int, height: int, width: int, channels: int,
                     generator: torch.Generator) -> Tensor:
        return unit_vectors(torch.randn(batch, 3, height, width, generator=generator))

    def colourise(self, value: np.ndarray, palette: np.ndarray | None = None,
                  colour_range: Any = None) -> np.ndarray:
        return colourise_normals(value)

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        return label.double().sum(dim=(0, 2, 3))

    def constant(self, stats: Tensor) -> list[float]:
        n = stats if stats.norm() > 0 else torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
        return (n / n.norm()).tolist()  # the normalised mean normal

    def describe_constant(self, value: Any, class_names: Sequence[str] | None = None) -> str:
        x, y, z = (float(v) for v in value)
        return f"normal ({x:+.3f}, {y:+.3f}, {z:+.3f}) everywhere (the mean training normal)"

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        n = torch.tensor(self.constant(stats), dtype=torch.float32).view(1, 3, 1, 1)
        return n.expand(shape[0], 3, *shape[1:]).clone()

    def domain_channels(self, channels: int) -> int:
        return 3

    def domain_map(self, raw: Tensor, context: Any = None) -> Tensor:
        """Unit normals (zero vectors stay zero)."""
        return unit_vectors(raw)
