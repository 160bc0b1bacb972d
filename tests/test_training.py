"""End to end on tiny synthetic data: fit -> test -> predict -> resume, and DDP on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from densemtl import load_model
from densemtl.cli import main as cli
from densemtl.training.module import MultiTaskModule

from model_utils import synth_tree

pytestmark = pytest.mark.xdist_group("training")

TASKS = {"semseg": {"channels": 10}, "depth": {}, "normals": {}, "edges": {"channels": 2}}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synth_tree(tmp_path_factory.mktemp("synthetic"), 16, 6, seed=3)


def write_config(path: Path, data_root: Path, run: Path, **trainer) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(run), "accelerator": "cpu", "devices": 1,
                    "max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "log_every_n_steps": 1, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, **trainer},
        "model": {"class_path": "densemtl.training.MultiTaskModule", "init_args": {
            "tasks": TASKS,
            "network": {"arch": "densemtl",
                        "encoder": {"name": "resnet18", "pretrained": False},
                        "decoder": {"num_ch_dec": [8, 16, 16, 32, 32]}},
            "loss": {"weights": {"semseg": 100, "depth": 1, "normals": 100, "edges": 50}},
            "metrics": {"edges": {"thresholds": 9, "tolerance": 1, "tolerance_unit": "pixels"}},
            "optimizer": {"name": "adam", "lr": 1e-3, "backbone_lr": 5e-4,
                          "betas": [0.9, 0.98]},
            "scheduler": {"name": "step", "step_size": 3, "gamma": 0.5},
            "baselines": {"semseg/mIoU": 0.2, "depth/rmse": 2.0},
            "constant_fit_batches": 2,
        }},
        "data": {"class_path": "densemtl.data.DenseDataModule", "init_args": {
            "dataset": "synthetic", "root": str(data_root), "height": 48, "width": 64,
            "batch_size": 4, "num_workers": 0, "hflip": 0.0}},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


FIT_OUTPUT: list[str] = []


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("run")
    config = write_config(base / "config.yaml", data_root, base / "run")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["fit", "--config", str(config)]) == 0
    FIT_OUTPUT.extend(out.getvalue().splitlines())
    return config, base / "run"


def test_fit_without_a_progress_bar_prints_progress_lines(trained):
    """enable_progress_bar false (and any non-terminal output): a line per half minute, the
    first and the last step, and one per evaluation."""
    steps = [line for line in FIT_OUTPUT if line.startswith("step ")]
    assert steps[0].startswith("step 1/4 (epoch 0): loss ") and "s/step" in steps[0]
    assert steps[-1].startswith("step 4/4") and "min left" in steps[-1]
    evaluations = [line for line in FIT_OUTPUT if line.startswith("val at step ")]
    assert [e.split(":")[0] for e in evaluations] == ["val at step 2", "val at step 4"]
    assert "semseg/mIoU" in evaluations[-1]


def test_evaluating_untrained_weights_needs_saying_so(trained, tmp_path):
    config, _ = trained
    out = tmp_path / "untrained"
    assert cli(["validate", "--config", str(config), "--trainer.default_root_dir", str(out)]) == 2
    assert not out.exists()
    assert cli(["validate", "--config", str(config), "--trainer.default_root_dir", str(out),
                "--allow_untrained", "true"]) == 0
    assert (out / "metrics" / "val-last.json").is_file()


def test_tensorboard_gets_learning_rates_and_prediction_grids(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = trained
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "val/predictions" in tags["images"]
    assert len(events.Images("val/predictions")) == 2  # one per evaluation
    lrs = [t for t in tags["scalars"] if t.startswith("lr-")]
    assert len(lrs) == 2  # the encoder's and the rest's
    assert [e.step for e in events.Scalars(lrs[0])][:4] == [0, 1, 2, 3]


def test_fit_writes_the_run_folder(trained):
    _, run = trained
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("best-step*.ckpt"))) == 1
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "grids").glob("*.png")) == \
        ["val-step0000002.png", "val-step0000004.png"]
    payload = json.loads((run / "metrics" / "val-step0000004.json").read_text())
    metrics = payload["metrics"]
    assert payload["step"] == 4
    for name in ("semseg/mIoU", "depth/rmse", "normals/mean", "edges/tolF", "delta_m"):
        assert np.isfinite(metrics[name]), name
    expected = 100 * ((metrics["semseg/mIoU"] - 0.2) / 0.2 - (metrics["depth/rmse"] - 2) / 2) / 2
    assert metrics["delta_m"] == pytest.approx(expected)
    assert not list(run.rglob(".*.tmp*")) and not list((run / "checkpoints").glob(".*"))


def test_checkpoint_holds_model_config_and_loads(trained):
    _, run = trained
    model = load_model(run / "checkpoints" / "last.ckpt")
    assert list(model.tasks) == ["semseg", "depth", "normals", "edges"]
    assert model.class_names is not None and len(model.class_names) == 10
    pred = model.predict(torch.rand(3, 40, 52))
    assert pred["semseg"].shape == (40, 52) and pred["depth"].shape == (1, 40, 52)


def test_test_writes_metrics_and_report(trained):
    config, run = trained
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    assert cli(["test", "--config", str(config), "--ckpt_path", str(best)]) == 0
    assert cli(["test", "--config", str(config), "--ckpt_path",
                str(run / "checkpoints" / "last.ckpt")]) == 0
    # every tested checkpoint keeps its own report; metrics.json is the latest
    kept = sorted(p.name for p in (run / "reports").iterdir())
    assert kept == sorted([f"{best.stem}-step0000004.json", f"{best.stem}-step0000004.md",
                           "last-step0000004.json", "last-step0000004.md"]) or \
        kept == sorted([f"{best.stem}-step0000002.json", f"{best.stem}-step0000002.md",
                        "last-step0000004.json", "last-step0000004.md"])
    result = json.loads((run / "metrics.json").read_text())
    assert result["checkpoint"].endswith("last.ckpt")
    assert np.isfinite(result["metrics"]["depth/rmse"])
    assert result["step"] == 4  # the checkpoint's step, not the test trainer's 0
    assert (run / "metrics" / "test-step0000004.json").is_file()
    const = result["constant_predictor"]
    assert 0 <= const["semseg/mIoU"] < 1 and const["depth/rmse"] > 0
    report = (run / "report.md").read_text()
    assert "| depth | rmse | m |" in report and "| normals | mean | degrees |" in report
    assert "| semseg | mIoU | % |" in report
    assert "constant predictor: semseg: class " in report and " m everywhere" in report
    assert "**delta_m = " in report and "- score: score = semseg/mIoU (the first" in report
    # the edge benchmark runs in test: BSDS ODS / OIS / AP next to the tolerance F
    for name in ("edges/odsF", "edges/oisF", "edges/ap", "edges/tolF"):
        assert 0 <= result["metrics"][name] <= 1, name
    assert "BSDS protocol (ods*, ois*, ap) at max_dist 0.011" in report
    from densemtl.data.scene import CLASS_NAMES

    assert f"| 00 {CLASS_NAMES[0]} |" in report and "- step: 4" in report


def test_predict_writes_pngs_and_arrays(trained, data_root, tmp_path, capsys):
    _, run = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, src in enumerate(sorted((data_root / "images").glob("val_*"))[:2]):
        (inputs / f"img{i}.png").write_bytes(src.read_bytes())
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert cli(["predict", "--ckpt", ckpt, "--input", str(inputs), "--output", str(out)]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert cli(["predict", "--ckpt", ckpt, "--input", str(inputs), "--output", str(out),
                "--skip-unreadable"]) == 0
    depth = np.load(out / "img0.png.depth.npy")
    normals = np.load(out / "img1.png.normals.npy")
    assert depth.shape == (48, 64) and depth.dtype == np.float32 and (depth >= 0).all()
    assert normals.shape == (3, 48, 64)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=0), 1.0, atol=1e-4)
    assert (out / "img0.png.semseg.png").is_file() and (out / "img1.png.edges.png").is_file()
    assert not list(out.glob("broken*"))
    assert "predicted 2 of 3 image(s)" in capsys.readouterr().out


def test_resume_restores_step_optimiser_and_scheduler(tmp_path, data_root):
    """4 steps, then resume to 8 == 8 steps in one go (epoch = 4 steps, no augmentation)."""
    straight = write_config(tmp_path / "a.yaml", data_root, tmp_path / "a", max_steps=8,
                            val_check_interval=4)
    assert cli(["fit", "--config", str(straight)]) == 0
    first = write_config(tmp_path / "b.yaml", data_root, tmp_path / "b", max_steps=4,
                         val_check_interval=4)
    assert cli(["fit", "--config", str(first)]) == 0
    half = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert half["global_step"] == 4
    second = write_config(tmp_path / "c.yaml", data_root, tmp_path / "b", max_steps=8,
                          val_check_interval=4)
    assert cli(["fit", "--config", str(second), "--ckpt_path", "last"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 8
    assert [g["lr"] for g in a["optimizer_states"][0]["param_groups"]] == \
        [g["lr"] for g in b["optimizer_states"][0]["param_groups"]] == [5e-4 * 0.25, 1e-3 * 0.25]
    moved = max(float((a["state_dict"][k] - half["state_dict"][k]).abs().max())
                for k in a["state_dict"] if a["state_dict"][k].is_floating_point())
    assert moved > 1e-3  # the last 4 steps changed the weights a lot ...
    for key, value in a["state_dict"].items():  # ... identically (up to float reordering)
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    steps = sorted({int(r.split(",")[header.index("step")]) for header in [rows[0].split(",")]
                    for r in rows[1:]})
    assert steps[0] == 0 and steps[-1] >= 7  # the rows of the first part were kept


def test_last_checkpoint_is_the_latest_state_even_when_not_the_best(tmp_path, data_root):
    """'step' with mode min: the first validation stays the best forever, yet last.ckpt must
    follow every validation and the final step (5, between validations)."""
    config = write_config(tmp_path / "c.yaml", data_root, tmp_path / "r", max_steps=5,
                          val_check_interval=2)
    assert cli(["fit", "--config", str(config), "--checkpoint.monitor", "step",
                "--checkpoint.mode", "min"]) == 0
    ckpts = tmp_path / "r" / "checkpoints"
    assert [p.name for p in ckpts.glob("best-*.ckpt")] == ["best-step0000002.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5


def test_ddp_two_processes_give_the_single_process_metrics(trained, tmp_path):
    config, run = trained
    ckpt = str(run / "checkpoints" / "last.ckpt")
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"val{devices}"
        cmd = [sys.executable, "-m", "densemtl", "validate", "--config", str(config),
               "--ckpt_path", ckpt, "--trainer.default_root_dir", str(out),
               "--trainer.devices", str(devices), "--data.init_args.batch_size", "2",
               # the BSDS edge benchmark too: its per-image counts are a list state
               "--model.init_args.metrics", json.dumps({"edges": {
                   "thresholds": 9, "tolerance": 1, "tolerance_unit": "pixels", "bsds": True}})]
        if devices == 2:
            cmd += ["--trainer.strategy", "ddp"]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads((out / "metrics" / "val-last.json").read_text())["metrics"]
    # the command line's metric options won over the checkpoint's (which have no bsds)
    assert 0 < results[1]["edges/odsF"] < 1 and "edges/ap" in results[1]
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_module_builds_optimiser_groups():
    module = MultiTaskModule(TASKS, {"arch": "mtl", "encoder": {"name": "resnet18",
                                                                 "pretrained": False},
                                     "decoder": {"num_ch_dec": [8, 16, 16, 32, 32]}},
                             weighting={"name": "uncertainty"},
                             optimizer={"name": "sgd", "lr": 0.01, "backbone_lr": 0.001,
                                        "momentum": 0.9})
    from densemtl.training.optim import build_optimizer

    opt = build_optimizer(module.net, module.loss_parameters(), module.optimizer_cfg)
    enc = {id(p) for p in module.net.encoder.parameters()}
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["encoder"]["lr"] == 0.001 and groups["rest"]["lr"] == 0.01
    assert {id(p) for p in groups["encoder"]["params"]} == enc
    assert id(module.weighting.uw.log_var) in {id(p) for p in groups["rest"]["params"]}
    n_all = len(list(module.net.parameters())) + 1
    assert len(groups["encoder"]["params"]) + len(groups["rest"]["params"]) == n_all


def test_constant_predictor_fits_hand_computed_values():
    from densemtl.metrics import MultiTaskMetrics
    from densemtl.training.report import ConstantPredictor

    tasks = {"semseg": 3, "depth": 1, "normals": 3, "edges": 2}
    seg = torch.tensor([[[0, 2, 2], [2, 255, 1]]])
    depth = torch.tensor([[[[1.0, 3.0, 0.0], [2.0, 0.0, 6.0]]]])  # mean of valid = 3
    normals = torch.zeros(1, 3, 2, 3)
    normals[:, 2] = -1.0
    normals[0, 0, 0, 0], normals[0, 2, 0, 0] = 1.0, 0.0  # one normal along +x
    edges = torch.tensor([[[[1.0, 0, 0], [0, 0, 1.0]]]])  # 2 of 6
    batch = {"image": torch.zeros(1, 3, 2, 3), "semseg": seg, "depth": depth,
             "normals": normals, "edges": edges, "has_depth": torch.tensor([True])}
    const = ConstantPredictor(tasks).fit([batch, batch])
    values = const.values()
    assert values["semseg"] == 2 and values["depth"] == pytest.approx(3.0)
    assert values["edges"] == pytest.approx(1 / 3)
    n = np.array([1.0, 0.0, -5.0]) / np.linalg.norm([1.0, 0.0, -5.0])
    np.testing.assert_allclose(values["normals"], n, atol=1e-6)
    metrics = MultiTaskMetrics(tasks, {"edges": {"thresholds": 9}})
    metrics.update(const.outputs(1, 2, 3, torch.device("cpu")), batch)
    scores = metrics.compute()
    assert scores["semseg/pixAcc"] == pytest.approx(3 / 5)  # class 2 is right on 3 of 5 pixels
    expected_rmse = np.sqrt(np.mean((np.array([1.0, 3.0, 2.0, 6.0]) - 3.0) ** 2))
    assert scores["depth/rmse"] == pytest.approx(expected_rmse, rel=1e-4)
