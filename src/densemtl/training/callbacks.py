"""The training module's helpers with one job each, as Lightning callbacks.

``MultiTaskModule.configure_callbacks`` adds them to every trainer, so ``densemtl fit`` and a
hand-built ``Trainer`` behave the same:

* :class:`EvaluationWriter`: one JSON per evaluation in ``<run>/metrics/``;
* :class:`PredictionGrid`: images, labels and predictions per evaluation, ``<run>/grids/*.png``;
* :class:`ReportWriter`: ``metrics.json`` and ``report.md`` after ``test``, with the scores of the
  best constant predictor fitted on training labels;
* :class:`RandomState`: the RNG state in checkpoints, so dropout draws resume where they stopped;
* :class:`DatasetInfo`: the dataset's class names and palette in checkpoints (used by predict);
* :class:`ProgressLog`: without a progress bar (not a terminal), a line every half minute.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..io import save_json, save_png, save_text
from ..metrics import MultiTaskMetrics
from ..tasks import get_task
from ..viz import prediction_grid
from .report import ConstantPredictor, describe_constant, render_report

if TYPE_CHECKING:
    from .module import MultiTaskModule


def _writing(trainer: Trainer) -> bool:
    """Whether this process writes run files now (rank 0, not the sanity check)."""
    return trainer.is_global_zero and not trainer.sanity_checking


class EvaluationWriter(Callback):
    """``metrics/<stage>-step<step>.json`` and ``metrics/<stage>-last.json`` per evaluation."""

    def _write(self, trainer: Trainer, module: MultiTaskModule, stage: str) -> None:
        if not _writing(trainer) or stage not in module.results:
            return
        step = module.evaluated_step
        payload = {"stage": stage, "step": step, "epoch": int(module.current_epoch),
                   "metrics": module.results[stage]}
        for name in (f"{stage}-step{step:07d}.json", f"{stage}-last.json"):
            save_json(module.run_dir / "metrics" / name, payload, sort_keys=False)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "val")  # type: ignore[arg-type]

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "test")  # type: ignore[arg-type]


class PredictionGrid(Callback):
    """Image, labels and predictions of the first ``samples`` images of each evaluation."""

    def __init__(self, samples: int = 4) -> None:
        self.samples = samples

    def _write(self, trainer: Trainer, module: MultiTaskModule, outputs: Any,
               batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        if batch_idx != 0 or not _writing(trainer) or not isinstance(outputs, dict):
            return
        n = min(self.samples, batch["image"].shape[0])
        preds, targets = {}, {}
        for name, scales in outputs.items():
            task = get_task(name)
            preds[name] = task.decode(scales[0][:n].float()).cpu().numpy()
            if task.label_key in batch:
                targets[name] = batch[task.label_key][:n].cpu().numpy()
        palette = getattr(trainer.datamodule, "palette", None)
        rgb = prediction_grid(batch["image"][:n].float().cpu().numpy(), preds, targets, palette)
        save_png(module.run_dir / "grids" / f"{stage}-step{module.global_step:07d}.png", rgb)
        for logger in trainer.loggers:  # and into TensorBoard
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(add_image):
                add_image(f"{stage}/predictions", rgb, module.global_step, dataformats="HWC")

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._write(trainer, pl_module, outputs, batch, batch_idx, "val")  # type: ignore[arg-type]

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._write(trainer, pl_module, outputs, batch, batch_idx, "test")  # type: ignore[arg-type]


class ReportWriter(Callback):
    """``metrics.json`` (flat ``{task/metric: value}``) and ``report.md`` in the run folder.

    Next to the model's scores it reports those of the best input-independent predictor
    (:class:`ConstantPredictor`), fitted on up to ``constant_fit_batches`` training batches
    (0: no constant predictor): what a model must beat before it has learnt anything.
    """

    def __init__(self, constant_fit_batches: int = 50) -> None:
        self.constant_fit_batches = constant_fit_batches
        self.constant: ConstantPredictor | None = None
        self.metrics: MultiTaskMetrics | None = None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.constant = self.metrics = None
        dm = trainer.datamodule
        if self.constant_fit_batches <= 0 or dm is None:
            return
        try:
            dm.setup("fit")
            loader = dm.train_dataloader()
        except Exception as exc:  # no training split: report without the trivial rows
            pl_module.print(f"constant predictor skipped: {exc}")
            return
        batches = (b.get("source", b) for _, b in zip(range(self.constant_fit_batches), loader))
        module: MultiTaskModule = pl_module  # type: ignore[assignment]
        self.constant = ConstantPredictor(module.net.tasks).fit(batches)
        self.metrics = MultiTaskMetrics(module.net.tasks, module.metric_options,
                                        stage="test").to(
            pl_module.device)
        self.metrics.configure(getattr(dm, "evaluation_dataset_class", None))

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.constant is None or self.metrics is None:
            return
        b, _, h, w = batch["image"].shape
        self.metrics.update(self.constant.outputs(b, h, w, pl_module.device), batch)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module: MultiTaskModule = pl_module  # type: ignore[assignment]
        constant: dict[str, float] = {}
        if self.metrics is not None:  # every process takes part in the metrics' reduction
            values = {k: float(v) for k, v in self.metrics.compute().items()}
            constant = module.scorer.score(values)
        if not trainer.is_global_zero or "test" not in module.results:
            return
        values = module.results["test"]
        run = module.run_dir
        ckpt = getattr(trainer, "ckpt_path", None)
        result = {"metrics": values, "constant_predictor": constant,
                  "step": module.evaluated_step, "checkpoint": None if ckpt is None else str(ckpt)}
        # metrics.json / report.md are the latest test; every test also keeps its own copy
        # (reports/<checkpoint>-step<N>.*), so testing another checkpoint loses nothing
        tag = f"{Path(str(ckpt)).stem if ckpt else 'weights'}-step{module.evaluated_step:07d}"
        save_json(run / "metrics.json", result, sort_keys=False)
        save_json(run / "reports" / f"{tag}.json", result, sort_keys=False)
        dm = trainer.datamodule
        info = {
            "run folder": str(run),
            "checkpoint": str(getattr(trainer, "ckpt_path", None) or "(weights in memory)"),
            "model": f"{module.net.config['network']['arch']}, tasks "
                     f"{', '.join(module.task_names)}, "
                     f"{sum(p.numel() for p in module.net.parameters()):,} parameters",
            "data": f"{getattr(dm, 'dataset_name', type(dm).__name__)} "
                    f"({getattr(dm, 'splits', {}).get('test', 'test')} split)",
            "step": module.evaluated_step,
        }
        try:
            names = list(dm.class_names) if dm is not None else None
        except Exception:  # a data module without class names (e.g. an image folder)
            names = None
        info["constant predictor"] = describe_constant(
            self.constant.values() if self.constant else {}, names)
        info["score"] = module.scorer.describe()
        edges = module.test_metrics.metrics["edges"] if "edges" in module.task_names else None
        if edges is not None:
            unit = "px" if edges.tolerance_unit == "pixels" else "of the diagonal"
            proxy = f"tolerance F (tol*) at {edges.tolerance:g} {unit}"
            info["edges"] = (f"BSDS protocol (ods*, ois*, ap) at max_dist {edges.max_dist:g} of "
                             f"the diagonal; {proxy}" if edges.bsds else proxy)
        for task, metric in module.test_metrics.metrics.items():
            if getattr(metric, "median_scaling", False):
                info[task] = (f"each image's prediction scaled by median(GT) / median(prediction) "
                              f"(the self-supervised protocol), GT in ({metric.min_depth:g}, "
                              f"{metric.max_depth:g}) m")
        report = render_report(values, constant, info, names,
                               module.scorer.delta_m_note(values))
        save_text(run / "report.md", report)
        save_text(run / "reports" / f"{tag}.md", report)


class RandomState(Callback):
    """Saves the torch (and CUDA) RNG state with each checkpoint and restores it on resume."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["densemtl_rng"] = state

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("densemtl_rng") or {}
        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):  # resumed on another number of GPUs
                torch.cuda.set_rng_state_all(state["cuda"])


