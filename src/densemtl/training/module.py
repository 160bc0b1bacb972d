"""``MultiTaskModule``: the LightningModule that trains and evaluates any registry model.

It does the training and evaluation steps only; scoring is a :class:`~.scoring.Scorer`, and run
files (metrics JSON, prediction grids, the test report) and checkpoint extras are callbacks
(:mod:`.callbacks`) that :meth:`MultiTaskModule.configure_callbacks` adds to any trainer.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import Tensor

from ..io import save_json
from ..losses import MultiTaskLoss
from ..metrics import MultiTaskMetrics
from ..models import build_model
from ..models.densemtl import MultiTaskNet, SharedFeatures
from ..weighting import Weighting, build_weighting
from .callbacks import (
    DatasetInfo,
    EvaluationWriter,
    PredictionGrid,
    ProgressLog,
    RandomState,
    ReportWriter,
)
from .optim import build_optimizer, build_scheduler
from .scoring import Scorer


class MultiTaskModule(L.LightningModule):
    """Trains any registry model with the paper's losses, optimiser and schedule.

    Args:
        tasks: ordered ``{task: {channels: n} | null}`` (as ``densemtl.tasks.parse_tasks``).
        network: the model's ``network`` config (``arch`` + options), see ``build_model``.
        loss: ``MultiTaskLoss`` options (``weights``, ``scales``, ``scale_weights``,
            ``task_options``).
        weighting: how the weighted task losses become one update, ``{name: ..., <options>}``
            (default ``fixed``, the paper's sum); see ``densemtl.weighting``.
        metrics: per-task metric options, e.g. ``{"depth": {"max_depth": 10}}``.
        optimizer: ``name`` (adam | adamw | sgd), ``lr`` (everything but the encoder),
            ``backbone_lr`` (the encoder; default ``lr``) and the optimiser's own options.
        scheduler: ``name`` (step | poly | cosine | none) and its options; stepped per iteration.
        baselines: single-task results for delta_m, ``{"semseg/mIoU": 0.41, ...}``.
        baseline_runs: run folders (or metrics.json files) of single-task runs; their results
            are used for the metrics not given in ``baselines``.
        score_metric: what ``val/score`` is: ``delta_m`` or a ``task/metric``; by default
            delta_m when every task's main metric has a baseline when the run starts, else the
            first task's main metric. Chosen once per run (see ``scoring.Scorer``).
        channels_last: train in the channels_last memory format.
        grid_samples: samples shown in the prediction grid written at each evaluation (0: none).
        constant_fit_batches: training batches used to fit the constant predictor whose scores
            ``test`` reports next to the model's (0: no constant predictor).

    After each evaluation, ``results[stage]`` holds the flat metrics with ``delta_m`` / ``score``;
    ``val/score`` (higher is better) is what checkpoints are selected by.
    """

    def __init__(
        self,
        tasks: dict[str, dict[str, int] | None],
        network: dict[str, Any],
        loss: dict[str, Any] | None = None,
        weighting: dict[str, Any] | str | None = None,
        metrics: dict[str, dict[str, Any]] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        baselines: dict[str, float] | None = None,
        baseline_runs: list[str] | None = None,
        score_metric: str | None = None,
        channels_last: bool = False,
        grid_samples: int = 4,
        constant_fit_batches: int = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: MultiTaskNet = build_model({"tasks": tasks, "network": network})
        self.task_names = list(self.net.tasks)
        loss, weighting = _legacy_weighting(loss, weighting)
        self.criterion = MultiTaskLoss(self.task_names, **loss)
        self.weighting: Weighting = build_weighting(weighting, self.task_names)
        self.metric_options = dict(metrics or {})
        self.val_metrics = MultiTaskMetrics(self.net.tasks, self.metric_options, stage="val")
        self.test_metrics = MultiTaskMetrics(self.net.tasks, self.metric_options, stage="test")
        self.scorer = Scorer(self.task_names, baselines, baseline_runs, score_metric)
        self.optimizer_cfg = dict(optimizer or {"name": "adam", "lr": 1e-4})
        self.scheduler_cfg = dict(scheduler or {"name": "none"})
        self.channels_last = channels_last
        self.grid_samples = grid_samples
        self.constant_fit_batches = constant_fit_batches
        self.results: dict[str, dict[str, float]] = {}
        self.checkpoint_step: int | None = None
        self._pending: tuple[Tensor, SharedFeatures] | None = None  # for a gradient method
        self._weights: Tensor | None = None  # effective task weights of the last step
        self._run_dir = Path(".")
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = [EvaluationWriter(), ReportWriter(self.constant_fit_batches),
                                     RandomState(), DatasetInfo(), ProgressLog()]
        if self.grid_samples > 0:
            callbacks.append(PredictionGrid(self.grid_samples))
        if self._trainer is not None and self.trainer.loggers:  # learning rates in the logs
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return callbacks

    def setup(self, stage: str) -> None:
        # ``trainer.log_dir`` is a collective under DDP: read it here, on every process.
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        dm = self.trainer.datamodule
        dataset_class = getattr(dm, "evaluation_dataset_class", None) if dm is not None else None
        for metrics in (self.val_metrics, self.test_metrics):
            metrics.configure(dataset_class)
        self.scorer.choose()  # once per run; a resumed fit restores its original choice

    def on_fit_start(self) -> None:
        if self.weighting.uses_gradients:
            self._prepare_gradient_weighting()
        line = self.scorer.describe()
        if self.trainer.is_global_zero:
            self.print(f"monitored val/score: {line}")
            save_json(self.run_dir / "score.json", {**self.scorer.state(), "description": line})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["densemtl_score"] = self.scorer.state()

    @property
    def run_dir(self) -> Path:
        """The run folder (``trainer.default_root_dir`` with densemtl's loggers)."""
        return self._run_dir

    @property
    def evaluated_step(self) -> int:
        """The training step of the weights being evaluated: the trainer's while fitting, the
        checkpoint's in ``validate`` / ``test`` (where Lightning's ``global_step`` stays 0)."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting or self.checkpoint_step is None:
            return int(self.global_step)
        return self.checkpoint_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _rename_legacy_state(checkpoint.get("state_dict", {}), self.criterion.weights,
                             self.task_names)
        self.checkpoint_step = int(checkpoint.get("global_step", 0))
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        if resuming and "densemtl_score" in checkpoint:  # the kind chosen when the run began
            self.scorer.restore(checkpoint["densemtl_score"])

    def forward(self, image: Tensor) -> dict[str, dict[int, Tensor]]:
        return self.net(self._layout(image))

    def _layout(self, image: Tensor) -> Tensor:
        if self.channels_last:
            return image.contiguous(memory_format=torch.channels_last)
        return image

    # --- training -----------------------------------------------------------------------------

    def supervised_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Forward and the multi-task loss of one labelled batch (logs nothing)."""
        return self.supervised_losses(self(batch["image"]), batch)

    def supervised_losses(self, outputs: dict[str, dict[int, Tensor]],
                          batch: dict[str, Any]) -> dict[str, Tensor]:
        """The task losses of ``outputs`` and their ``total`` under the chosen weighting.

        For a gradient-aggregating weighting the ``total`` is the fixed-weight sum (what is
        logged); the update itself is made in :meth:`backward`.
        """
        terms = self.criterion(outputs, batch)
        if self.weighting.linear or self.weighting.uses_gradients:
            return terms  # fixed weights: the criterion's total, exactly the paper's objective
        values = self._shared_values(self.criterion.weighted(terms))
        total = self.weighting.combine(values)
        if values.requires_grad and torch.is_grad_enabled():
            (grad,) = torch.autograd.grad(total, values, retain_graph=True)
            self._weights = grad.detach() * self.criterion.fixed_weights
        terms["total"] = total
        return terms

    def _shared_values(self, values: Tensor) -> Tensor:
        """Under DDP, the weighted task losses with the values averaged over processes and the
        gradients of this process: a non-linear weighting then gives every process the same
        weights, and the averaged gradient equals one process's on the whole batch."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return values
        mean = values.detach().clone()
        torch.distributed.all_reduce(mean)
        mean /= self.trainer.world_size
        return values + (mean - values.detach())

    def log_training(self, losses: dict[str, Tensor], batch_size: int,
                     extra: dict[str, Tensor] | None = None) -> None:
        """Log the step's losses (and anything in ``extra``)."""
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        logs.update(extra or {})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.weighting.uses_gradients:
            outputs, features = self.net.forward_with_features(self._layout(batch["image"]))
            losses = self.criterion(outputs, batch)
            self._pending = (self.criterion.weighted(losses), features)
        else:
            losses = self.supervised_step(batch)
        self.log_training(losses, batch["image"].shape[0])
        return losses["total"]

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Plain back-propagation, or the gradient aggregation of the chosen weighting."""
        if self._pending is None:
            super().backward(loss, *args, **kwargs)
            return
        values, features = self._pending
        self._pending = None
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate > 1:  # what Lightning does to the returned loss
            values = values / accumulate
        reduce = _all_reduce_mean if self.trainer.world_size > 1 else None
        weights = self.weighting.backward(values, features, self.net.shared_parameters(),
                                          self.net.task_parameters(), reduce)
        if weights is not None:
            self._weights = weights * self.criterion.fixed_weights

    def _prepare_gradient_weighting(self) -> None:
        """Checks and DDP set-up for a gradient-aggregating weighting."""
        name = self.weighting.name
        if "16" in str(self.trainer.precision) and "bf16" not in str(self.trainer.precision):
            raise ValueError(f"weighting '{name}' aggregates task gradients, which does not mix "
                             "with fp16 loss scaling: use trainer.precision bf16-mixed or 32")
        if not self.net.shared_parameters():
            raise ValueError(f"weighting '{name}': the model has no trained shared parameters "
                             "(is the encoder frozen?)")
        ddp = self.trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            # The aggregation all-reduces the per-task gradients itself (see backward).
            ddp.require_backward_grad_sync = False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.weighting.needs_values_after_step:
            self.weighting.after_step(self._values_after_step(batch))
        if self._weights is not None:
            self.log_dict({f"train/{t}/weight": self._weights[i]
                           for i, t in enumerate(self.task_names)},
                          on_step=True, on_epoch=False, batch_size=1)
            self._weights = None

    @torch.no_grad()
    def _values_after_step(self, batch: dict[str, Any]) -> Tensor:
        """The batch's weighted task losses under the updated weights (running statistics of
        normalisation layers are left as the training step left them)."""
        buffers = [(b, b.clone()) for b in self.net.buffers()]
        try:
            values = self.criterion.weighted(self.criterion(self(batch["image"]), batch))
        finally:
            for b, saved in buffers:
                b.copy_(saved)
        return self._shared_values(values)

    def on_train_epoch_start(self) -> None:
        self.weighting.new_epoch()

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups of modules beside the network and the loss (a subclass's own
        networks), each with its ``lr``; they follow the same schedule."""
        return []

    def loss_parameters(self) -> list[torch.nn.Parameter]:
        """Learned parameters of the loss and of the weighting (e.g. uncertainty weights)."""
        return [*self.criterion.parameters(), *self.weighting.optimised_parameters()]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.net, self.loss_parameters(), self.optimizer_cfg,
                                    self.extra_param_groups())
        scheduler = build_scheduler(optimizer, self.scheduler_cfg,
                                    total_steps=self.trainer.estimated_stepping_batches)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # --- evaluation ---------------------------------------------------------------------------

    def _eval_step(self, batch: dict[str, Any], metrics: MultiTaskMetrics,
                   stage: str) -> dict[str, dict[int, Tensor]]:
        out = self(batch["image"])
        metrics.update(out, batch)
        losses = self.criterion(out, batch)
        self.log(f"{stage}/loss", losses["total"], on_step=False, on_epoch=True,
                 batch_size=batch["image"].shape[0], sync_dist=True)
        return out  # for the callbacks (prediction grid)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, self.test_metrics, "test")

    def _finish(self, metrics: MultiTaskMetrics, stage: str) -> None:
        values = self.scorer.score({k: float(v) for k, v in metrics.compute().items()})
        metrics.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items() if math.isfinite(v)},
                      sync_dist=False)
        if not self.trainer.sanity_checking:
            self.results[stage] = values

    def on_validation_epoch_end(self) -> None:
        self._finish(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._finish(self.test_metrics, "test")


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average ``tensors`` in place over the processes, in one collective."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _legacy_weighting(loss: dict[str, Any] | None, weighting: dict[str, Any] | str | None
                      ) -> tuple[dict[str, Any], dict[str, Any] | str | None]:
    """Runs made before weighting methods were plug-ins set ``loss.weighting`` (and
    ``loss.dwa_temperature``): read them as ``weighting``."""
    loss = dict(loss or {})
    old, temperature = loss.pop("weighting", None), loss.pop("dwa_temperature", None)
    if old is None:
        if temperature is not None:
            raise ValueError("loss.dwa_temperature: set weighting: {name: dwa, temperature: ...}")
        return loss, weighting
    if weighting is not None:
        raise ValueError("loss.weighting and weighting are both set: keep only "
                         f"weighting (e.g. weighting: {{name: {old}}})")
    warnings.warn(f"loss.weighting is deprecated: use weighting: {{name: {old}}}", stacklevel=3)
    spec: dict[str, Any] = {"name": old}
    if old == "dwa" and temperature is not None:
        spec["temperature"] = temperature
    return loss, spec


