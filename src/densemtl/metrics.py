"""Evaluation: every task's metric in one container, metric directions, and delta_m.

Each task brings its metric (``Task.metric``, a torchmetrics ``Metric``: see ``densemtl/tasks``).
All states are tensors reduced with ``sum``, so a distributed ``compute()`` equals a
single-process one on the same data, and ``update`` never reads tensor values on the host (the
tests run it on ``meta`` tensors to prove it). Results are flat ``task/metric`` names:
``semseg/mIoU``, ``depth/rmse``, ``semseg/IoU/<class>``. Ratios are fractions in [0, 1], depths
metres, angles degrees. Definitions and the differences from the official code are in
``docs/metrics.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .tasks import TaskMetric, get_task

__all__ = [
    "MultiTaskMetrics",
    "delta_m",
    "delta_m_main",
    "higher_is_better",
    "is_fraction",
    "load_baselines",
    "main_metric_names",
]


def _split(name: str) -> tuple[str, str]:
    task, _, metric = name.partition("/")
    if not metric:
        raise KeyError(f"'{name}' is not a task/metric name")
    return task, metric


def higher_is_better(name: str) -> bool:
    """Direction of the flat metric ``name`` (``task/metric[/sub]``), as its task declares it."""
    task, metric = _split(name)
    try:
        return get_task(task).higher_is_better(metric)
    except (KeyError, ValueError) as exc:  # an unknown task or metric
        raise KeyError(f"unknown metric '{name}': {str(exc).strip(chr(34))}") from None


def is_fraction(name: str) -> bool:
    """Whether ``task/metric[/sub]`` is reported as a fraction in [0, 1]."""
    task, metric = _split(name)
    return metric.split("/")[0] in get_task(task).metric.fractions


def _is_known(name: str) -> bool:
    try:
        higher_is_better(name)
    except KeyError:
        return False
    return True


def main_metric_names(tasks: Iterable[str]) -> list[str]:
    """``task/main_metric`` for each task (the paper's delta_m uses only these)."""
    return [f"{t}/{get_task(t).main_metric}" for t in tasks]


class MultiTaskMetrics(nn.Module):
    """One metric per task, updated from a model output and a batch, with flat result names.

    Args:
        tasks: task names, or the ``{task: channels}`` mapping of ``tasks.parse_tasks`` (semseg
            takes its number of classes from it).
        task_options: constructor options per task, e.g. ``{"depth": {"max_depth": 10}}``.
        scale: the output scale that is scored (0, the final prediction).
        stage: ``val`` or ``test``; a metric's ``stage_defaults`` for it apply to the options
            the caller does not set (the BSDS edge benchmark runs in ``test`` only).

    ``update(outputs, batch)`` scores ``outputs[task][scale]`` against ``batch[label_key]``
    with ``batch["has_<label_key>"]``; tasks absent from the batch or the outputs are skipped.
    ``compute()`` returns ``{"<task>/<metric>": tensor}``; every task is computed (all ranks
    must take part in the reduction), and one that scored no pixel reports NaN.
    """

    def __init__(self, tasks: Sequence[str] | Mapping[str, int | None],
                 task_options: Mapping[str, Mapping[str, Any]] | None = None,
                 scale: int = 0, stage: str = "val") -> None:
        super().__init__()
        channels = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks)
        task_options = dict(task_options or {})
        unknown = set(task_options) - set(channels)
        if unknown:
            raise ValueError(f"task_options name task(s) {sorted(unknown)} not in "
                             f"{list(channels)}")
        declared = {name: get_task(name) for name in channels}
        self.scale = scale
        self.label_keys = {t: task.label_key for t, task in declared.items()}
        self.stage = stage
        self.metrics = nn.ModuleDict({
            t: task.build_metric(channels[t], **{**task.metric.stage_defaults.get(stage, {}),
                                                 **dict(task_options.get(t, {}))})
            for t, task in declared.items()
        })

    def configure(self, dataset_class: type | None) -> None:
        """Dataset-dependent defaults (e.g. the edge matching distance), see ``TaskMetric``."""
        for metric in self.metrics.values():
            metric.configure(dataset_class)

    def __getitem__(self, task: str) -> TaskMetric:
        return self.metrics[task]  # type: ignore[return-value]

    def update(self, outputs: Mapping[str, Mapping[int, Tensor] | Tensor],
               batch: Mapping[str, Tensor]) -> None:
        for task, metric in self.metrics.items():
            key = self.label_keys[task]
            if key not in batch or task not in outputs:
                continue
            pred = outputs[task]
            pred = pred if isinstance(pred, Tensor) else pred[self.scale]
            metric.update(pred, batch[key], batch.get(f"has_{key}"))

    def compute(self) -> dict[str, Tensor]:
        return {f"{task}/{name}": value
                for task, metric in self.metrics.items()
                for name, value in metric.compute().items()}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


