"""The four dense tasks: one declaration each, one registry.

Everything that differs between tasks and is needed by more than one module lives here: the
label key in the sample dict, the default number of output channels, how labels are resized,
how the network's raw output is turned into physical units, and the main metric with its
direction (for delta_m). Losses and metrics live in ``losses.py`` / ``metrics.py`` and are looked
up there by task name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = 255
"""Semantic label value that is never supervised nor scored."""


# --- depth parametrisation ------------------------------------------------------------------
# The official heads regress d = 65536 / (100 * D + 1) with D in metres (depth in centimetres,
# inverted and scaled). We keep that parametrisation so that official checkpoints work, and
# convert at the boundary.

def depth_to_inverse(depth_m: Tensor) -> Tensor:
    """Metres -> the official normalised inverse depth 65536 / (100 D + 1)."""
    return 65536.0 / (100.0 * depth_m + 1.0)


def inverse_to_depth(inv: Tensor, eps: float = 1e-6) -> Tensor:
    """The official normalised inverse depth -> metres (exact inverse, clamped at 0)."""
    return (655.36 / inv.clamp_min(eps) - 0.01).clamp_min(0.0)


def channel_sq_norm(x: Tensor) -> Tensor:
    """Squared L2 norm over dim 1 of a [B,C,H,W] tensor -> [B,H,W].

    Written as a sum of channel planes: much faster on CPU than ``vector_norm(dim=1)``.
    """
    planes = x.unbind(1)
    out = planes[0] * planes[0]
    for plane in planes[1:]:
        out = out + plane * plane
    return out


def unit_vectors(x: Tensor) -> Tensor:
    """Normalise [B,C,H,W] over dim 1; zero vectors stay zero (finite gradients)."""
    return x * torch.rsqrt(channel_sq_norm(x).clamp_min(1e-24)).unsqueeze(1)


@dataclass(frozen=True)
class Task:
    """Declaration of one dense prediction task."""

    name: str
    label_key: str
    default_channels: int | None
    label_mode: str  # interpolation used when resizing the label: "nearest" or "bilinear"
    main_metric: str
    higher_is_better: bool
    short: str  # one-letter code used in config names (S, D, N, E)

    def channels(self, requested: int | None) -> int:
        """Number of output channels, checking ``requested`` against the task's needs."""
        if requested is None:
            if self.default_channels is None:
                raise ValueError(f"task '{self.name}' needs 'channels' (the number of classes)")
            return self.default_channels
        if requested < 1:
            raise ValueError(f"task '{self.name}': channels must be >= 1, got {requested}")
        return int(requested)

    def decode(self, raw: Tensor) -> Tensor:
        """Raw head output [B,C,H,W] -> physical units (see subclasses)."""
        raise NotImplementedError

    # The best constant (input-independent) prediction, fitted on labels: the "trivial" rows
    # of test reports. ``label_stats`` returns sums that add up over batches.
    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        raise NotImplementedError

    def constant(self, stats: Tensor) -> float | int | list[float]:
        """The constant prediction in physical units."""
        raise NotImplementedError

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        """Raw head output [B,C,H,W] of the constant prediction (``shape`` = B, H, W)."""
        raise NotImplementedError


class SemsegTask(Task):
    def decode(self, raw: Tensor) -> Tensor:
        """Logits -> class ids [B,H,W] (int64)."""
        return raw.argmax(dim=1)

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        valid = label[(label >= 0) & (label < channels)]  # 255 (ignore) is out of range
        return torch.bincount(valid.long().flatten(), minlength=channels).double()

    def constant(self, stats: Tensor) -> int:
        return int(stats.argmax())  # the majority class

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        raw = torch.zeros(shape[0], channels, *shape[1:])
        raw[:, self.constant(stats)] = 1.0
        return raw


class DepthTask(Task):
    def decode(self, raw: Tensor) -> Tensor:
        """Normalised inverse depth -> metres [B,1,H,W]."""
        return inverse_to_depth(raw)

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        valid = label[(label > 0) & torch.isfinite(label)].double()
        return torch.stack([valid.sum(), torch.tensor(float(valid.numel()))])

    def constant(self, stats: Tensor) -> float:
        return float(stats[0] / stats[1]) if stats[1] > 0 else 1.0  # the mean valid depth

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        return depth_to_inverse(torch.full((shape[0], 1, *shape[1:]), self.constant(stats)))


class NormalsTask(Task):
    def decode(self, raw: Tensor) -> Tensor:
        """Raw 3-vectors -> unit camera-frame normals [B,3,H,W]."""
        return unit_vectors(raw)

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        return label.double().sum(dim=(0, 2, 3))

    def constant(self, stats: Tensor) -> list[float]:
        n = stats if stats.norm() > 0 else torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
        return (n / n.norm()).tolist()  # the normalised mean normal

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        n = torch.tensor(self.constant(stats), dtype=torch.float32).view(1, 3, 1, 1)
        return n.expand(shape[0], 3, *shape[1:]).clone()


class EdgesTask(Task):
    def decode(self, raw: Tensor) -> Tensor:
        """Logits -> edge probability [B,1,H,W] (2-channel softmax or 1-channel sigmoid)."""
        if raw.shape[1] == 1:
            return torch.sigmoid(raw)
        return torch.softmax(raw, dim=1)[:, 1:2]

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


TASKS: dict[str, Task] = {
    "semseg": SemsegTask("semseg", "semseg", None, "nearest", "mIoU", True, "S"),
    "depth": DepthTask("depth", "depth", 1, "nearest", "rmse", False, "D"),
    "normals": NormalsTask("normals", "normals", 3, "nearest", "mean", False, "N"),
    "edges": EdgesTask("edges", "edges", 2, "nearest", "odsF", True, "E"),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}") from None


def parse_tasks(spec: Mapping[str, Any] | Iterable[str]) -> dict[str, int]:
    """Normalise a task specification to an ordered ``{task: out_channels}`` dict.

    Accepts a mapping ``{semseg: {channels: 16}, depth: {}, ...}`` (``null`` values allowed, or
    an int meaning channels) or a plain list of names. The order given is kept: it is the task
    order everywhere (heads, exchange-block sources, losses, reports).
    """
    items: Iterable[tuple[str, Any]]
    items = spec.items() if isinstance(spec, Mapping) else ((name, None) for name in spec)
    out: dict[str, int] = {}
    for name, opts in items:
        task = get_task(name)
        if name in out:
            raise ValueError(f"task '{name}' is listed twice")
        if isinstance(opts, Mapping):
            unknown = set(opts) - {"channels"}
            if unknown:
                raise ValueError(f"task '{name}': unknown option(s) {sorted(unknown)}")
            channels = opts.get("channels")
        else:
            channels = opts
        out[name] = task.channels(channels)
    if not out:
        raise ValueError("at least one task is required")
    return out
