"""Training losses: one module per task plus the multi-scale, multi-task combination.

Every task loss takes the raw head output of one scale, the label at label resolution and the
optional ``has`` flags of the batch, and returns a scalar fp32 tensor:

* ``semseg``  softmax cross-entropy, pixels labelled ``IGNORE_INDEX`` (255) ignored;
* ``depth``   BerHu on the official normalised inverse depth ``65536 / (100 D + 1)``;
* ``normals`` ``1 - cos(pred, gt)`` over pixels with a non-zero ground-truth normal;
* ``edges``   class-weighted cross-entropy, weights ``[1 - pos_weight, pos_weight]``
  (2-channel softmax, or the equivalent sigmoid BCE for a 1-channel head).

Predictions are resized to the label size (bilinear, ``align_corners=True``) whenever H or W
differ. Samples whose ``has`` flag is False contribute nothing; when no pixel in the batch is
supervised the loss is an exact 0 that is still attached to the graph. No function here reads a
tensor value on the host (no ``.item()``), and losses are computed in fp32 with autocast off.
See ``docs/metrics.md`` for the differences from the official implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tasks import (
    IGNORE_INDEX,
    TASKS,
    channel_sq_norm,
    depth_to_inverse,
    get_task,
    unit_vectors,
)

__all__ = [
    "LOSSES",
    "BerHuLoss",
    "EdgesLoss",
    "MultiTaskLoss",
    "NormalsLoss",
    "SemsegLoss",
    "TaskLoss",
    "berhu",
    "resize_to",
]

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


def berhu(err: Tensor, c: Tensor) -> Tensor:
    """Reverse Huber of the absolute error ``err`` with threshold ``c`` (a 0-dim tensor).

    ``err`` if ``err <= c`` else ``(err^2 + c^2) / (2c)``. ``c = 0`` (a perfect batch) is
    handled: the result is then ``err`` (= 0) with finite gradients.
    """
    c = c.clamp_min(_EPS)
    return torch.where(err <= c, err, (err * err + c * c) / (2.0 * c))


def _as_4d(label: Tensor) -> Tensor:
    """[B,H,W] -> [B,1,H,W]; 4-d labels pass through."""
    return label.unsqueeze(1) if label.dim() == 3 else label


class TaskLoss(nn.Module):
    """Base class: resizes the prediction, builds the per-sample mask, runs in fp32.

    Subclasses implement :meth:`compute` on a prediction that already has the label's size.
    """

    def forward(self, pred: Tensor, target: Tensor, has: Tensor | None = None) -> Tensor:
        """Loss of raw head output ``pred`` [B,C,h,w] against ``target`` at label resolution.

        ``has`` [B] bool marks the samples that carry this label (None: all of them).
        """
        if pred.dim() != 4:
            raise ValueError(f"{type(self).__name__}: prediction must be [B,C,H,W], got "
                             f"{tuple(pred.shape)}")
        with fp32_context(pred.device):
            pred = resize_to(pred.float(), target.shape[-2:])
            mask = sample_mask(has, pred.shape[0], pred.device)
            return self.compute(pred, target, mask)

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """``mask`` is float [B,1,1]: 1 for supervised samples."""
        raise NotImplementedError


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
        target = _as_4d(target).float()
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


class NormalsLoss(TaskLoss):
    """``1 - cos`` between the (normalised) prediction and GT over pixels with a non-zero GT."""

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = target.float()
        valid = channel_sq_norm(target) > 0
        cos = (unit_vectors(pred) * unit_vectors(target)).sum(1)
        return weighted_mean(1.0 - cos, valid.float() * mask)


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
        target = _as_4d(target)[:, 0].float()
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


LOSSES: dict[str, type[TaskLoss]] = {
    "semseg": SemsegLoss,
    "depth": BerHuLoss,
    "normals": NormalsLoss,
    "edges": EdgesLoss,
}
"""Default loss class per task name; options come from ``MultiTaskLoss(task_options=...)``."""


class MultiTaskLoss(nn.Module):
    """Weighted sum of multi-scale task losses.

    Task loss ``L_t = mean over supervised scales s of scale_weight_s * L_{t,s}`` where the
    supervised scales are those of ``scales`` that the model actually outputs (baselines may
    only have scale 0). The total depends on ``weighting``:

    * ``"fixed"``: ``sum_t w_t L_t`` with ``w_t = weights[t]`` (1 when not listed) - the paper;
    * ``"uncertainty"`` (Kendall et al., 2018): ``sum_t 0.5 exp(-s_t) w_t L_t + 0.5 s_t`` with
      learnable log-variances ``s_t`` (initialised to 0; put this module's parameters in the
      optimiser);
    * ``"dwa"`` (Liu et al., 2019): ``sum_t lambda_t w_t L_t`` with
      ``lambda = T * softmax(r / temperature)``, ``r_t = L_t(e-1) / L_t(e-2)`` from the epoch
      averages passed to :meth:`epoch_end` (``lambda = 1`` for the first two epochs).

    Args:
        tasks: task names in order (a ``{task: channels}`` mapping is accepted too).
        weights: fixed per-task weights ``{task: w}``.
        scales: output scales to supervise.
        scale_weights: one weight per entry of ``scales`` (default all 1).
        weighting: ``"fixed"``, ``"uncertainty"`` or ``"dwa"``.
        dwa_temperature: DWA temperature (2 in the paper).
        task_options: keyword arguments for each task's loss class, e.g.
            ``{"depth": {"reduction": "all"}, "edges": {"pos_weight": 0.9}}``.

    ``forward(outputs, batch)`` returns ``{"<task>/s<scale>": L_{t,s}, "<task>": L_t, ...,
    "total": total}``, plus ``"<task>/weight"`` (the effective, detached weight) for the dynamic
    weightings. A task whose label key is missing from the batch contributes an exact 0.
    """

    def __init__(
        self,
        tasks: Sequence[str] | Mapping[str, Any],
        weights: Mapping[str, float] | None = None,
        scales: Sequence[int] = (0, 1),
        scale_weights: Sequence[float] | None = None,
        weighting: Literal["fixed", "uncertainty", "dwa"] = "fixed",
        dwa_temperature: float = 2.0,
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("MultiTaskLoss needs at least one task")
        for name in self.tasks:
            get_task(name)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"duplicate task in {self.tasks}")
        weights = dict(weights or {})
        task_options = dict(task_options or {})
        for what, names in (("weights", weights), ("task_options", task_options)):
            unknown = set(names) - set(self.tasks)
            if unknown:
                raise ValueError(f"{what} name task(s) {sorted(unknown)} not in {self.tasks}")
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        # a buffer, so the loss never copies the weights from the host at every step
        self.register_buffer("fixed_weights", torch.tensor([self.weights[t] for t in self.tasks]),
                             persistent=False)
        self.scales = [int(s) for s in scales]
        if not self.scales:
            raise ValueError("at least one scale is required")
        scale_weights = [1.0] * len(self.scales) if scale_weights is None else list(scale_weights)
        if len(scale_weights) != len(self.scales):
            raise ValueError(f"scale_weights {scale_weights} must match scales {self.scales}")
        self.scale_weights = [float(w) for w in scale_weights]
        if weighting not in ("fixed", "uncertainty", "dwa"):
            raise ValueError(f"unknown weighting {weighting!r}")
        self.weighting = weighting
        self.dwa_temperature = float(dwa_temperature)
        self.losses = nn.ModuleDict(
            {t: LOSSES[t](**dict(task_options.get(t, {}))) for t in self.tasks}
        )
        n = len(self.tasks)
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(n))
        if weighting == "dwa":
            self.register_buffer("dwa_weights", torch.ones(n))
            self.register_buffer("dwa_history", torch.zeros(2, n))  # [L(e-2), L(e-1)]
            self.register_buffer("dwa_epochs", torch.zeros((), dtype=torch.long))

    def task_loss(self, task: str, preds: Mapping[int, Tensor] | Tensor,
                  batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-scale terms and the scale-averaged loss of one task (without its task weight)."""
        if isinstance(preds, Tensor):
            preds = {0: preds}
        present = [(s, w) for s, w in zip(self.scales, self.scale_weights) if s in preds]
        if not present:
            raise KeyError(f"task '{task}': the model output has scales {sorted(preds)}, "
                           f"none of the supervised scales {self.scales}")
        key = TASKS[task].label_key
        if key not in batch:  # nobody in this batch carries the label
            zero = sum(preds[s].float().sum() for s, _ in present) * 0.0
            return {task: zero}
        target, has = batch[key], batch.get(f"has_{key}")
        terms = {f"{task}/s{s}": self.losses[task](preds[s], target, has) for s, _ in present}
        total = sum(w * terms[f"{task}/s{s}"] for s, w in present) / len(present)
        terms[task] = total
        return terms

    def forward(self, outputs: Mapping[str, Mapping[int, Tensor] | Tensor],
                batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``outputs``: ``{task: {scale: raw}}``; ``batch``: labels and ``has_<key>`` flags."""
        terms: dict[str, Tensor] = {}
        for task in self.tasks:
            if task not in outputs:
                raise KeyError(f"model output has no task '{task}' (has {sorted(outputs)})")
            terms.update(self.task_loss(task, outputs[task], batch))
        task_losses = torch.stack([terms[t] for t in self.tasks])
        fixed = self.fixed_weights.to(task_losses.dtype)
        if self.weighting == "uncertainty":
            log_vars = self.log_vars.float()
            weight = 0.5 * torch.exp(-log_vars) * fixed
            total = (weight * task_losses).sum() + 0.5 * log_vars.sum()
        elif self.weighting == "dwa":
            weight = self.dwa_weights.float() * fixed
            total = (weight * task_losses).sum()
        else:
            weight = fixed
            total = (weight * task_losses).sum()
        if self.weighting != "fixed":
            for i, task in enumerate(self.tasks):
                terms[f"{task}/weight"] = weight[i].detach()
        terms["total"] = total
        return terms

    @torch.no_grad()
    def epoch_end(self, avg_losses: Mapping[str, float | Tensor]) -> None:
        """Feed the epoch's average task losses ``{task: L_t}`` (a no-op unless DWA).

        Call it once per training epoch with the same values on every process (e.g. epoch
        means reduced across ranks). The DWA state is saved in the ``state_dict``.
        """
        if self.weighting != "dwa":
            return
        missing = [t for t in self.tasks if t not in avg_losses]
        if missing:
            raise KeyError(f"epoch_end: no average loss for task(s) {missing}")
        current = torch.stack([torch.as_tensor(avg_losses[t], dtype=torch.float32).reshape(())
                               for t in self.tasks]).to(self.dwa_history.device)
        self.dwa_history.copy_(torch.stack([self.dwa_history[1], current]))
        self.dwa_epochs += 1
        if int(self.dwa_epochs) >= 2:
            ratio = self.dwa_history[1] / self.dwa_history[0].clamp_min(_EPS)
            self.dwa_weights.copy_(len(self.tasks) * torch.softmax(ratio / self.dwa_temperature, 0))
