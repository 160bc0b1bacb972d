"""Semantic segmentation: class ids per pixel, cross-entropy, confusion-matrix metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import weighted_mean
from ..io import palette as default_palette
from .base import IGNORE_INDEX, Task, TaskLoss, TaskMetric


class SemsegLoss(TaskLoss):
    """Softmax cross-entropy over non-ignored pixels of supervised samples (no class weights)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = target.long()
        ce = F.cross_entropy(pred, target, ignore_index=self.ignore_index, reduction="none")
        weight = (target != self.ignore_index).float() * mask
        return weighted_mean(ce, weight)


class SemsegMetric(TaskMetric):
    """Confusion-matrix metrics: mIoU, pixel accuracy, mean class accuracy, per-class IoU.

    Ground-truth pixels outside ``[0, num_classes)`` (``ignore_index`` included) are ignored, as are
    predicted ids outside that range (only possible with ``decoded=True``). mIoU is the mean IoU
    over the classes that occur in the ground truth or the prediction of the evaluated set
    (classes with TP + FP + FN = 0 are left out); their IoU is NaN in the per-class entries.
    The confusion matrix is accumulated with ``index_add_`` (no host sync).
    """

    task = "semseg"
    directions: ClassVar[dict[str, bool]] = {"mIoU": True, "pixAcc": True, "mAcc": True,
                                             "IoU": True}
    fractions: ClassVar[frozenset[str]] = frozenset(directions)

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
        iou = tp / (gt + predicted - tp)  # NaN for absent classes
        out = {"mIoU": torch.nanmean(iou), "pixAcc": tp.sum() / cm.sum(),
               "mAcc": torch.nanmean(tp / gt)}
        out.update({f"IoU/{name}": iou[i] for i, name in enumerate(self.class_names)})
        return out


def colourise_labels(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """int [H,W] class ids -> uint8 [H,W,3]; ignored / out-of-range pixels are black."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels != IGNORE_INDEX)
    n = int(labels[valid].max()) + 1 if valid.any() else 1
    if palette is None or len(palette) < n:
        palette = default_palette(max(n, 0 if palette is None else len(palette)))
    palette = np.asarray(palette, dtype=np.uint8)
    valid &= labels < len(palette)
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[valid] = palette[labels[valid]]
    return out


def entropy_map(logits: Tensor) -> Tensor:
    """ADVENT weighted self-information ``-p_c log p_c / log C`` per class [B,C,H,W]."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p) / math.log(max(logits.shape[1], 2))


class SemsegTask(Task):
    """Class ids int64 [H,W] (255 = not labelled); logits with one channel per class."""

    name = "semseg"
    short = "S"
    label_dtype = torch.int64
    label_channels = None
    fill_value = IGNORE_INDEX
    uses_classes = True
    default_channels = None
    loss = SemsegLoss
    metric = SemsegMetric
    main_metric = "mIoU"

    def decode(self, raw: Tensor) -> Tensor:
        """Logits -> class ids [B,H,W] (int64)."""
        return raw.argmax(dim=1)

    def check_label(self, label: Tensor, num_classes: int | None = None) -> str | None:
        valid = label[label != IGNORE_INDEX]
        if valid.numel() and (valid.min() < 0 or (num_classes is not None
                                                  and valid.max() >= num_classes)):
            bad = sorted(set(valid.unique().tolist()) - set(range(num_classes or 0)))
            return (f"'{self.label_key}' has ids {bad[:10]} outside "
                    f"0..{(num_classes or 0) - 1} and {IGNORE_INDEX}")
        return None

    def random_label(self, batch: int, height: int, width: int, channels: int,
                     generator: torch.Generator) -> Tensor:
        seg = torch.randint(0, channels, (batch, height, width), generator=generator)
        seg[:, :2] = IGNORE_INDEX  # a few unlabelled rows, as real data has
        return seg

    def to_array(self, value: Tensor) -> np.ndarray:
        arr = value.detach().cpu().numpy()
        return arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.int16)

    def colourise(self, value: np.ndarray, palette: np.ndarray | None = None,
                  colour_range: Any = None) -> np.ndarray:
        return colourise_labels(value, palette)

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        valid = label[(label >= 0) & (label < channels)]  # 255 (ignore) is out of range
        return torch.bincount(valid.long().flatten(), minlength=channels).double()

    def constant(self, stats: Tensor) -> int:
        return int(stats.argmax())  # the majority class

    def describe_constant(self, value: Any, class_names: Sequence[str] | None = None) -> str:
        i = int(value)
        name = f" ({class_names[i]})" if class_names and 0 <= i < len(class_names) else ""
        return f"class {i}{name} everywhere (the most frequent training class)"

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        raw = torch.zeros(shape[0], channels, *shape[1:])
        raw[:, self.constant(stats)] = 1.0
        return raw

    def domain_map(self, raw: Tensor, context: Any = None) -> Tensor:
        """The weighted self-information map of the softmax (C channels in [0, 1/e/log C])."""
        return entropy_map(raw)
