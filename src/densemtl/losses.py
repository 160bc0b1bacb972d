"""The multi-task training loss: every task's own loss, over scales, combined into a total.

Each task brings its loss (``Task.loss``: see ``densemtl/tasks``); this module averages it over
the supervised output scales and combines the tasks with fixed weights (the paper), uncertainty
weighting or DWA. Predictions are resized to the label size inside each task loss; samples whose
``has_<label>`` flag is False contribute nothing, and a task whose label is absent from the batch
contributes an exact 0 attached to the graph. Nothing here reads a tensor value on the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .tasks import get_task

__all__ = ["PAPER_WEIGHTS", "MultiTaskLoss", "paper_weights"]

_EPS = 1e-12

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
        if weighting not in ("fixed", "uncertainty", "dwa"):
            raise ValueError(f"unknown weighting {weighting!r}")
        self.weighting = weighting
        self.dwa_temperature = float(dwa_temperature)
        self.losses = nn.ModuleDict(
            {t.name: t.build_loss(**dict(task_options.get(t.name, {}))) for t in declared})
        self.label_keys = {t.name: t.label_key for t in declared}
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
