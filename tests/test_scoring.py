"""The monitored score: chosen once when a run starts, never changing kind within it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from densemtl.cli import main as cli
from densemtl.data import DenseDataModule
from densemtl.training.module import MultiTaskModule
from densemtl.training.scoring import Scorer

pytestmark = pytest.mark.xdist_group("training")

VALUES = {"semseg/mIoU": 0.30, "depth/rmse": 1.5}


def write_results(folder, metrics):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics}))


def test_kind_is_fixed_when_the_run_starts(tmp_path):
    runs = [tmp_path / "stl_semseg", tmp_path / "stl_depth"]
    scorer = Scorer(["semseg", "depth"], baseline_runs=runs)
    assert scorer.choose() == "semseg/mIoU"
    assert "have no results yet" in scorer.describe()
    write_results(runs[0], {"semseg/mIoU": 0.25})  # the baselines appear ...
    write_results(runs[1], {"depth/rmse": 2.0})
    out = scorer.score(VALUES)  # ... but this run keeps its kind and its (absent) baselines
    assert out["score"] == 0.30 and "delta_m" not in out
    assert "not computed" in scorer.delta_m_note(out) and "no results yet" in \
        scorer.delta_m_note(out)
    fresh = Scorer(["semseg", "depth"], baseline_runs=runs)  # the next run sees them
    assert fresh.choose() == "delta_m"
    out = fresh.score(VALUES)
    assert out["score"] == out["delta_m"] == pytest.approx(100 * (0.2 + 0.25) / 2)
    assert "semseg/mIoU=0.25" in fresh.describe()
    resumed = Scorer(["semseg", "depth"], baseline_runs=runs)
    resumed.restore(scorer.state())  # a resumed run scores as it started
    assert resumed.score(VALUES)["score"] == 0.30


def test_delta_m_needs_every_main_metric_or_the_config_says_which():
    partial = Scorer(["semseg", "depth"], baselines={"semseg/mIoU": 0.25})
    assert partial.choose() == "semseg/mIoU"
    out = partial.score(VALUES)
    assert out["score"] == 0.30 and out["delta_m"] == pytest.approx(20.0)  # reported, not used
    chosen = Scorer(["semseg", "depth"], baselines={"semseg/mIoU": 0.25},
                    score_metric="depth/rmse")
    chosen.choose()
    assert chosen.score(VALUES)["score"] == -1.5  # lower is better: negated
    assert chosen.describe().startswith("score = minus depth/rmse (the config's score_metric")
    with pytest.raises(ValueError, match="score_metric"):
        Scorer(["semseg"], score_metric="semseg/mIoUU")
    with pytest.raises(ValueError, match="not a metric of the tasks"):
        Scorer(["semseg"], score_metric="depth/rmse")
    nothing = Scorer(["semseg"])
    nothing.choose()
    assert "no single-task baselines configured" in nothing.delta_m_note({})


class BaselinesAppear(Callback):
    """Writes the single-task results after the first validation, as if those runs finished."""

    def __init__(self, runs):
        self.runs = runs

    def on_validation_end(self, trainer, pl_module):
        write_results(self.runs[0], {"semseg/mIoU": 0.25})
        write_results(self.runs[1], {"depth/rmse": 2.0})


def test_baselines_appearing_mid_run_do_not_change_the_score(tmp_path):
    data = tmp_path / "data"
    assert cli(["synth", "--out", str(data), "--train", "8", "--val", "4", "--height", "48",
                "--width", "64", "--seed", "1", "--quiet", "--workers", "1"]) == 0
    runs = [tmp_path / "stl_semseg", tmp_path / "stl_depth"]
    torch.manual_seed(0)
    module = MultiTaskModule(
        tasks={"semseg": {"channels": 10}, "depth": {}},
        network={"arch": "mtl", "encoder": {"name": "resnet18", "pretrained": False},
                 "decoder": {"num_ch_dec": [8, 16, 16, 32, 32]}},
        baseline_runs=[str(r) for r in runs], grid_samples=0, constant_fit_batches=0)
    dm = DenseDataModule("synthetic", str(data), ["semseg", "depth"], 48, 64, batch_size=4,
                         num_workers=0)
    trainer = Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
                      num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path / "run",
                      callbacks=[BaselinesAppear(runs)])
    trainer.fit(module, datamodule=dm)
    assert (runs[0] / "metrics.json").is_file()  # the baselines exist before the 2nd val
    scores = []
    for step in (2, 4):
        metrics = json.loads((tmp_path / "run" / "metrics" / f"val-step{step:07d}.json")
                             .read_text())["metrics"]
        assert "delta_m" not in metrics
        scores.append((metrics["score"], metrics["semseg/mIoU"]))
    assert all(s == m and math.isfinite(s) for s, m in scores)
    chosen = json.loads((tmp_path / "run" / "score.json").read_text())
    assert chosen["kind"] == "semseg/mIoU" and chosen["baselines"] == {}
    assert "no results yet" in chosen["description"]
