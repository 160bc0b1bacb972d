"""``MultiTaskModule``: the LightningModule that trains and evaluates any registry model."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..losses import MultiTaskLoss
from ..metrics import MultiTaskMetrics, delta_m, load_baselines
from ..models import build_model
from ..models.densemtl import MultiTaskNet
from ..tasks import TASKS
from .optim import build_optimizer, build_scheduler
from .report import ConstantPredictor


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _floats(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


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
        channels_last: train in the channels_last memory format.
        grid_samples: samples shown in the prediction grid written at each validation.
        constant_fit_batches: training batches used to fit the constant predictor whose scores
            ``test`` reports next to the model's (0: no constant predictor).
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
        channels_last: bool = False,
        grid_samples: int = 4,
        constant_fit_batches: int = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: MultiTaskNet = build_model({"tasks": tasks, "network": network})
        self.task_names = list(self.net.tasks)
        self.criterion = MultiTaskLoss(self.task_names, **(loss or {}))
        self.val_metrics = MultiTaskMetrics(self.net.tasks, metrics)
        self.test_metrics = MultiTaskMetrics(self.net.tasks, metrics)
        self.constant_metrics = MultiTaskMetrics(self.net.tasks, metrics)
        self.constant_fit_batches = constant_fit_batches
        self.constant: ConstantPredictor | None = None
        self.constant_values: dict[str, Any] | None = None
        self.constant_scores: dict[str, float] | None = None
        self.optimizer_cfg = dict(optimizer or {"name": "adam", "lr": 1e-4})
        self.scheduler_cfg = dict(scheduler or {"name": "none"})
        self.baselines = dict(baselines or {})
        self.baseline_runs = list(baseline_runs or [])
        self.channels_last = channels_last
        self.grid_samples = grid_samples
        self._epoch_losses: dict[str, list[Tensor]] = {}
        self._run_dir = Path(".")
        self._warned_baselines = False
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    # --- helpers ------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # ``trainer.log_dir`` is a collective under DDP: read it here, on every process.
        trainer = self.trainer
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    @property
    def run_dir(self) -> Path:
        """The run folder (``trainer.default_root_dir`` with densemtl's loggers)."""
        return self._run_dir

    def forward(self, image: Tensor) -> dict[str, dict[int, Tensor]]:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)

    def all_baselines(self) -> dict[str, float]:
        """Config baselines, completed from ``baseline_runs`` (config values win).

        Run folders without results yet (single-task runs not trained) are skipped with a
        warning, so a multi-task run can start before its baselines exist.
        """
        found = [r for r in self.baseline_runs
                 if (Path(r) / "metrics.json").is_file() or Path(r).is_file()]
        missing = sorted(set(self.baseline_runs) - set(found))
        if missing and not self._warned_baselines:
            rank_zero_warn(f"delta_m: no results yet in baseline run(s) {missing} "
                           "(train and test the single-task configs first)")
            self._warned_baselines = True
        merged = load_baselines(found) if found else {}
        return {**_floats(merged), **_floats(self.baselines)}

    def _score(self, values: dict[str, float]) -> dict[str, float]:
        """Add delta_m (over the metrics that have a baseline) when baselines exist."""
        base = self.all_baselines()
        names = [n for n in base if n in values and math.isfinite(values[n])]
        if names:
            values["delta_m"] = delta_m(values, base, names)
            values["score"] = values["delta_m"]
        else:  # no baselines: the first task's main metric, signed so that higher is better
            first = f"{self.task_names[0]}/{TASKS[self.task_names[0]].main_metric}"
            sign = 1.0 if TASKS[self.task_names[0]].higher_is_better else -1.0
            values["score"] = sign * values.get(first, float("nan"))
        return values

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the dataset's class names and palette with the weights (for predict)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(dm, "class_names", None)
        palette = getattr(dm, "palette", None)
        checkpoint["densemtl"] = {
            "class_names": None if names is None else list(names),
            "palette": None if palette is None else [list(map(int, c)) for c in palette],
        }
        # dropout draws continue where they stopped when the run is resumed
        checkpoint["densemtl_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["densemtl_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_step = int(checkpoint.get("global_step", 0))
        state = checkpoint.get("densemtl_rng") or {}
        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):  # resumed on another number of GPUs
                torch.cuda.set_rng_state_all(state["cuda"])

    # --- training -----------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.criterion(self(batch["image"]), batch)
        bs = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True,
                      on_epoch=False, batch_size=bs)
        for t in self.task_names:
            self._epoch_losses.setdefault(t, []).append(losses[t].detach())
        return losses["total"]

    def on_train_epoch_end(self) -> None:
        """Epoch-mean task losses, averaged over processes, feed DWA (a no-op otherwise)."""
        if not self._epoch_losses:
            return
        means = {t: torch.stack(v).mean() for t, v in self._epoch_losses.items()}
        means = {t: self.trainer.strategy.reduce(v, reduce_op="mean") for t, v in means.items()}
        self.criterion.epoch_end(means)
        self._epoch_losses = {}

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.net, self.criterion, self.optimizer_cfg)
        scheduler = build_scheduler(optimizer, self.scheduler_cfg,
                                    total_steps=self.trainer.estimated_stepping_batches)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # --- evaluation ---------------------------------------------------------------------------

    def _eval_step(self, batch: dict[str, Any], metrics: MultiTaskMetrics, stage: str,
                   batch_idx: int) -> None:
        out = self(batch["image"])
        metrics.update(out, batch)
        losses = self.criterion(out, batch)
        self.log(f"{stage}/loss", losses["total"], on_step=False, on_epoch=True,
                 batch_size=batch["image"].shape[0], sync_dist=True)
        if batch_idx == 0 and self.grid_samples > 0 and self.trainer.is_global_zero:
            self._write_grid(batch, out, stage)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val", batch_idx)

    def on_test_start(self) -> None:
        """Fit the constant predictor on (up to ``constant_fit_batches``) training batches."""
        self.constant = self.constant_values = self.constant_scores = None
        dm = self.trainer.datamodule
        if self.constant_fit_batches <= 0 or dm is None:
            return
        try:
            dm.setup("fit")
            loader = dm.train_dataloader()
        except Exception as exc:  # no training split: report without the trivial rows
            self.print(f"constant predictor skipped: {exc}")
            return
        batches = (b.get("source", b)
                   for _, b in zip(range(self.constant_fit_batches), loader))
        self.constant = ConstantPredictor(self.net.tasks).fit(batches)
        self.constant_values = self.constant.values()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test", batch_idx)
        if self.constant is not None:
            b, _, h, w = batch["image"].shape
            self.constant_metrics.update(self.constant.outputs(b, h, w, self.device), batch)

    @property
    def evaluated_step(self) -> int:
        """The training step of the weights being evaluated: the trainer's while fitting, the
        checkpoint's in ``validate`` / ``test`` (where Lightning's ``global_step`` stays 0)."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        ckpt_step = getattr(self, "checkpoint_step", None)
        return int(self.global_step if fitting or ckpt_step is None else ckpt_step)

    def _finish(self, metrics: MultiTaskMetrics, stage: str) -> dict[str, float]:
        values = self._score(_floats(metrics.compute()))
        metrics.reset()
        loggable = {f"{stage}/{k}": v for k, v in values.items() if math.isfinite(v)}
        self.log_dict(loggable, sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            step = self.evaluated_step
            payload = {"stage": stage, "step": step,
                       "epoch": int(self.current_epoch), "metrics": values}
            name = f"{stage}-step{step:07d}.json"
            write_json(self.run_dir / "metrics" / name, payload)
            write_json(self.run_dir / "metrics" / f"{stage}-last.json", payload)
        return values

    def on_validation_epoch_end(self) -> None:
        self._finish(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        if self.constant is not None:
            self.constant_scores = self._score(_floats(self.constant_metrics.compute()))
            self.constant_metrics.reset()
        values = self._finish(self.test_metrics, "test")
        if self.trainer.is_global_zero:
            from .report import write_test_outputs

            write_test_outputs(self, values)

    def _write_grid(self, batch: dict[str, Any], out: dict[str, dict[int, Tensor]],
                    stage: str) -> None:
        from ..viz import prediction_grid, save_png

        if self.trainer.sanity_checking:
            return
        n = min(self.grid_samples, batch["image"].shape[0])
        preds, targets = {}, {}
        for t in self.task_names:
            preds[t] = TASKS[t].decode(out[t][0][:n].float()).cpu().numpy()
            key = TASKS[t].label_key
            if key in batch:
                targets[t] = batch[key][:n].cpu().numpy()
        palette = getattr(self.trainer.datamodule, "palette", None)
        rgb = prediction_grid(batch["image"][:n].float().cpu().numpy(), preds, targets, palette)
        save_png(self.run_dir / "grids" / f"{stage}-step{self.global_step:07d}.png", rgb)
