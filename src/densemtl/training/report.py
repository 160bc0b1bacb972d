"""The test report's pieces: the constant predictor (its "trivial" rows) and the Markdown."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..metrics import higher_is_better
from ..tasks import get_task


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
                key = get_task(task).label_key
                if key not in batch:
                    continue
                has = batch.get(f"has_{key}")
                label = (batch[key] if has is None else batch[key][has]).detach().cpu()
                stats = get_task(task).label_stats(label, channels)
                self.stats[task] = self.stats[task] + stats if task in self.stats else stats
        return self

    def values(self) -> dict[str, Any]:
        return {t: get_task(t).constant(s) for t, s in self.stats.items()}

    def outputs(self, batch: int, height: int, width: int,
                device: torch.device) -> dict[str, dict[int, Tensor]]:
        """Raw head outputs (the model's parametrisation) of the constant prediction."""
        return {t: {0: get_task(t).constant_raw(s, self.tasks[t], (batch, height, width))
                    .to(device)} for t, s in self.stats.items()}


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def metric_unit(name: str) -> str:
    """The unit a report prints ``task/metric`` in: ``%`` for fractions, else the metric's own
    (``m``, ``degrees``), else empty (ratios, thresholds)."""
    task, _, metric = name.partition("/")
    try:
        cls = get_task(task).metric
    except KeyError:
        return ""
    root = metric.split("/")[0]
    if root in cls.fractions:
        return "%"
    return cls.units.get(root, "")


def _in_unit(value: float | None, unit: str) -> str:
    if unit == "%" and value is not None and math.isfinite(value):
        return f"{100 * value:.2f}"
    return _fmt(value)


def describe_constant(values: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """The constant predictor in words: ``semseg: class 0 (road) everywhere ...; depth: ...``."""
    if not values:
        return "not fitted (no training data)"
    return "; ".join(f"{t}: {get_task(t).describe_constant(v, class_names)}"
                     for t, v in values.items())


def render_report(values: Mapping[str, float], constant: Mapping[str, float] | None,
                  info: Mapping[str, Any], class_names: Sequence[str] | None = None,
                  delta_m_note: str | None = None) -> str:
    """Markdown: run information, per-task metric table with units, delta_m, trivial rows."""
    lines = ["# densemtl test report", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "| task | metric | unit | model | constant predictor | better |",
              "|---|---|---|---|---|---|"]
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
        unit = metric_unit(name)
        const = constant.get(name) if constant else None
        lines.append(f"| {task} | {metric} | {unit} | {_in_unit(value, unit)} | "
                     f"{_in_unit(const, unit)} | {better} |")
    lines.append("")
    if delta_m_note is not None:
        lines.append(delta_m_note)
    elif "delta_m" in values:
        lines.append(f"**delta_m = {values['delta_m']:+.2f}%** (mean signed relative change "
                     "against the single-task baselines of the config).")
    else:
        lines.append("delta_m: no single-task baselines configured (`model.init_args.baselines` "
                     "or `baseline_runs`).")
    per_class = {k.split("IoU/", 1)[1]: v for k, v in values.items() if "/IoU/" in k}
    if per_class:
        lines += ["", "Per-class IoU (semseg, %):", "",
                  "| class | IoU |", "|---|---|"]
        names = list(class_names or [])

        def label(c: str) -> str:
            i = int(c) if c.isdigit() else -1
            return f"{c} {names[i]}" if 0 <= i < len(names) else c

        lines += [f"| {label(c)} | {_in_unit(v, '%')} |" for c, v in per_class.items()]
    return "\n".join(lines) + "\n"