def _rename_legacy_state(state: dict[str, Any], weights: dict[str, float],
                         tasks: list[str]) -> None:
    """Checkpoints from before the weighting plug-ins kept uncertainty and DWA state in the loss."""
    if "criterion.log_vars" in state:
        state["weighting.uw.log_var"] = state.pop("criterion.log_vars")
    if "criterion.dwa_history" in state:
        history = state.pop("criterion.dwa_history").float()
        epochs = int(state.pop("criterion.dwa_epochs"))
        state.pop("criterion.dwa_weights", None)
        fixed = torch.tensor([weights[t] for t in tasks])
        averages = [history[i] * fixed for i in range(2)][2 - min(epochs, 2):]
        state["weighting._extra_state"] = {"_loss_sum": None, "_n_batches": 0,
                                           "_previous_averages": averages}


def reject_gradient_weighting(module: MultiTaskModule, after_step: bool = False) -> None:
    """For training modules whose update has more than the task losses: they take the loss
    scalarisations only (and, with ``after_step``, none that re-evaluate the batch)."""
    w = module.weighting
    if w.uses_gradients or (after_step and w.needs_values_after_step):
        allowed = ["fixed", "uncertainty", "dwa", "geometric_mean"] + ([] if after_step
                                                                         else ["famo"])
        raise ValueError(f"{type(module).__name__} does not support weighting '{w.name}'; use a "
                         f"loss weighting: {', '.join(allowed[:-1])} or {allowed[-1]}")
