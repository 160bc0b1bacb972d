"""Test outputs: ``metrics.json`` and ``report.md`` with trivial-predictor rows for scale."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..metrics import higher_is_better
from ..tasks import TASKS

if TYPE_CHECKING:
    from .module import MultiTaskModule


class ConstantPredictor:
    """The best input-independent predictor, fitted on training labels.

    Per task (see ``Task.constant``): the majority class, the mean valid depth, the normalised
    mean normal, the edge frequency as a constant probability. Its scores show what a model must
    beat before it has learnt anything from the image.
    """

    def __init__(self, tasks: Mapping[str, int]) -> None:
        self.tasks = dict(tasks)
        self.stats: dict[str, Tensor] = {}
        self.samples = 0

    def fit(self, batches: Iterable[Mapping[str, Any]]) -> ConstantPredictor:
        for batch in batches:
            self.samples += int(batch["image"].shape[0])
            for task, channels in self.tasks.items():
                key = TASKS[task].label_key
                if key not in batch:
                    continue
                has = batch.get(f"has_{key}")
                label = (batch[key] if has is None else batch[key][has]).detach().cpu()
                stats = TASKS[task].label_stats(label, channels)
                self.stats[task] = self.stats[task] + stats if task in self.stats else stats
        return self

    def values(self) -> dict[str, Any]:
        return {t: TASKS[t].constant(s) for t, s in self.stats.items()}

    def outputs(self, batch: int, height: int, width: int,
                device: torch.device) -> dict[str, dict[int, Tensor]]:
        """Raw head outputs (the model's parametrisation) of the constant prediction."""
        return {t: {0: TASKS[t].constant_raw(s, self.tasks[t], (batch, height, width))
                    .to(device)} for t, s in self.stats.items()}


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def render_report(values: Mapping[str, float], constant: Mapping[str, float] | None,
                  info: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Markdown: run information, per-task metric table, delta_m, trivial rows."""
    lines = ["# densemtl test report", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "| task | metric | model | constant predictor | better |",
              "|---|---|---|---|---|"]
    for name, value in values.items():
        if "/" not in name or name.startswith("delta"):
            continue
        task, metric = name.split("/", 1)
        if metric.startswith("IoU/"):
            continue
        try:
            better = "higher" if higher_is_better(name) else "lower"
        except (KeyError, ValueError):
            better = ""
        const = constant.get(name) if constant else None
        lines.append(f"| {task} | {metric} | {_fmt(value)} | {_fmt(const)} | {better} |")
    lines.append("")
    if "delta_m" in values:
        lines.append(f"**delta_m = {values['delta_m']:+.2f}%** (mean signed relative change "
                     "against the single-task baselines of the config).")
    else:
        lines.append("delta_m: no single-task baselines configured (`model.init_args.baselines` "
                     "or `baseline_runs`).")
    per_class = {k.split("IoU/", 1)[1]: v for k, v in values.items() if "/IoU/" in k}
    if per_class:
        lines += ["", "Per-class IoU (semseg):", "",
                  "| class | IoU |", "|---|---|"]
        names = list(class_names or [])

        def label(c: str) -> str:
            i = int(c) if c.isdigit() else -1
            return f"{c} {names[i]}" if 0 <= i < len(names) else c

        lines += [f"| {label(c)} | {_fmt(v)} |" for c, v in per_class.items()]
    return "\n".join(lines) + "\n"


def write_test_outputs(module: MultiTaskModule, values: Mapping[str, float]) -> None:
    """``metrics.json`` (flat ``{task/metric: value}``) and ``report.md`` in the run folder."""
    from .module import write_json

    run = module.run_dir
    run.mkdir(parents=True, exist_ok=True)
    constant = dict(module.constant_scores or {})
    write_json(run / "metrics.json", {"metrics": dict(values),
                                      "constant_predictor": constant,
                                      "step": module.evaluated_step})
    trainer = module.trainer
    dm = trainer.datamodule
    info = {
        "run folder": str(run),
        "checkpoint": str(getattr(trainer, "ckpt_path", None) or "(weights in memory)"),
        "model": f"{module.net.config['network']['arch']}, tasks "
                 f"{', '.join(module.task_names)}, "
                 f"{sum(p.numel() for p in module.net.parameters()):,} parameters",
        "data": f"{getattr(dm, 'dataset_name', type(dm).__name__)} "
                f"({getattr(dm, 'splits', {}).get('test', 'test')} split)",
        "constant predictor": str(module.constant_values or "not fitted (no training data)"),
        "step": module.evaluated_step,
    }
    try:
        names = list(dm.class_names) if dm is not None else None
    except Exception:  # a data module without class names (e.g. an image folder)
        names = None
    _write_text(run / "report.md", render_report(values, constant, info, names))
