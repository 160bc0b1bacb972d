"""``GradientConflict``: how much the tasks pull the shared encoder in different directions.

Every ``every_n_steps`` training steps (at steps n-1, 2n-1, ...: the steps Lightning writes logs
at when ``every_n_steps`` is a multiple of ``trainer.log_every_n_steps``, which is checked),
before the step, the callback takes each task's gradient
of its weighted loss ``w_t L_t`` with respect to the shared parameters
(``MultiTaskNet.shared_parameters``) on the step's batch, and logs

* ``conflict/cos/<a>-<b>``: the cosine similarity of the gradients of tasks a and b;
* ``conflict/cos_mean`` and ``conflict/cos_min``: their mean and minimum over task pairs;
* ``conflict/norm/<t>``: the norm of task t's gradient.

A negative cosine means that a step along one task's gradient increases the other task's loss.
The measurement leaves training untouched: normalisation statistics and the random state are
restored afterwards, so a run with the callback takes the same steps as one without. It costs one
forward pass and one backward pass per task at every measured step. Under DDP each process
measures its own part of the batch (rank 0's values are logged).

    densemtl fit --config ... --trainer.callbacks+=densemtl.training.GradientConflict \\
        --trainer.callbacks.every_n_steps 25
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from ..weighting.base import gradients_at_features


class GradientConflict(Callback):
    """Log the cosine similarity of the task gradients on the shared parameters."""

    def __init__(self, every_n_steps: int = 25) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self._measured: dict[str, float] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps % trainer.log_every_n_steps:
            raise ValueError(
                f"GradientConflict every_n_steps {self.every_n_steps} must be a multiple of "
                f"trainer.log_every_n_steps {trainer.log_every_n_steps} (other steps are not "
                "written to the logs)")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if (trainer.global_step + 1) % self.every_n_steps == 0:  # measured before the step ...
            self._measured = conflict_metrics(task_gramian(pl_module, batch),
                                              list(pl_module.task_names))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._measured is not None:  # ... logged once, with the step's other values
            pl_module.log_dict(self._measured, on_step=True, on_epoch=False, batch_size=1)
            self._measured = None


@torch.enable_grad()
def task_gramian(module: Any, batch: dict[str, Any]) -> Tensor:
    """``G[i, j] = g_i . g_j`` of the task gradients g_t of ``w_t L_t`` on the shared parameters
    (float64), leaving the module's buffers, gradients and random state as they were."""
    net = module.net
    buffers = [(b, b.clone()) for b in net.buffers()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        outputs, features = net.forward_with_features(module._layout(batch["image"]))
        values = module.criterion.weighted(module.criterion(outputs, batch))
        used, rows, _ = gradients_at_features(values, features)
        shared = net.shared_parameters()
        jac = torch.autograd.grad([features.outputs[k] for k in used], shared,
                                  grad_outputs=rows, is_grads_batched=True, allow_unused=True)
        gram = torch.zeros(len(values), len(values), dtype=torch.float64, device=values.device)
        for j in jac:
            if j is not None:
                flat = j.reshape(j.shape[0], -1).double()
                gram += flat @ flat.T
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return gram


def conflict_metrics(gram: Tensor, names: list[str]) -> dict[str, float]:
    """Cosines of every task pair, their mean and minimum, and the gradient norms."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    logs: dict[str, float] = {f"conflict/norm/{t}": float(n) for t, n in zip(names, norms)}
    cosines = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            denom = float(norms[i] * norms[j])
            cos = float(gram[i, j]) / denom if denom > 0 else 0.0
            logs[f"conflict/cos/{names[i]}-{names[j]}"] = cos
            cosines.append(cos)
    if cosines:
        logs["conflict/cos_mean"] = sum(cosines) / len(cosines)
        logs["conflict/cos_min"] = min(cosines)
    return logs
