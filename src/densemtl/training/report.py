"""Test outputs: ``metrics.json`` and ``report.md`` with trivial-predictor rows for scale."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..metrics import higher_is_better
from ..tasks import IGNORE_INDEX, TASKS, depth_to_inverse

if TYPE_CHECKING:
    from .module import MultiTaskModule


class ConstantPredictor:
    """The best input-independent predictor, fitted on training labels.

    semseg: the majority class; depth: the mean valid depth; normals: the normalised mean
    normal; edges: the edge-pixel frequency as a constant probability. Its scores show what a
    model must beat before it has learnt anything from the image.
    """

    def __init__(self, tasks: Mapping[str, int]) -> None:
        self.tasks = dict(tasks)
        self.class_counts = torch.zeros(self.tasks.get("semseg", 1), dtype=torch.float64)
        self.depth = torch.zeros(2, dtype=torch.float64)  # sum, count
        self.normal = torch.zeros(3, dtype=torch.float64)
        self.edges = torch.zeros(2, dtype=torch.float64)  # sum, count
        self.samples = 0

    def fit(self, batches: Iterable[Mapping[str, Any]]) -> ConstantPredictor:
        for batch in batches:
            self.samples += int(batch["image"].shape[0])
            for task in self.tasks:
                key = TASKS[task].label_key
                if key not in batch:
                    continue
                has = batch.get(f"has_{key}")
                label = batch[key] if has is None else batch[key][has]
                self._add(task, label.detach().cpu())
        return self

    def _add(self, task: str, label: Tensor) -> None:
        if task == "semseg":
            valid = label[(label != IGNORE_INDEX) & (label >= 0) & (label < len(self.class_counts))]
            self.class_counts += torch.bincount(valid.long().flatten(),
                                                minlength=len(self.class_counts)).double()
        elif task == "depth":
            valid = label[(label > 0) & torch.isfinite(label)].double()
            self.depth += torch.stack([valid.sum(), torch.tensor(float(valid.numel()))])
        elif task == "normals":
            self.normal += label.double().sum(dim=(0, 2, 3))
        elif task == "edges":
            self.edges += torch.tensor([float(label.double().sum()), float(label.numel())])

    def values(self) -> dict[str, float | int | list[float]]:
        out: dict[str, Any] = {}
        if "semseg" in self.tasks:
            out["semseg"] = int(self.class_counts.argmax())
        if "depth" in self.tasks:
            out["depth"] = float(self.depth[0] / self.depth[1]) if self.depth[1] else 1.0
        if "normals" in self.tasks:
            n = self.normal if self.normal.norm() > 0 else torch.tensor([0.0, 0.0, -1.0])
            out["normals"] = (n / n.norm()).tolist()
        if "edges" in self.tasks:
            out["edges"] = float(self.edges[0] / self.edges[1]) if self.edges[1] else 0.0
        return out

    def outputs(self, batch: int, height: int, width: int,
                device: torch.device) -> dict[str, dict[int, Tensor]]:
        """Raw head outputs (the model's parametrisation) of the constant prediction."""
        v = self.values()
        out: dict[str, dict[int, Tensor]] = {}
        for task, channels in self.tasks.items():
            raw = torch.zeros(batch, channels, height, width, device=device)
            if task == "semseg":
                raw[:, v["semseg"]] = 1.0
            elif task == "depth":
                raw += float(depth_to_inverse(torch.tensor(v["depth"])))
            elif task == "normals":
                raw += torch.tensor(v["normals"], device=device).view(1, 3, 1, 1)
            elif task == "edges":
                p = min(max(v["edges"], 1e-6), 1 - 1e-6)
                logit = math.log(p / (1 - p))
                if channels == 1:
                    raw += logit
                else:
                    raw[:, 1] = logit
            out[task] = {0: raw}
        return out


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
                  info: Mapping[str, Any]) -> str:
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
        lines += [f"| {c} | {_fmt(v)} |" for c, v in per_class.items()]
    return "\n".join(lines) + "\n"


def write_test_outputs(module: MultiTaskModule, values: Mapping[str, float]) -> None:
    """``metrics.json`` (flat ``{task/metric: value}``) and ``report.md`` in the run folder."""
    from .module import write_json

    run = module.run_dir
    run.mkdir(parents=True, exist_ok=True)
    constant = dict(module.constant_scores or {})
    write_json(run / "metrics.json", {"metrics": dict(values),
                                      "constant_predictor": constant,
                                      "step": int(module.global_step)})
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
        "step": int(module.global_step),
    }
    _write_text(run / "report.md", render_report(values, constant, info))
