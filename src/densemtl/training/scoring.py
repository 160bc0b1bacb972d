"""The score a run is judged by: delta_m against single-task baselines, or one task's metric."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from ..metrics import delta_m, load_baselines, main_metric_names
from ..tasks import get_task


class Scorer:
    """Adds ``delta_m`` (when baselines exist) and ``score`` (higher is better) to results.

    Args:
        tasks: the model's tasks, in order.
        baselines: single-task results, ``{"semseg/mIoU": 0.41, ...}``.
        baseline_runs: run folders (or metrics.json files) of single-task runs; their results
            complete ``baselines`` (config values win). Folders without results yet are skipped
            with one warning, so a multi-task run can start before its baselines exist.

    ``score`` is delta_m over the metrics that have a baseline, else the first task's main
    metric signed so that higher is better.
    """

    def __init__(self, tasks: Iterable[str], baselines: Mapping[str, float] | None = None,
                 baseline_runs: Iterable[str | Path] | None = None) -> None:
        self.tasks = list(tasks)
        self.given = {k: float(v) for k, v in (baselines or {}).items()}
        self.runs = [str(r) for r in (baseline_runs or [])]
        self._warned = False

    def baselines(self) -> dict[str, float]:
        """Config baselines, completed from the baseline runs that have results."""
        found = [r for r in self.runs if (Path(r) / "metrics.json").is_file() or Path(r).is_file()]
        missing = sorted(set(self.runs) - set(found))
        if missing and not self._warned:
            rank_zero_warn(f"delta_m: no results yet in baseline run(s) {missing} "
                           "(train and test the single-task configs first)")
            self._warned = True
        merged = load_baselines(found) if found else {}
        return {**merged, **self.given}

    def score(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` with ``delta_m`` (if any baseline applies) and ``score`` added."""
        out = dict(values)
        base = self.baselines()
        names = [n for n in base if n in out and math.isfinite(out[n])]
        if names:
            out["delta_m"] = delta_m(out, base, names)
            out["score"] = out["delta_m"]
        else:
            first = main_metric_names(self.tasks[:1])[0]
            task = get_task(self.tasks[0])
            sign = 1.0 if task.higher_is_better(task.main_metric) else -1.0
            out["score"] = sign * out.get(first, float("nan"))
        return out
