"""The training module's helpers with one job each, as Lightning callbacks.

``MultiTaskModule.configure_callbacks`` adds them to every trainer, so ``densemtl fit`` and a
hand-built ``Trainer`` behave the same:

* :class:`EvaluationWriter`: one JSON per evaluation in ``<run>/metrics/``;
* :class:`PredictionGrid`: images, labels and predictions per evaluation, ``<run>/grids/*.png``;
* :class:`ReportWriter`: ``metrics.json`` and ``report.md`` after ``test``, with the scores of the
  best constant predictor fitted on training labels;
* :class:`RandomState`: the RNG state in checkpoints, so dropout draws resume where they stopped;
* :class:`DatasetInfo`: the dataset's class names and palette in checkpoints (used by predict).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..io import save_json, save_png, save_text
from ..metrics import MultiTaskMetrics
from ..tasks import get_task
from ..viz import prediction_grid
from .report import ConstantPredictor, render_report

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
        self.metrics = MultiTaskMetrics(module.net.tasks, module.metric_options).to(
            pl_module.device)

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
        save_json(run / "metrics.json", {"metrics": values, "constant_predictor": constant,
                                         "step": module.evaluated_step}, sort_keys=False)
        dm = trainer.datamodule
        info = {
            "run folder": str(run),
            "checkpoint": str(getattr(trainer, "ckpt_path", None) or "(weights in memory)"),
            "model": f"{module.net.config['network']['arch']}, tasks "
                     f"{', '.join(module.task_names)}, "
                     f"{sum(p.numel() for p in module.net.parameters()):,} parameters",
            "data": f"{getattr(dm, 'dataset_name', type(dm).__name__)} "
                    f"({getattr(dm, 'splits', {}).get('test', 'test')} split)",
            "constant predictor": str(self.constant.values() if self.constant
                                      else "not fitted (no training data)"),
            "step": module.evaluated_step,
        }
        try:
            names = list(dm.class_names) if dm is not None else None
        except Exception:  # a data module without class names (e.g. an image folder)
            names = None
        save_text(run / "report.md", render_report(values, constant, info, names))


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
    """Keeps the dataset's class names and palette with the weights (``densemtl predict``)."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        dm = trainer.datamodule
        names = getattr(dm, "class_names", None)
        palette = getattr(dm, "palette", None)
        checkpoint["densemtl"] = {
            "class_names": None if names is None else list(names),
            "palette": None if palette is None else np.asarray(palette).astype(int).tolist(),
        }
