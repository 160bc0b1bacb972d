"""The score a run is judged by: delta_m against single-task baselines, or one task's metric.

The kind of score is chosen **once**, when a run starts (:meth:`Scorer.choose`), and kept for the
whole run, resumes included: ``val/score`` (what selects the best checkpoint) never switches from
a metric to delta_m because baseline results appeared while the run was training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..metrics import delta_m, higher_is_better, load_baselines, main_metric_names

DELTA_M = "delta_m"


class Scorer:
    """Adds ``delta_m`` (when baselines exist) and ``score`` (higher is better) to results.

    Args:
        tasks: the model's tasks, in order.
        baselines: single-task results, ``{"semseg/mIoU": 0.41, ...}``.
        baseline_runs: run folders (or metrics.json files) of single-task runs; their results
            complete ``baselines`` (config values win). Folders without results yet are skipped
            with one warning, so a multi-task run can start before its baselines exist.
        score_metric: what ``score`` is: ``"delta_m"`` or a ``task/metric`` name. By default
            delta_m when every task's main metric has a baseline when the run starts, else the
            first task's main metric.

    ``score`` is signed so that higher is better. Baselines are read when the kind is chosen and
    then kept, so every evaluation of a run is scored against the same numbers.
    """

    def __init__(self, tasks: Iterable[str], baselines: Mapping[str, float] | None = None,
                 baseline_runs: Iterable[str | Path] | None = None,
                 score_metric: str | None = None) -> None:
        self.tasks = list(tasks)
        self.given = {k: float(v) for k, v in (baselines or {}).items()}
        self.runs = [str(r) for r in (baseline_runs or [])]
        if score_metric is not None and score_metric != DELTA_M:
            try:
                higher_is_better(score_metric)
            except KeyError as exc:
                raise ValueError(f"score_metric: {str(exc).strip(chr(34))}") from None
            if score_metric.split("/")[0] not in self.tasks:
                raise ValueError(f"score_metric '{score_metric}' is not a metric of the tasks "
                                 f"{self.tasks}")
        self.score_metric = score_metric
        self.kind: str | None = None
        self.frozen: dict[str, float] = {}
        self.missing_runs: list[str] = []

    def baselines(self) -> dict[str, float]:
        """Config baselines, completed from the baseline runs that have results (read now)."""
        found = [r for r in self.runs if (Path(r) / "metrics.json").is_file() or Path(r).is_file()]
        self.missing_runs = sorted(set(self.runs) - set(found))
        if self.missing_runs:  # a line, not a warning: starting before the baselines is normal
            rank_zero_info(f"delta_m: no results yet in baseline run(s) "
                           f"{', '.join(self.missing_runs)} "
                           "(train and test the single-task configs first)")
        merged = load_baselines(found) if found else {}
        return {**merged, **self.given}

    def choose(self) -> str:
        """Read the baselines and fix the kind of score for this run (returns it)."""
        self.frozen = self.baselines()
        mains = main_metric_names(self.tasks)
        if self.score_metric is not None:
            self.kind = self.score_metric
        elif all(m in self.frozen for m in mains):
            self.kind = DELTA_M
        else:
            self.kind = mains[0]
        if self.kind == DELTA_M and not any(m in self.frozen for m in mains):
            rank_zero_warn("score_metric is delta_m but no task's main metric has a baseline: "
                           "val/score will be NaN")
        return self.kind

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run scores as it started."""
        return {"kind": self.kind, "baselines": dict(self.frozen)}

    def restore(self, state: Mapping[str, Any]) -> None:
        if state.get("kind"):
            self.kind = str(state["kind"])
            self.frozen = {k: float(v) for k, v in dict(state.get("baselines") or {}).items()}

    def describe(self) -> str:
        """One line: what ``score`` is and which baselines it uses."""
        if self.kind is None:
            self.choose()
        if self.kind == DELTA_M:
            names = [m for m in main_metric_names(self.tasks) if m in self.frozen]
            return (f"score = delta_m (%) over {', '.join(names)} against the single-task "
                    "baselines " + ", ".join(f"{k}={v:.4g}" for k, v in self.frozen.items()))
        why = "the config's score_metric" if self.score_metric else (
            "the first task's main metric; delta_m needs a baseline for every task's main metric"
            + (f", and baseline run(s) {', '.join(self.missing_runs)} have no results yet"
               if self.missing_runs else ""))
        sign = "" if higher_is_better(self.kind) else "minus "
        return f"score = {sign}{self.kind} ({why})"

    def delta_m_note(self, values: Mapping[str, float]) -> str:
        """Why a result has or lacks delta_m, in words (for reports)."""
        if DELTA_M in values:
            return (f"**delta_m = {values[DELTA_M]:+.2f}%** (mean signed relative change against "
                    f"the single-task baselines: {', '.join(self._used(values))}).")
        if self.missing_runs and not self.frozen:
            return (f"delta_m: not computed: the baseline run(s) {', '.join(self.missing_runs)} "
                    "have no results yet (test them, then test this checkpoint again).")
        if self.frozen:
            return (f"delta_m: not computed: the baselines ({', '.join(self.frozen)}) name no "
                    "metric of this result.")
        return ("delta_m: no single-task baselines configured (`model.init_args.baselines` or "
                "`baseline_runs`).")

    def _used(self, values: Mapping[str, float]) -> list[str]:
        return [n for n in self.frozen if n in values and math.isfinite(values[n])]

    def score(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` with ``delta_m`` (if any baseline applies) and ``score`` added."""
        if self.kind is None:
            self.choose()
        out = dict(values)
        names = self._used(out)
        if names:
            out[DELTA_M] = delta_m(out, self.frozen, names)
        if self.kind == DELTA_M:
            out["score"] = out.get(DELTA_M, float("nan"))
        else:
            sign = 1.0 if higher_is_better(str(self.kind)) else -1.0
            out["score"] = sign * out.get(str(self.kind), float("nan"))
        return out
