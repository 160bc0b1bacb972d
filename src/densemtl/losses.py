"""The multi-task training loss: every task's own loss, over scales, with its fixed weight.

Each task brings its loss (``Task.loss``: see ``densemtl/tasks``); this module averages it over
the supervised output scales and weights each task with its fixed weight. How the weighted task
losses then become one update (a sum, a learned or adaptive weighting, or a gradient
aggregation) is a ``densemtl.weighting`` method chosen by the training module. Predictions are
resized to the label size inside each task loss; samples whose ``has_<label>`` flag is False
contribute nothing, and a task whose label is absent from the batch contributes an exact 0
attached to the graph. Nothing here reads a tensor value on the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .tasks import get_task

__all__ = ["PAPER_WEIGHTS", "MultiTaskLoss", "paper_weights"]

PAPER_WEIGHTS: dict[tuple[str, ...], dict[str, float]] = {
    ("semseg", "depth"): {"semseg": 50.0, "depth": 1.0},
    ("semseg", "depth", "normals"): {"semseg": 100.0, "depth": 1.0, "normals": 100.0},
    ("semseg", "depth", "normals", "edges"):
        {"semseg": 100.0, "depth": 1.0, "normals": 100.0, "edges": 50.0},
}
"""The paper's fixed loss weights per task set (they balance a depth loss in normalised inverse
depth units, which are large numbers)."""


def paper_weights(tasks: Iterable[str]) -> dict[str, float]:
    """The paper's loss weights for ``tasks`` (any order).

    Task sets the paper did not train use the weights of its largest set, and 1 for tasks it
    never had.
    """
    tasks = list(tasks)
    for names, weights in PAPER_WEIGHTS.items():
        if sorted(names) == sorted(tasks):
            return {t: weights[t] for t in tasks}
    largest = max(PAPER_WEIGHTS.values(), key=len)
    return {t: largest.get(t, 1.0) for t in tasks}


class MultiTaskLoss(nn.Module):
    """Multi-scale task losses, their fixed weights and the fixed-weight total.

    Task loss ``L_t = mean over supervised scales s of scale_weight_s * L_{t,s}`` where the
    supervised scales are those of ``scales`` that the model actually outputs (baselines may
    only have scale 0). ``total = sum_t w_t L_t`` with ``w_t = weights[t]`` (1 when not listed),
    the paper's objective; :meth:`weighted` gives the vector ``w_t L_t`` that a
    ``densemtl.weighting`` method combines instead.

    Args:
        tasks: task names in order (a ``{task: channels}`` mapping is accepted too).
        weights: fixed per-task weights ``{task: w}``.
        scales: output scales to supervise.
        scale_weights: one weight per entry of ``scales`` (default all 1).
        task_options: keyword arguments for each task's loss class, e.g.
            ``{"depth": {"reduction": "all"}, "edges": {"pos_weight": 0.9}}``.

    ``forward(outputs, batch)`` returns ``{"<task>/s<scale>": L_{t,s}, "<task>": L_t, ...,
    "total": total}``. A task whose label key is missing from the batch contributes an exact 0.
    """

    def __init__(
        self,
        tasks: Sequence[str] | Mapping[str, Any],
        weights: Mapping[str, float] | None = None,
        scales: Sequence[int] = (0, 1),
        scale_weights: Sequence[float] | None = None,
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("MultiTaskLoss needs at least one task")
        declared = [get_task(name) for name in self.tasks]
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
        self.losses = nn.ModuleDict(
            {t.name: t.build_loss(**dict(task_options.get(t.name, {}))) for t in declared})
        self.label_keys = {t.name: t.label_key for t in declared}

    def task_loss(self, task: str, preds: Mapping[int, Tensor] | Tensor,
                  batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-scale terms and the scale-averaged loss of one task (without its task weight)."""
        if isinstance(preds, Tensor):
            preds = {0: preds}
        present = [(s, w) for s, w in zip(self.scales, self.scale_weights) if s in preds]
        if not present:
            raise KeyError(f"task '{task}': the model output has scales {sorted(preds)}, "
                           f"none of the supervised scales {self.scales}")
        key = self.label_keys[task]
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
        terms["total"] = self.weighted(terms).sum()
        return terms

    def weighted(self, terms: Mapping[str, Tensor]) -> Tensor:
        """The vector ``[w_t L_t]`` in task order, from :meth:`forward`'s terms."""
        task_losses = torch.stack([terms[t] for t in self.tasks])
        return self.fixed_weights.to(task_losses.dtype) * task_losses