# --- delta_m ------------------------------------------------------------------------------------

def _number(value: float | Tensor, what: str) -> float:
    out = float(value.item() if isinstance(value, Tensor) else value)
    if not math.isfinite(out):
        raise ValueError(f"{what} is not finite ({out})")
    return out


def delta_m(metrics: Mapping[str, float | Tensor], baselines: Mapping[str, float | Tensor],
            names: Iterable[str] | None = None) -> float:
    """Multi-task gain in percent: ``100 * mean_k (-1)^{lower_k} (M_k - B_k) / B_k``.

    ``names`` are the (flat) metrics averaged over; by default every metric in ``baselines``.
    Raises if a name has no baseline, no result, an unknown direction, or a zero baseline.
    """
    names = list(baselines) if names is None else list(names)
    if not names:
        raise ValueError("delta_m needs at least one metric")
    terms = []
    for name in names:
        if name not in baselines:
            raise KeyError(f"delta_m: no single-task baseline for '{name}'")
        if name not in metrics:
            raise KeyError(f"delta_m: no result for '{name}'")
        base = _number(baselines[name], f"baseline '{name}'")
        value = _number(metrics[name], f"result '{name}'")
        if base == 0:
            raise ValueError(f"delta_m: baseline for '{name}' is zero")
        if is_fraction(name) and base > 1:
            raise ValueError(f"delta_m: baseline {base} for '{name}' looks like a percentage; "
                             "this metric is a fraction in [0, 1]")
        sign = 1.0 if higher_is_better(name) else -1.0
        terms.append(sign * (value - base) / base)
    return 100.0 * sum(terms) / len(terms)


def delta_m_main(metrics: Mapping[str, float | Tensor], baselines: Mapping[str, float | Tensor],
                 tasks: Iterable[str]) -> float:
    """The paper's delta_m: one metric per task, the task's ``main_metric``."""
    return delta_m(metrics, baselines, main_metric_names(tasks))


def load_baselines(sources: Iterable[str | Path],
                   filename: str = "metrics.json") -> dict[str, float]:
    """Merge single-task results from run folders (their ``metrics.json``) or JSON files.

    A JSON file holds flat ``{"task/metric": number}`` entries, either at the top level or
    under a ``"metrics"`` key; entries that are not known metrics are ignored. The same metric
    from two sources with different values is an error.
    """
    merged: dict[str, float] = {}
    origin: dict[str, Path] = {}
    for source in sources:
        path = Path(source)
        path = path / filename if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no baseline results at {path}")
        data = json.loads(path.read_text())
        if isinstance(data, Mapping) and isinstance(data.get("metrics"), Mapping):
            data = data["metrics"]
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a JSON object of metrics")
        for name, value in data.items():
            if not isinstance(value, int | float) or not _is_known(name):
                continue
            if name in merged and merged[name] != float(value):
                raise ValueError(f"baseline '{name}' differs between {origin[name]} and {path}")
            merged[name], origin[name] = float(value), path
    if not merged:
        raise ValueError("no baseline metrics found in the given sources")
    return merged
