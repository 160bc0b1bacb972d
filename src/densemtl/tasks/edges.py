"""Edges: binary boundary maps, class-weighted cross-entropy, tolerance-matched F-measures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import as_4d, safe_div, weighted_mean
from .base import Task, TaskLoss, TaskMetric


class EdgesLoss(TaskLoss):
    """Class-weighted cross-entropy for edges: background ``1 - pos_weight``, edge ``pos_weight``.

    A 2-channel head uses softmax cross-entropy, a 1-channel head sigmoid BCE (identical for
    logits ``(0, z)``). The result is the weighted mean normalised by the weight sum
    (PyTorch's ``weight=`` semantics, as the official loss).
    """

    def __init__(self, pos_weight: float = 0.95) -> None:
        super().__init__()
        if not 0.0 < pos_weight < 1.0:
            raise ValueError(f"edges pos_weight must be in (0, 1), got {pos_weight}")
        self.pos_weight = pos_weight

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = as_4d(target)[:, 0].float()
        positive = target > 0.5
        if pred.shape[1] == 1:
            ce = F.binary_cross_entropy_with_logits(pred[:, 0], positive.float(), reduction="none")
        elif pred.shape[1] == 2:
            ce = F.cross_entropy(pred, positive.long(), reduction="none")
        else:
            raise ValueError(f"edges prediction must have 1 or 2 channels, got {pred.shape[1]}")
        pos = torch.full_like(target, self.pos_weight)
        weight = torch.where(positive, pos, 1.0 - pos) * mask
        return weighted_mean(ce, weight)


def disk_max(x: Tensor, radius: float) -> Tensor:
    """Max of ``x`` [B,H,W] over a Euclidean disk of ``radius`` pixels around every pixel.

    Offsets (dy, dx) with dy^2 + dx^2 <= radius^2 are included; outside the image counts as -inf.
    Computed with about 4 * radius elementwise maxima: horizontal running maxima for every
    half-width, then one shifted row band per dy.
    """
    reach = math.floor(radius + 1e-9)
    if reach <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (reach, reach, reach, reach), value=float("-inf"))
    band = padded[..., reach : reach + w]
    rows = [band]  # rows[k]: max over horizontal offsets -k..k (all padded rows)
    for k in range(1, reach + 1):
        left, right = padded[..., reach - k : reach - k + w], padded[..., reach + k : reach + k + w]
        rows.append(torch.maximum(rows[-1], torch.maximum(left, right)))
    out = rows[reach][..., reach : reach + h, :]
    for dy in range(1, reach + 1):
        half = math.floor(math.sqrt(max(radius * radius - dy * dy, 0.0)) + 1e-9)
        up = rows[half][..., reach - dy : reach - dy + h, :]
        down = rows[half][..., reach + dy : reach + dy + h, :]
        out = torch.maximum(out, torch.maximum(up, down))
    return out


class EdgesMetric(TaskMetric):
    """Edge detection: ODS / OIS F-measure with a matching tolerance, and pixel F1.

    At each threshold t a predicted edge pixel (p >= t) is correct if a ground-truth edge lies
    within ``radius`` pixels (Euclidean); a ground-truth edge pixel is recalled if a predicted
    edge lies within ``radius``. The radius is ``tolerance * sqrt(H^2 + W^2)`` at label resolution
    (``tolerance_unit="diagonal"``, BSDS's 0.0075 by default) or ``tolerance`` pixels
    (``"pixels"``). ODS: precision / recall from counts summed over the dataset, best F over the
    thresholds. OIS: per image the threshold with the best F, its counts summed over the dataset,
    then F. ``pixF1``: F1 of the edge class at ``pixel_threshold`` without tolerance;
    ``meanF1``: the mean of the edge and background F1 there (what the official code reports).
    No thinning or one-to-one matching (see docs/metrics.md for how this differs from BSDS).
    """

    task = "edges"
    directions: ClassVar[dict[str, bool]] = {
        "odsF": True, "odsP": True, "odsR": True, "oisF": True, "pixF1": True, "meanF1": True}
    fractions: ClassVar[frozenset[str]] = frozenset(directions)  # odsThr: a threshold, no score

    def __init__(self, thresholds: int | Sequence[float] = 99, tolerance: float = 0.0075,
                 tolerance_unit: Literal["diagonal", "pixels"] = "diagonal",
                 pixel_threshold: float = 0.5, decoded: bool = False, **kwargs: Any) -> None:
        super().__init__(decoded=decoded, **kwargs)
        if isinstance(thresholds, int):
            if thresholds < 1:
                raise ValueError(f"need at least one threshold, got {thresholds}")
            values = torch.linspace(1, thresholds, thresholds, dtype=torch.float64)
            values = values / (thresholds + 1)  # BSDS: 1/(n+1) ... n/(n+1)
        else:
            values = torch.as_tensor(list(thresholds), dtype=torch.float64)
            if values.numel() == 0 or bool((values[1:] <= values[:-1]).any()):
                raise ValueError("thresholds must be a non-empty increasing sequence")
        if tolerance < 0 or tolerance_unit not in ("diagonal", "pixels"):
            raise ValueError(f"bad tolerance {tolerance!r} / unit {tolerance_unit!r}")
        self.tolerance, self.tolerance_unit = float(tolerance), tolerance_unit
        self.pixel_threshold = float(pixel_threshold)
        self.register_buffer("thresholds", values.float(), persistent=False)
        n = values.numel()
        # rows: matched predictions, predictions, matched ground truth, ground truth
        self.add_state("ods", torch.zeros(4, n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ois", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        # tp, fp, fn, number of scored pixels
        self.add_state("pix", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def radius(self, height: int, width: int) -> float:
        """Matching distance in pixels for a label of this size."""
        if self.tolerance_unit == "pixels":
            return self.tolerance
        return self.tolerance * math.hypot(height, width)

    def _at_least(self, values: Tensor, weight: Tensor) -> Tensor:
        """Per image, weighted count of ``values >= t`` for every threshold -> [B,T]."""
        b, n = values.shape[0], self.thresholds.numel()
        bucket = torch.bucketize(values.flatten(1).contiguous(), self.thresholds, right=True)
        hist = torch.zeros(b, n + 1, dtype=torch.long, device=values.device)
        hist.scatter_add_(1, bucket, weight.flatten(1).long())
        return hist.flip(1).cumsum(1).flip(1)[:, 1:]

    def _accumulate(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        prob = (pred[:, 0] if pred.dim() == 4 else pred).float()  # [B,H,W]
        label = target[:, 0] if target.dim() == 4 else target
        sample = mask.expand_as(prob)
        gt = (label > 0.5) & sample
        r = self.radius(*prob.shape[-2:])
        near_gt = disk_max(gt.float(), r) > 0
        best_near = disk_max(prob, r)
        counts = torch.stack([
            self._at_least(prob, near_gt & sample),
            self._at_least(prob, sample),
            self._at_least(best_near, gt),
            gt.sum(dim=(1, 2)).unsqueeze(1).expand(-1, self.thresholds.numel()),
        ], dim=1)  # [B,4,T]
        self.ods += counts.sum(0)
        f = self._f_measure(counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3])  # [B,T]
        best = f.argmax(dim=1).view(-1, 1, 1).expand(-1, 4, 1)
        self.ois += counts.gather(2, best)[..., 0].sum(0)
        positive = prob >= self.pixel_threshold
        self.pix += torch.stack([(positive & gt).sum(), (positive & ~gt & sample).sum(),
                                 (~positive & gt).sum(), sample.sum()])
        self.images += mask.sum()

    @staticmethod
    def _f_measure(tp_p: Tensor, n_p: Tensor, tp_r: Tensor, n_r: Tensor) -> Tensor:
        precision, recall = safe_div(tp_p, n_p), safe_div(tp_r, n_r)
        return safe_div(2 * precision * recall, precision + recall)

    def compute(self) -> dict[str, Tensor]:
        ods = self.ods
        precision, recall = safe_div(ods[0], ods[1]), safe_div(ods[2], ods[3])
        f = safe_div(2 * precision * recall, precision + recall)
        best = f.argmax()
        tp, fp, fn, total = self.pix.double()
        tn = total - tp - fp - fn
        edge_f1 = safe_div(2 * tp, 2 * tp + fp + fn)
        out = {
            "odsF": f[best],
            "odsP": precision[best],
            "odsR": recall[best],
            "odsThr": self.thresholds.double()[best],
            "oisF": self._f_measure(*self.ois),
            "pixF1": edge_f1,
            "meanF1": (edge_f1 + safe_div(2 * tn, 2 * tn + fn + fp)) / 2,
        }
        nan = torch.full_like(out["odsF"], float("nan"))
        return {k: torch.where(self.images > 0, v, nan) for k, v in out.items()}


def edge_probability(raw: Tensor) -> Tensor:
    """Logits -> edge probability [B,1,H,W] (2-channel softmax or 1-channel sigmoid)."""
    if raw.shape[1] == 1:
        return torch.sigmoid(raw)
    return torch.softmax(raw, dim=1)[:, 1:2]


class EdgesTask(Task):
    """Edges float32 [1,H,W] in {0, 1}; two output channels (softmax) or one (sigmoid)."""

    name = "edges"
    short = "E"
    label_resize = "max"  # thin edges survive downsampling
    default_channels = 2
    loss = EdgesLoss
    metric = EdgesMetric
    main_metric = "odsF"

    def decode(self, raw: Tensor) -> Tensor:
        return edge_probability(raw)

    def check_label(self, label: Tensor, num_classes: int | None = None) -> str | None:
        if not bool(((label == 0) | (label == 1)).all()):
            return f"'{self.label_key}' must contain only 0 and 1"
        return None

    def random_label(self, batch: int, height: int, width: int, channels: int,
                     generator: torch.Generator) -> Tensor:
        return (torch.rand(batch, 1, height, width, generator=generator) > 0.9).float()

    def colourise(self, value: np.ndarray, palette: np.ndarray | None = None,
                  colour_range: Any = None) -> np.ndarray:
        """Probability or label in [0, 1] -> grey."""
        e = np.clip(np.asarray(value, dtype=np.float32).squeeze(), 0, 1)
        return np.repeat((e * 255).round().astype(np.uint8)[..., None], 3, axis=-1)

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        return torch.tensor([float(label.double().sum()), float(label.numel())],
                            dtype=torch.float64)

    def constant(self, stats: Tensor) -> float:
        return float(stats[0] / stats[1]) if stats[1] > 0 else 0.0  # the edge frequency

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        p = min(max(self.constant(stats), 1e-6), 1 - 1e-6)
        raw = torch.zeros(shape[0], channels, *shape[1:])
        raw[:, channels - 1] = math.log(p / (1 - p))  # sigmoid / 2-class softmax give p
        return raw

    def domain_channels(self, channels: int) -> int:
        return 1

    def domain_map(self, raw: Tensor, context: Any = None) -> Tensor:
        """The edge probability, brought to [0, 1] like the other regression maps (our choice:
        the paper has no edges in its adaptation setting)."""
        return edge_probability(raw)
