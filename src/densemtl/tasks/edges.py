"""Edges: binary boundary maps, class-weighted cross-entropy, tolerance F-measure and BSDS."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from ..boundaries import DEFAULT_MAX_DIST, bsds_thresholds, image_counts, summarise
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
    """Edge detection: a fast tolerance F-measure for validation, and the BSDS benchmark.

    **Tolerance F-measure** (always; names ``tol*``): at each threshold t a predicted edge pixel
    (p >= t) is correct if a ground-truth edge lies within the radius, and a ground-truth edge
    pixel is recalled if a predicted edge lies within it; no thinning and no one-to-one matching,
    so it runs on the accelerator in the evaluation loop. The radius is ``tolerance`` times the
    label diagonal (``tolerance_unit="diagonal"``) or ``tolerance`` pixels (``"pixels"``).
    ``tolF`` (``tolP``, ``tolR``, ``tolThr``): best F over the thresholds of dataset-summed
    counts; ``tolImageF``: F of the counts summed over images, each at its own best threshold.
    It ranks models like the benchmark does but is not comparable with published ODS / OIS.

    **BSDS protocol** (``bsds=True``, on by default in ``test``; names ``ods*``, ``ois*``,
    ``ap``): thinned predictions matched one to one within ``max_dist`` times the diagonal, by
    :mod:`densemtl.boundaries` on the CPU, image by image (see ``docs/metrics.md``).

    ``tolerance`` / ``max_dist`` left unset take the dataset's standard distance
    (``edge_max_dist`` of the dataset class: 0.011 for NYUDv2 and the built-in benchmark, 0.0075
    otherwise) when a run starts, else 0.0075. ``pixF1``: F1 of the edge class at
    ``pixel_threshold`` without tolerance; ``meanF1``: the mean of the edge and background F1
    there (what the official code reports).
    """

    task = "edges"
    directions: ClassVar[dict[str, bool]] = dict.fromkeys(
        ("tolF", "tolP", "tolR", "tolImageF", "pixF1", "meanF1",
         "odsF", "odsP", "odsR", "oisF", "oisP", "oisR", "ap"), True)
    fractions: ClassVar[frozenset[str]] = frozenset(directions)  # *Thr: thresholds, no score
    stage_defaults: ClassVar[dict[str, dict[str, Any]]] = {"test": {"bsds": True}}

    def __init__(self, thresholds: int | Sequence[float] = 99, tolerance: float | None = None,
                 tolerance_unit: Literal["diagonal", "pixels"] = "diagonal",
                 pixel_threshold: float = 0.5, bsds: bool = False,
                 max_dist: float | None = None, decoded: bool = False, **kwargs: Any) -> None:
        super().__init__(decoded=decoded, **kwargs)
        if isinstance(thresholds, int):
            if thresholds < 1:
                raise ValueError(f"need at least one threshold, got {thresholds}")
            values = bsds_thresholds(thresholds)
        else:
            values = np.asarray(list(thresholds), dtype=np.float64)
            if values.size == 0 or bool((values[1:] <= values[:-1]).any()):
                raise ValueError("thresholds must be a non-empty increasing sequence")
        if (tolerance is not None and tolerance < 0) or tolerance_unit not in ("diagonal",
                                                                               "pixels"):
            raise ValueError(f"bad edges tolerance {tolerance!r} / unit {tolerance_unit!r}")
        if max_dist is not None and max_dist <= 0:
            raise ValueError(f"edges max_dist must be positive, got {max_dist}")
        self.given = {"tolerance": tolerance is not None, "max_dist": max_dist is not None}
        self.tolerance = DEFAULT_MAX_DIST if tolerance is None else float(tolerance)
        self.tolerance_unit = tolerance_unit
        self.max_dist = DEFAULT_MAX_DIST if max_dist is None else float(max_dist)
        self.pixel_threshold = float(pixel_threshold)
        self.bsds = bool(bsds)
        # float32 on the accelerator for the tolerance F; the exact float64 ones for the benchmark
        self.register_buffer("thresholds", torch.tensor(values, dtype=torch.float32),
                             persistent=False)
        self.bsds_values = values
        n = len(values)
        # rows: matched predictions, predictions, matched ground truth, ground truth
        self.add_state("ods", torch.zeros(4, n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ois", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        # tp, fp, fn, number of scored pixels
        self.add_state("pix", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        # BSDS: per-image counts [n_images, T, 4] (columns as boundaries.image_counts)
        self.add_state("bsds_counts", [], dist_reduce_fx="cat")

    def configure(self, dataset_class: type | None) -> None:
        """Take the dataset's standard matching distance for the options left unset."""
        standard = float(getattr(dataset_class, "edge_max_dist", DEFAULT_MAX_DIST))
        if not self.given["tolerance"] and self.tolerance_unit == "diagonal":
            self.tolerance = standard
        if not self.given["max_dist"]:
            self.max_dist = standard

    def radius(self, height: int, width: int) -> float:
        """Tolerance-F matching distance in pixels for a label of this size."""
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
        if self.bsds:
            self._accumulate_bsds(prob, gt, mask)

    def _accumulate_bsds(self, prob: Tensor, gt: Tensor, mask: Tensor) -> None:
        """The benchmark's per-image counts, on the CPU (it reads values: a host sync)."""
        keep = mask.view(-1).cpu().numpy()
        maps, labels = prob.double().cpu().numpy(), gt.cpu().numpy()
        rows = [image_counts(maps[i], labels[i], self.max_dist, self.bsds_values)
                for i in range(len(keep)) if keep[i]]
        if rows:
            self.bsds_counts.append(torch.as_tensor(np.stack(rows), device=self.ods.device))

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
            "tolF": f[best],
            "tolP": precision[best],
            "tolR": recall[best],
            "tolThr": self.thresholds.double()[best],
            "tolImageF": self._f_measure(*self.ois),
            "pixF1": edge_f1,
            "meanF1": (edge_f1 + safe_div(2 * tn, 2 * tn + fn + fp)) / 2,
        }
        nan = torch.full_like(out["tolF"], float("nan"))
        out = {k: torch.where(self.images > 0, v, nan) for k, v in out.items()}
        if self.bsds:
            counts = self.bsds_counts
            table = (dim_zero_cat(counts) if isinstance(counts, list) and counts else
                     counts if isinstance(counts, Tensor) else
                     torch.zeros(0, len(self.bsds_values), 4, dtype=torch.long))
            scores = summarise(table.cpu().numpy(), self.bsds_values)
            out.update({k: torch.tensor(v, dtype=torch.float64, device=nan.device)
                        for k, v in scores.items()})
        return out


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
    main_metric = "tolF"  # present in every evaluation (the benchmark runs in test only)

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

    def describe_constant(self, value: Any, class_names: Sequence[str] | None = None) -> str:
        return f"edge probability {float(value):.3f} everywhere (the training edge frequency)"

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
