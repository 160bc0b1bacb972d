"""Small tensor helpers shared by the task declarations, the losses and the metrics."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


def resize_to(pred: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize ``pred`` [B,C,h,w] to ``size`` (H, W) unless it already has that size.

    ``bilinear`` uses ``align_corners=True`` like the official code (which only resized when both
    H and W differed; we resize when either does).
    """
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    if mode == "nearest":
        return F.interpolate(pred, size=tuple(size), mode="nearest")
    return F.interpolate(pred, size=tuple(size), mode=mode, align_corners=True)


def fp32_context(device: torch.device) -> AbstractContextManager[Any]:
    """A context with autocast disabled on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def sample_mask(has: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    """``has`` [B] (bool) -> float [B,1,1] with 1 for supervised samples (all ones if None)."""
    if has is None:
        return torch.ones(batch_size, 1, 1, device=device)
    if has.shape != (batch_size,):
        raise ValueError(f"'has' must have shape ({batch_size},), got {tuple(has.shape)}")
    return has.to(device=device, dtype=torch.float32).view(batch_size, 1, 1)


def weighted_mean(loss: Tensor, weight: Tensor, denom: Tensor | None = None) -> Tensor:
    """``sum(loss * weight) / sum(weight)`` (or ``/ denom``); 0 with a graph when nothing counts.

    ``loss`` must be finite wherever ``weight`` is 0 (0 * inf would poison the sum).
    """
    total = (loss * weight).sum()
    denom = weight.sum() if denom is None else denom
    return total / denom.clamp_min(_EPS)


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0 (integer inputs are promoted to float64)."""
    den = den.to(num.dtype) if num.is_floating_point() else den.double()
    num = num if num.is_floating_point() else num.double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


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


def as_4d(label: Tensor) -> Tensor:
    """[B,H,W] -> [B,1,H,W]; 4-d tensors pass through."""
    return label.unsqueeze(1) if label.dim() == 3 else label