class DatasetInfo(Callback):
    """Keeps the dataset's class names, palette and image size (the resolution ``predict`` runs
    at by default) with the weights."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        dm = trainer.datamodule
        names = getattr(dm, "class_names", None)
        palette = getattr(dm, "palette", None)
        height, width = getattr(dm, "height", None), getattr(dm, "width", None)
        checkpoint["densemtl"] = {
            "class_names": None if names is None else list(names),
            "palette": None if palette is None else np.asarray(palette).astype(int).tolist(),
            "input_size": None if not (height and width) else [int(height), int(width)],
        }


class ProgressLog(Callback):
    """When no progress bar is shown (output not a terminal, or ``enable_progress_bar:
    false``), a line on stdout at most every ``interval`` seconds while training (step, loss,
    seconds per step, time left) or evaluating (batch), and one per finished evaluation: a log
    file shows progress too."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._start = self._last = 0.0
        self._first = 0

    def _active(self, trainer: Trainer) -> bool:
        return trainer.is_global_zero and trainer.progress_bar_callback is None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._first = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now, step = time.monotonic(), trainer.global_step
        end = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if not self._active(trainer) or (now - self._last < self.interval
                                         and step != self._first + 1 and step != end):
            return
        self._last = now
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        per_step = (now - self._start) / max(step - self._first, 1)
        left = f", about {(end - step) * per_step / 60:.1f} min left" if end else ""
        shown = f"loss {float(loss):.4f}, " if loss is not None else ""
        print(f"step {step}{f'/{end}' if end else ''} (epoch {trainer.current_epoch}): {shown}"
              f"{per_step:.2f} s/step{left}", flush=True)

    def _evaluated(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        results = getattr(module, "results", {}).get(stage)
        if not self._active(trainer) or trainer.sanity_checking or not results:
            return
        main = {k: v for k, v in results.items() if k.count("/") == 1 and not k.startswith(
            ("delta", "score"))}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in list(main.items())[:6])
        print(f"{stage} at step {getattr(module, 'evaluated_step', trainer.global_step)}: "
              f"{shown}", flush=True)

    def _batch(self, trainer: Trainer, stage: str, batch_idx: int, total: Any) -> None:
        now = time.monotonic()
        if not self._active(trainer) or trainer.sanity_checking or now - self._last < \
                self.interval:
            return
        self._last = now
        of = f"/{int(total)}" if isinstance(total, (int, float)) and total < float("inf") else ""
        print(f"{stage}: batch {batch_idx + 1}{of}", flush=True)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        total = (trainer.num_val_batches or [None])[dataloader_idx]
        self._batch(trainer, "val", batch_idx, total)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = time.monotonic()

    on_validation_start = on_test_start

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        total = (trainer.num_test_batches or [None])[dataloader_idx]
        self._batch(trainer, "test", batch_idx, total)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluated(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluated(trainer, pl_module, "test")
