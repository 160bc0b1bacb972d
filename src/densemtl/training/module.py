"""``MultiTaskModule``: the LightningModule that trains and evaluates any registry model.

It does the training and evaluation steps only; scoring is a :class:`~.scoring.Scorer`, and run
files (metrics JSON, prediction grids, the test report) and checkpoint extras are callbacks
(:mod:`.callbacks`) that :meth:`MultiTaskModule.configure_callbacks` adds to any trainer.
"""

from __future__ import annotations

import math
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
from ..models.densemtl import MultiTaskNet
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
        loss: ``MultiTaskLoss`` options (``weights``, ``scales``, ``weighting``, ...).
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
        self.criterion = MultiTaskLoss(self.task_names, **(loss or {}))
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
        self._epoch_losses: dict[str, list[Tensor]] = {}
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
        self.checkpoint_step = int(checkpoint.get("global_step", 0))
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        if resuming and "densemtl_score" in checkpoint:  # the kind chosen when the run began
            self.scorer.restore(checkpoint["densemtl_score"])

    def forward(self, image: Tensor) -> dict[str, dict[int, Tensor]]:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)

    # --- training -----------------------------------------------------------------------------

    def supervised_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Forward and the multi-task loss of one labelled batch (logs nothing)."""
        return self.criterion(self(batch["image"]), batch)

    def log_training(self, losses: dict[str, Tensor], batch_size: int,
                     extra: dict[str, Tensor] | None = None) -> None:
        """Log the step's losses and keep the task losses for the epoch's DWA update."""
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        logs.update(extra or {})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)
        for t in self.task_names:
            self._epoch_losses.setdefault(t, []).append(losses[t].detach())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.supervised_step(batch)
        self.log_training(losses, batch["image"].shape[0])
        return losses["total"]

    def on_train_epoch_end(self) -> None:
        """Epoch-mean task losses, averaged over processes, feed DWA (a no-op otherwise)."""
        if not self._epoch_losses:
            return
        means = {t: torch.stack(v).mean() for t, v in self._epoch_losses.items()}
        means = {t: self.trainer.strategy.reduce(v, reduce_op="mean") for t, v in means.items()}
        self.criterion.epoch_end(means)
        self._epoch_losses = {}

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups of modules beside the network and the loss (a subclass's own
        networks), each with its ``lr``; they follow the same schedule."""
        return []

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.net, self.criterion, self.optimizer_cfg,
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
