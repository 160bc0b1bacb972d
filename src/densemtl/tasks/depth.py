"""Depth: metres per pixel, BerHu on the official normalised inverse depth, error metrics.

The official heads regress ``d = 65536 / (100 D + 1)`` with D in metres (depth in centimetres,
inverted and scaled). We keep that parametrisation so that official checkpoints work, and convert
at the boundary (``decode``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ..functional import as_4d, weighted_mean
from ..io import colour_ramp
from .base import Task, TaskLoss, TaskMetric

_EPS = 1e-12


def depth_to_inverse(depth_m: Tensor) -> Tensor:
    """Metres -> the official normalised inverse depth 65536 / (100 D + 1)."""
    return 65536.0 / (100.0 * depth_m + 1.0)


def inverse_to_depth(inv: Tensor, eps: float = 1e-6) -> Tensor:
    """The official normalised inverse depth -> metres (exact inverse, clamped at 0)."""
    return (655.36 / inv.clamp_min(eps) - 0.01).clamp_min(0.0)


def berhu(err: Tensor, c: Tensor) -> Tensor:
    """Reverse Huber of the absolute error ``err`` with threshold ``c`` (a 0-dim tensor).

    ``err`` if ``err <= c`` else ``(err^2 + c^2) / (2c)``. ``c = 0`` (a perfect batch) is
    handled: the result is then ``err`` (= 0) with finite gradients.
    """
    c = c.clamp_min(_EPS)
    return torch.where(err <= c, err, (err * err + c * c) / (2.0 * c))


class BerHuLoss(TaskLoss):
    """BerHu on the normalised inverse depth, target ``depth_to_inverse(D)`` where ``D > 0``.

    The threshold is ``c = threshold * max|err|`` over the valid pixels of the whole batch,
    detached and kept on the device.

    reduction:
        ``"valid"`` (default) averages over valid pixels. ``"all"`` reproduces the official
        normalisation: the sum over valid pixels divided by *every* pixel of the supervised
        samples (invalid pixels count as zeros), which scales the loss by the valid fraction.
    """

    def __init__(self, threshold: float = 0.2, reduction: Literal["valid", "all"] = "valid"):
        super().__init__()
        if threshold <= 0:
            raise ValueError(f"BerHu threshold must be > 0, got {threshold}")
        if reduction not in ("valid", "all"):
            raise ValueError(f"BerHu reduction must be 'valid' or 'all', got {reduction!r}")
        self.threshold = threshold
        self.reduction = reduction

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = as_4d(target).float()
        valid = (target > 0) & torch.isfinite(target)
        weight = valid.float() * mask.unsqueeze(1)
        # invalid pixels get a finite dummy target; their error is zeroed by the mask
        inv = depth_to_inverse(torch.where(valid, target, torch.ones_like(target)))
        err = (pred - inv).abs() * weight
        c = self.threshold * err.detach().amax()
        loss = berhu(err, c)
        if self.reduction == "all":
            denom = mask.sum() * target[0].numel()
            return weighted_mean(loss, weight, denom)
        return weighted_mean(loss, weight)


class DepthMetric(TaskMetric):
    """Depth errors in metres over valid pixels: ``min_depth < gt < max_depth`` (gt = 0 invalid).

    The prediction is clamped to ``[min_depth, max_depth]`` (after optional per-image median
    scaling). ``reduction="pixel"`` (default) pools every valid pixel of the dataset;
    ``"image"`` averages per-image values over images that have valid pixels (the official way,
    with RMSE = sqrt of the mean per-image MSE, likewise RMSE-log).
    """

    task = "depth"
    directions: ClassVar[dict[str, bool]] = {
        "absRel": False, "sqRel": False, "rmse": False, "rmseLog": False,
        "delta1": True, "delta2": True, "delta3": True}
    fractions: ClassVar[frozenset[str]] = frozenset({"delta1", "delta2", "delta3"})
    units: ClassVar[dict[str, str]] = {"sqRel": "m", "rmse": "m"}
    _NAMES = ("absRel", "sqRel", "mse", "mseLog", "delta1", "delta2", "delta3")

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 80.0,
                 reduction: Literal["pixel", "image"] = "pixel", median_scaling: bool = False,
                 decoded: bool = False, **kwargs: Any) -> None:
        super().__init__(decoded=decoded, **kwargs)
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got ({min_depth}, {max_depth})")
        if reduction not in ("pixel", "image"):
            raise ValueError(f"depth reduction must be 'pixel' or 'image', got {reduction!r}")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.reduction = reduction
        self.median_scaling = median_scaling
        self.add_state("sums", torch.zeros(len(self._NAMES), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        gt = as_4d(target).float()
        pred = as_4d(pred).float()
        valid = (gt > self.min_depth) & (gt < self.max_depth) & mask.unsqueeze(1)
        if self.median_scaling:
            nan = torch.full_like(gt, float("nan"))
            med_gt = torch.nanmedian(torch.where(valid, gt, nan).flatten(1), dim=1).values
            med_pred = torch.nanmedian(torch.where(valid, pred, nan).flatten(1), dim=1).values
            scale = med_gt / med_pred.clamp_min(1e-12)
            scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
            pred = pred * scale.view(-1, 1, 1, 1)
        # invalid pixels become p = g = 1: zero error terms; the delta terms are masked
        one = torch.ones_like(gt)
        g = torch.where(valid, gt, one)
        p = torch.where(valid, pred.clamp(self.min_depth, self.max_depth), one)
        diff = p - g
        sq = diff * diff
        ratio = torch.maximum(p / g, g / p)
        per_pixel = [
            diff.abs() / g,
            sq / g,
            sq,
            (torch.log(p) - torch.log(g)) ** 2,
            *((ratio < 1.25**k) & valid for k in (1, 2, 3)),
        ]
        # per-image fp32 sums (pairwise / tree reductions), accumulated in fp64
        sums = torch.stack([q.sum(dim=(1, 2, 3), dtype=torch.float32) for q in per_pixel], 1)
        sums = sums.double()  # [B,7]
        n = valid.sum(dim=(1, 2, 3)).double()  # [B]
        if self.reduction == "image":
            self.sums += (sums / n.clamp_min(1).unsqueeze(1)).sum(0)
            self.count += (n > 0).sum()
        else:
            self.sums += sums.sum(0)
            self.count += n.sum()

    def compute(self) -> dict[str, Tensor]:
        m = dict(zip(self._NAMES, self.sums / self.count))
        return {"absRel": m["absRel"], "sqRel": m["sqRel"], "rmse": m["mse"].sqrt(),
                "rmseLog": m["mseLog"].sqrt(), "delta1": m["delta1"], "delta2": m["delta2"],
                "delta3": m["delta3"]}


def source_depth_range(batch: Mapping[str, Tensor], key: str = "depth") -> tuple[Tensor, Tensor]:
    """Min and max of a batch's depth labels in the network's units (normalised inverse depth),
    over valid pixels (``depth > 0``, finite, ``has_depth``); ``(0, 1)`` if none is valid.
    Stays on the device (no host sync).
    """
    if key not in batch:
        raise KeyError(f"aligning depth needs the source batch's '{key}' labels")
    depth = batch[key].float()
    valid = (depth > 0) & torch.isfinite(depth)
    has = batch.get(f"has_{key}")
    if has is not None:
        valid &= has.to(device=depth.device, dtype=torch.bool).view(-1, *[1] * (depth.dim() - 1))
    inv = depth_to_inverse(torch.where(valid, depth, torch.ones_like(depth)))
    lo = torch.where(valid, inv, torch.full_like(inv, math.inf)).amin()
    hi = torch.where(valid, inv, torch.full_like(inv, -math.inf)).amax()
    ok = torch.isfinite(lo) & torch.isfinite(hi) & (hi > lo)
    return torch.where(ok, lo, torch.zeros_like(lo)), torch.where(ok, hi, torch.ones_like(hi))


def colourise_depth(depth: np.ndarray, vmin: float | None = None,
                    vmax: float | None = None) -> np.ndarray:
    """Metres [H,W] (or [1,H,W]) -> uint8 [H,W,3]; near is dark, invalid (<= 0) is black.

    The range defaults to the 2nd..98th percentile of the valid pixels.
    """
    depth = np.asarray(depth, dtype=np.float32).squeeze()
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        return np.zeros((*depth.shape, 3), dtype=np.uint8)
    lo = float(np.percentile(depth[valid], 2)) if vmin is None else vmin
    hi = float(np.percentile(depth[valid], 98)) if vmax is None else vmax
    rgb = colour_ramp(np.where(valid, depth, lo), lo, hi)
    rgb[~valid] = 0
    return rgb


class DepthTask(Task):
    """Metres float32 [1,H,W] (0 = invalid); one output channel (normalised inverse depth)."""

    name = "depth"
    short = "D"
    loss = BerHuLoss
    metric = DepthMetric
    main_metric = "rmse"

    def decode(self, raw: Tensor) -> Tensor:
        """Normalised inverse depth -> metres [B,1,H,W]."""
        return inverse_to_depth(raw)

    def check_label(self, label: Tensor, num_classes: int | None = None) -> str | None:
        if not bool(torch.isfinite(label).all()) or label.min() < 0:
            return f"'{self.label_key}' must be finite and >= 0 (0 = invalid)"
        return None

    def random_label(self, batch: int, height: int, width: int, channels: int,
                     generator: torch.Generator) -> Tensor:
        return torch.rand(batch, 1, height, width, generator=generator) * 60 + 1

    def colour_range(self, label: np.ndarray) -> tuple[float, float] | None:
        """A prediction is coloured on its ground truth's 2nd..98th percentile range."""
        valid = label[label > 0]
        if not valid.size:
            return None
        return float(np.percentile(valid, 2)), float(np.percentile(valid, 98))

    def colourise(self, value: np.ndarray, palette: np.ndarray | None = None,
                  colour_range: Any = None) -> np.ndarray:
        return colourise_depth(value, *(colour_range or (None, None)))

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        valid = label[(label > 0) & torch.isfinite(label)].double()
        return torch.stack([valid.sum(), torch.tensor(float(valid.numel()))])

    def constant(self, stats: Tensor) -> float:
        return float(stats[0] / stats[1]) if stats[1] > 0 else 1.0  # the mean valid depth

    def describe_constant(self, value: Any, class_names: Sequence[str] | None = None) -> str:
        return f"{float(value):.3f} m everywhere (the mean training depth)"

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        return depth_to_inverse(torch.full((shape[0], 1, *shape[1:]), self.constant(stats)))

    def domain_channels(self, channels: int) -> int:
        return 1

    def domain_context(self, source_batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The source batch's ground-truth range: both domains' maps are scaled by it."""
        return source_depth_range(source_batch, self.label_key)

    def domain_map(self, raw: Tensor, context: Any = None) -> Tensor:
        """``(relu(x) - lo) / (hi - lo)``: the predicted inverse depth in the source GT range."""
        if context is None:
            raise ValueError("the depth map needs the source depth range (domain_context)")
        lo, hi = context
        return (torch.relu(raw) - lo) / (hi - lo)
