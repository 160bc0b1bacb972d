"""Evaluation metrics (torchmetrics objects, DDP-correct) and the multi-task delta_m.

One :class:`torchmetrics.Metric` per task. All states are tensors reduced with ``sum``, so a
distributed ``compute()`` equals a single-process one on the same data. ``update`` never reads
tensor values on the host: no ``.item()``, no boolean-mask indexing, no data-dependent Python
branches, no ``torch.bincount`` (which syncs on CUDA); histograms use ``index_add_`` /
``scatter_add_`` into fixed-size buffers. The tests run ``update`` on ``meta`` tensors to prove it.

Contract (every task metric)::

    metric.update(pred, target, has=None)

* ``pred``: by default the **raw** head output of one scale [B,C,h,w] (logits, normalised inverse
  depth, raw normal vectors, edge logits). It is resized bilinearly (``align_corners=True``) to
  the label size and decoded to physical units with ``TASKS[task].decode``. With
  ``decoded=True`` the metric instead expects predictions already in physical units at the
  label size (class ids [B,H,W], metres [B,1,H,W], unit normals [B,3,H,W], edge probabilities
  [B,1,H,W]) - handy for trivial predictors.
* ``target``: the label in physical units at label resolution (the batch's tensor).
* ``has``: optional bool [B]; samples with False are skipped entirely.

``compute()`` returns ``{name: 0-dim tensor}``. Ratios are fractions in [0, 1], depths metres,
angles degrees. :class:`MultiTaskMetrics` prefixes the task: ``semseg/mIoU``, ``depth/rmse``...

Definitions, tolerances and the differences from the official code are in ``docs/metrics.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from .losses import fp32_context, resize_to, sample_mask
from .tasks import IGNORE_INDEX, TASKS, channel_sq_norm, get_task, unit_vectors

__all__ = [
    "FRACTION_METRICS",
    "HIGHER_IS_BETTER",
    "METRICS",
    "DepthMetric",
    "EdgesMetric",
    "MultiTaskMetrics",
    "NormalsMetric",
    "SemsegMetric",
    "TaskMetric",
    "delta_m",
    "delta_m_main",
    "higher_is_better",
    "load_baselines",
    "main_metric_names",
]

# --- directions (the one table delta_m and model selection rely on) -----------------------------

HIGHER_IS_BETTER: dict[str, bool] = {
    "semseg/mIoU": True,
    "semseg/pixAcc": True,
    "semseg/mAcc": True,
    "semseg/IoU": True,  # per-class entries "semseg/IoU/<class>"
    "depth/absRel": False,
    "depth/sqRel": False,
    "depth/rmse": False,
    "depth/rmseLog": False,
    "depth/delta1": True,
    "depth/delta2": True,
    "depth/delta3": True,
    "normals/mean": False,
    "normals/median": False,
    "normals/rmse": False,
    "normals/within11": True,
    "normals/within22": True,
    "normals/within30": True,
    "edges/odsF": True,
    "edges/odsP": True,
    "edges/odsR": True,
    "edges/oisF": True,
    "edges/pixF1": True,
    "edges/meanF1": True,
}
"""Direction of every metric, keyed ``task/metric`` (sub-keys such as ``/IoU/3`` inherit)."""

FRACTION_METRICS: frozenset[str] = frozenset({
    "semseg/mIoU", "semseg/pixAcc", "semseg/mAcc", "semseg/IoU",
    "depth/delta1", "depth/delta2", "depth/delta3",
    "normals/within11", "normals/within22", "normals/within30",
    "edges/odsF", "edges/odsP", "edges/odsR", "edges/oisF", "edges/pixF1", "edges/meanF1",
})
"""Metrics reported as fractions in [0, 1] (a baseline > 1 is a percentage by mistake)."""


def _table_key(name: str) -> str:
    return "/".join(name.split("/")[:2])


def higher_is_better(name: str) -> bool:
    """Direction of the flat metric ``name`` (``task/metric[/sub]``)."""
    try:
        return HIGHER_IS_BETTER[_table_key(name)]
    except KeyError:
        raise KeyError(f"unknown metric '{name}'; known: {', '.join(HIGHER_IS_BETTER)}") from None


def main_metric_names(tasks: Iterable[str]) -> list[str]:
    """``task/main_metric`` for each task (the paper's delta_m uses only these)."""
    return [f"{t}/{get_task(t).main_metric}" for t in tasks]


# --- helpers ------------------------------------------------------------------------------------

def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0."""
    den = den.to(num.dtype) if num.is_floating_point() else den.double()
    num = num if num.is_floating_point() else num.double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


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


# --- base class ---------------------------------------------------------------------------------

class TaskMetric(Metric):
    """Common ``update(pred, target, has)`` front end: resize, decode, mask; fp32, autocast off."""

    task: ClassVar[str]
    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, decoded: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decoded = decoded

    @classmethod
    def build(cls, channels: int | None = None, **options: Any) -> TaskMetric:
        """Construct from the task's output channels (only semseg needs them) and options."""
        return cls(**options)

    def update(self, pred: Tensor, target: Tensor, has: Tensor | None = None) -> None:
        """Accumulate a batch; see the module docstring for the contract."""
        size = tuple(target.shape[-2:])
        with fp32_context(pred.device), torch.no_grad():
            if self.decoded:
                if tuple(pred.shape[-2:]) != size:
                    raise ValueError(f"{type(self).__name__}: decoded predictions must have the "
                                     f"label size {size}, got {tuple(pred.shape[-2:])}")
            else:
                if pred.dim() != 4:
                    raise ValueError(f"{type(self).__name__}: raw predictions must be [B,C,H,W], "
                                     f"got {tuple(pred.shape)}")
                self._check_raw(pred)
                pred = TASKS[self.task].decode(resize_to(pred.float(), size))
            mask = sample_mask(has, target.shape[0], target.device).bool()
            self._accumulate(pred, target, mask)

    def _check_raw(self, pred: Tensor) -> None:
        """Shape checks on the raw prediction (metadata only)."""

    def _accumulate(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        """``pred`` in physical units at label size; ``mask`` bool [B,1,1]."""
        raise NotImplementedError


# --- semantic segmentation ----------------------------------------------------------------------

class SemsegMetric(TaskMetric):
    """Confusion-matrix metrics: mIoU, pixel accuracy, mean class accuracy, per-class IoU.

    Ground-truth pixels outside ``[0, num_classes)`` (``ignore_index`` included) are ignored, as are
    predicted ids outside that range (only possible with ``decoded=True``). mIoU is the mean IoU
    over the classes that occur in the ground truth or the prediction of the evaluated set
    (classes with TP + FP + FN = 0 are left out); their IoU is NaN in the per-class entries.
    """

    task = "semseg"

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 class_names: Sequence[str] | None = None, decoded: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(decoded=decoded, **kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [f"{i:02d}"
                                                                  for i in range(num_classes)]
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    @classmethod
    def build(cls, channels: int | None = None, **options: Any) -> SemsegMetric:
        options.setdefault("num_classes", channels)
        if options["num_classes"] is None:
            raise ValueError("semseg metric needs num_classes (the task's channels)")
        return cls(**options)

    def _check_raw(self, pred: Tensor) -> None:
        if pred.shape[1] != self.num_classes:
            raise ValueError(f"semseg metric: {pred.shape[1]} logit channels for "
                             f"{self.num_classes} classes")

    def _accumulate(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        c = self.num_classes
        target, pred = target.long(), pred.long()
        valid = (target >= 0) & (target < c) & (target != self.ignore_index)
        valid = valid & (pred >= 0) & (pred < c) & mask
        index = torch.where(valid, target * c + pred, torch.zeros_like(target))
        self.confmat.view(-1).index_add_(0, index.flatten(), valid.flatten().long())

    def compute(self) -> dict[str, Tensor]:
        cm = self.confmat.double()
        tp = cm.diagonal()
        gt, predicted = cm.sum(1), cm.sum(0)
        union = gt + predicted - tp
        iou = tp / union  # NaN for absent classes
        out = {
            "mIoU": torch.nanmean(iou),
            "pixAcc": tp.sum() / cm.sum(),
            "mAcc": torch.nanmean(tp / gt),
        }
        out.update({f"IoU/{name}": iou[i] for i, name in enumerate(self.class_names)})
        return out


# --- depth --------------------------------------------------------------------------------------

class DepthMetric(TaskMetric):
    """Depth errors in metres over valid pixels: ``min_depth < gt < max_depth`` (gt = 0 invalid).

    The prediction is clamped to ``[min_depth, max_depth]`` (after optional per-image median
    scaling). ``reduction="pixel"`` (default) pools every valid pixel of the dataset;
    ``"image"`` averages per-image values over images that have valid pixels (the official way,
    with RMSE = sqrt of the mean per-image MSE, likewise RMSE-log).
    """

    task = "depth"
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
        gt = (target.unsqueeze(1) if target.dim() == 3 else target).float()
        pred = (pred.unsqueeze(1) if pred.dim() == 3 else pred).float()
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
        return {
            "absRel": m["absRel"],
            "sqRel": m["sqRel"],
            "rmse": m["mse"].sqrt(),
            "rmseLog": m["mseLog"].sqrt(),
            "delta1": m["delta1"],
            "delta2": m["delta2"],
            "delta3": m["delta3"],
        }


# --- surface normals ----------------------------------------------------------------------------

class NormalsMetric(TaskMetric):
    """Per-pixel angular error (degrees) over pixels with a non-zero ground-truth normal.

    Both vectors are normalised; the angle is ``2 atan2(|p - g|, |p + g|)`` (accurate near 0 and
    180 degrees). Pixel-pooled mean, RMSE and fractions under 11.25 / 22.5 / 30 degrees are exact;
    the median is read from a histogram with ``bin_width`` degrees (linear interpolation inside
    the bin), so it is within one bin width of the exact median.
    """

    task = "normals"
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
        inside = _safe_div(half - below, self.hist[k].double())
        median = (k.double() + inside) * self.bin_width
        return torch.where(self.count > 0, median, torch.full_like(median, float("nan")))

    def compute(self) -> dict[str, Tensor]:
        mean = self.sums / self.count
        out = {"mean": mean[0], "median": self._median(), "rmse": mean[1].sqrt()}
        for name, value in zip(("within11", "within22", "within30"), mean[2:]):
            out[name] = value
        return out


# --- edges --------------------------------------------------------------------------------------

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
        precision, recall = _safe_div(tp_p, n_p), _safe_div(tp_r, n_r)
        return _safe_div(2 * precision * recall, precision + recall)

    def compute(self) -> dict[str, Tensor]:
        ods = self.ods
        precision, recall = _safe_div(ods[0], ods[1]), _safe_div(ods[2], ods[3])
        f = _safe_div(2 * precision * recall, precision + recall)
        best = f.argmax()
        tp, fp, fn, total = self.pix.double()
        tn = total - tp - fp - fn
        edge_f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
        out = {
            "odsF": f[best],
            "odsP": precision[best],
            "odsR": recall[best],
            "odsThr": self.thresholds.double()[best],
            "oisF": self._f_measure(*self.ois),
            "pixF1": edge_f1,
            "meanF1": (edge_f1 + _safe_div(2 * tn, 2 * tn + fn + fp)) / 2,
        }
        nan = torch.full_like(out["odsF"], float("nan"))
        return {k: torch.where(self.images > 0, v, nan) for k, v in out.items()}


METRICS: dict[str, type[TaskMetric]] = {
    "semseg": SemsegMetric,
    "depth": DepthMetric,
    "normals": NormalsMetric,
    "edges": EdgesMetric,
}
"""Metric class per task name."""


# --- container ----------------------------------------------------------------------------------

class MultiTaskMetrics(nn.Module):
    """One metric per task, updated from a model output and a batch, with flat result names.

    Args:
        tasks: task names, or the ``{task: channels}`` mapping of ``tasks.parse_tasks`` (semseg
            takes its number of classes from it).
        task_options: constructor options per task, e.g. ``{"depth": {"max_depth": 10}}``.
        scale: the output scale that is scored (0, the final prediction).

    ``update(outputs, batch)`` scores ``outputs[task][scale]`` against ``batch[label_key]``
    with ``batch["has_<label_key>"]``; tasks absent from the batch or the outputs are skipped.
    ``compute()`` returns ``{"<task>/<metric>": tensor}``; every task is computed (all ranks
    must take part in the reduction), and one that scored no pixel reports NaN.
    """

    def __init__(self, tasks: Sequence[str] | Mapping[str, int | None],
                 task_options: Mapping[str, Mapping[str, Any]] | None = None,
                 scale: int = 0) -> None:
        super().__init__()
        channels = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks)
        task_options = dict(task_options or {})
        unknown = set(task_options) - set(channels)
        if unknown:
            raise ValueError(f"task_options name task(s) {sorted(unknown)} not in "
                             f"{list(channels)}")
        for name in channels:
            get_task(name)
        self.scale = scale
        self.metrics = nn.ModuleDict({
            t: METRICS[t].build(ch, **dict(task_options.get(t, {})))
            for t, ch in channels.items()
        })

    def __getitem__(self, task: str) -> TaskMetric:
        return self.metrics[task]  # type: ignore[return-value]

    def update(self, outputs: Mapping[str, Mapping[int, Tensor] | Tensor],
               batch: Mapping[str, Tensor]) -> None:
        for task, metric in self.metrics.items():
            key = TASKS[task].label_key
            if key not in batch or task not in outputs:
                continue
            pred = outputs[task]
            pred = pred if isinstance(pred, Tensor) else pred[self.scale]
            metric.update(pred, batch[key], batch.get(f"has_{key}"))

    def compute(self) -> dict[str, Tensor]:
        return {f"{task}/{name}": value
                for task, metric in self.metrics.items()
                for name, value in metric.compute().items()}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


# --- delta_m ------------------------------------------------------------------------------------

def _number(value: float | Tensor, what: str) -> float:
    out = float(value.item() if isinstance(value, Tensor) else value)
    if not math.isfinite(out):
        raise ValueError(f"{what} is not finite ({out})")
    return out


def delta_m(metrics: Mapping[str, float | Tensor], baselines: Mapping[str, float | Tensor],
            names: Iterable[str] | None = None) -> float:
    """Multi-task gain in percent: ``100 * mean_k (-1)^{lower_k} (M_k - B_k) / B_k``.

    ``names`` are the (flat) metrics averaged over; by default every metric in ``baselines``.
    Raises if a name has no baseline, no result, an unknown direction, or a zero baseline.
    """
    names = list(baselines) if names is None else list(names)
    if not names:
        raise ValueError("delta_m needs at least one metric")
    terms = []
    for name in names:
        if name not in baselines:
            raise KeyError(f"delta_m: no single-task baseline for '{name}'")
        if name not in metrics:
            raise KeyError(f"delta_m: no result for '{name}'")
        base = _number(baselines[name], f"baseline '{name}'")
        value = _number(metrics[name], f"result '{name}'")
        if base == 0:
            raise ValueError(f"delta_m: baseline for '{name}' is zero")
        if _table_key(name) in FRACTION_METRICS and base > 1:
            raise ValueError(f"delta_m: baseline {base} for '{name}' looks like a percentage; "
                             "this metric is a fraction in [0, 1]")
        sign = 1.0 if higher_is_better(name) else -1.0
        terms.append(sign * (value - base) / base)
    return 100.0 * sum(terms) / len(terms)


def delta_m_main(metrics: Mapping[str, float | Tensor], baselines: Mapping[str, float | Tensor],
                 tasks: Iterable[str]) -> float:
    """The paper's delta_m: one metric per task, ``TASKS[t].main_metric``."""
    return delta_m(metrics, baselines, main_metric_names(tasks))


def load_baselines(sources: Iterable[str | Path],
                   filename: str = "metrics.json") -> dict[str, float]:
    """Merge single-task results from run folders (their ``metrics.json``) or JSON files.

    A JSON file holds flat ``{"task/metric": number}`` entries, either at the top level or
    under a ``"metrics"`` key; entries that are not known metrics are ignored. The same metric
    from two sources with different values is an error.
    """
    merged: dict[str, float] = {}
    origin: dict[str, Path] = {}
    for source in sources:
        path = Path(source)
        path = path / filename if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no baseline results at {path}")
        data = json.loads(path.read_text())
        if isinstance(data, Mapping) and isinstance(data.get("metrics"), Mapping):
            data = data["metrics"]
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a JSON object of metrics")
        for name, value in data.items():
            if _table_key(name) not in HIGHER_IS_BETTER or not isinstance(value, int | float):
                continue
            if name in merged and merged[name] != float(value):
                raise ValueError(f"baseline '{name}' differs between {origin[name]} and {path}")
            merged[name], origin[name] = float(value), path
    if not merged:
        raise ValueError("no baseline metrics found in the given sources")
    return merged
