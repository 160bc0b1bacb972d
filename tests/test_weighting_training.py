"""Weighting methods inside real Lightning runs: every method through ``densemtl fit``, resume of
stateful methods, bf16, and two DDP processes against one."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from densemtl.cli import main as cli
from densemtl.weighting import WEIGHTINGS, build_weighting

from model_utils import synth_tree

pytestmark = pytest.mark.xdist_group("weighting")

TASKS = {"semseg": {"channels": 10}, "depth": {}, "normals": {}}


class EvalModeNormalisation(Callback):
    """Runs the training forward with normalisation in eval mode and dropout off, so that
    every sample's loss is independent of the others in its batch (two processes with half a
    batch each then see exactly the one-process losses)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.net.eval()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synth_tree(tmp_path_factory.mktemp("synthetic"), 4, 2, seed=5)


def write_config(path: Path, data_root: Path, run: Path, weighting: dict, steps: int = 2,
                 **trainer) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(run), "accelerator": "cpu", "devices": 1,
                    "max_steps": steps, "val_check_interval": steps,
                    "check_val_every_n_epoch": None, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, **trainer},
        "model": {"class_path": "densemtl.training.MultiTaskModule", "init_args": {
            "tasks": TASKS,
            "network": {"arch": "densemtl", "encoder": {"name": "resnet18", "pretrained": False},
                        "decoder": {"num_ch_dec": [4, 8, 8, 8, 8]},
                        "exchange": {"stages": [1]}},
            "loss": {"weights": {"semseg": 10, "depth": 1, "normals": 10}},
            "weighting": weighting,
            "metrics": {"depth": {"max_depth": 20.0}},
            "optimizer": {"name": "sgd", "lr": 0.05},
            "grid_samples": 0, "constant_fit_batches": 0}},
        "data": {"class_path": "densemtl.data.DenseDataModule", "init_args": {
            "dataset": "synthetic", "root": str(data_root), "height": 48, "width": 64,
            "batch_size": 4, "num_workers": 0, "hflip": 0.0}},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def logged(run: Path, column: str) -> list[float]:
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    i = header.index(column)
    return [float(r.split(",")[i]) for r in rows[1:] if r.split(",")[i]]


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_every_method_trains_through_the_cli(name, data_root, tmp_path):
    options = {"max_norm": 0.0} if name == "nash_mtl" else {}
    config = write_config(tmp_path / "c.yaml", data_root, tmp_path / "run",
                          {"name": name, **options}, gradient_clip_val=5.0)
    assert cli(["fit", "--config", str(config)]) == 0
    losses = logged(tmp_path / "run", "train/total")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    if name != "fixed":  # the effective weight of each task, per step
        weights = logged(tmp_path / "run", "train/semseg/weight")
        assert len(weights) == 2 and all(math.isfinite(w) and w > 0 for w in weights)


def fit_then_resume(data_root: Path, tmp_path: Path, name: str) -> tuple[dict, dict, dict]:
    """6 steps in one go (run a), and 3 steps then a resume to 6 (run b); one batch per epoch.
    Returns a's and b's last checkpoints and b's at step 3."""
    straight = write_config(tmp_path / "a.yaml", data_root, tmp_path / "a", {"name": name},
                            steps=6)
    assert cli(["fit", "--config", str(straight)]) == 0
    first = write_config(tmp_path / "b.yaml", data_root, tmp_path / "b", {"name": name},
                         steps=3)
    assert cli(["fit", "--config", str(first)]) == 0
    mid = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=False)
    second = write_config(tmp_path / "c.yaml", data_root, tmp_path / "b", {"name": name},
                          steps=6)
    assert cli(["fit", "--config", str(second), "--ckpt_path", "last"]) == 0
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    return a, b, mid


def test_famo_resumes_its_logits_and_adam_moments(data_root, tmp_path):
    """FAMO's logits and its Adam moments come back: the resumed run's task weights are the
    straight run's within 0.1 %."""
    _, b, _ = fit_then_resume(data_root, tmp_path, "famo")  # (a and b: 6 steps each)
    weights = logged(tmp_path / "a", "train/semseg/weight")
    assert len({round(w, 4) for w in weights}) == 6  # FAMO moved the weights at every step
    torch.testing.assert_close(logged(tmp_path / "b", "train/semseg/weight")[-3:], weights[-3:],
                               rtol=1e-3, atol=0)
    # a fresh FAMO after the resume would start from uniform logits and new Adam moments
    fresh = build_weighting({"name": "famo"}, list(TASKS))
    assert b["state_dict"]["weighting.famo._w"].abs().max() > 1e-3
    assert b["state_dict"]["weighting._extra_state"]["adam"]["state"][0]["step"] == 6
    assert fresh.get_extra_state()["adam"] is None


def test_dwa_resumes_with_its_epoch_history(data_root, tmp_path):
    """The checkpoint at step 3 ends inside epoch 2, which Lightning runs again on resume: the
    resumed step must use the weights of epoch 2 (from the saved means of epochs 0 and 1),
    not the uniform weights of a fresh history."""
    fit_then_resume(data_root, tmp_path, "dwa")
    weights = logged(tmp_path / "a", "train/semseg/weight")
    assert weights[:2] == [10.0, 10.0] and weights[2] != pytest.approx(10.0, abs=1e-3)
    resumed = logged(tmp_path / "b", "train/semseg/weight")[3]
    assert resumed == pytest.approx(weights[2], rel=1e-6)


def test_gradient_method_under_bf16_autocast(data_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", data_root, tmp_path / "run", {"name": "upgrad"},
                          precision="bf16-mixed")
    assert cli(["fit", "--config", str(config)]) == 0
    assert all(math.isfinite(v) for v in logged(tmp_path / "run", "train/total"))
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["state_dict"]["net.encoder.conv1.weight"].dtype == torch.float32


@pytest.mark.parametrize("name", ["upgrad", "geometric_mean"])
def test_two_ddp_processes_make_the_one_process_update(name, data_root, tmp_path):
    """One SGD step on the 4 training images: one process with all 4, or two with 2 each.
    UPGrad aggregates the all-reduced per-task gradients; the geometric mean sees the
    all-reduced losses: both give the one-process update. (Segmentation and normals, whose
    losses are per-pixel means; the depth loss's BerHu threshold is a maximum over the whole
    batch, which couples the samples of a batch whatever the weighting.)"""
    env = {**os.environ, "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    start, moved = None, {}
    for devices in (1, 2):
        run = tmp_path / f"p{devices}"
        config = write_config(tmp_path / f"c{devices}.yaml", data_root, run, {"name": name},
                              steps=1, devices=devices, limit_val_batches=0,
                              **({"strategy": "ddp"} if devices == 2 else {}))
        cfg = yaml.safe_load(config.read_text())
        cfg["trainer"]["callbacks"] = [
            {"class_path": "test_weighting_training.EvalModeNormalisation"}]
        cfg["data"]["init_args"]["batch_size"] = 4 // devices
        init = cfg["model"]["init_args"]
        init["tasks"] = {"semseg": {"channels": 10}, "normals": {}}
        init["loss"]["weights"] = {"semseg": 10, "normals": 10}
        init.pop("metrics")
        config.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "densemtl", "fit", "--config", str(config)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        state = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
        if start is None:  # the initial weights, from the same seed
            from densemtl.training.module import MultiTaskModule

            torch.manual_seed(0)
            start = MultiTaskModule(**init).state_dict()
        moved[devices] = {k: state[k] - start[k] for k in state
                          if k.startswith("net.") and state[k].is_floating_point()}
    encoder = [k for k in moved[1] if k.startswith("net.encoder.") and "bn" not in k]
    largest = max(float(moved[1][k].abs().max()) for k in encoder)
    assert 1e-4 < largest < 0.05  # a real step from the seeded initial weights
    for key, delta in moved[1].items():
        torch.testing.assert_close(moved[2][key], delta, rtol=2e-3, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")
    # the same effective task weights on the one step
    assert logged(tmp_path / "p2", "train/semseg/weight") == pytest.approx(
        logged(tmp_path / "p1", "train/semseg/weight"), rel=1e-3)


def test_measuring_gradient_conflict_leaves_training_unchanged(data_root, tmp_path):
    states = {}
    for measured in (False, True):
        run = tmp_path / f"m{int(measured)}"
        config = write_config(tmp_path / f"c{int(measured)}.yaml", data_root, run,
                              {"name": "fixed"}, steps=3)
        extra = ["--trainer.callbacks+=densemtl.training.GradientConflict",
                 "--trainer.callbacks.every_n_steps", "1"] if measured else []
        assert cli(["fit", "--config", str(config), *extra]) == 0
        states[measured] = torch.load(run / "checkpoints/last.ckpt",
                                      weights_only=False)["state_dict"]
    cosines = logged(tmp_path / "m1", "conflict/cos_mean")
    assert len(cosines) == 3 and all(-1 <= c <= 1 for c in cosines)
    assert len(logged(tmp_path / "m1", "conflict/cos/semseg-depth")) == 3
    for key, value in states[False].items():
        assert torch.equal(states[True][key], value), key


def test_gradient_conflict_checks_its_interval(data_root, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", data_root, tmp_path / "r", {"name": "fixed"},
                          log_every_n_steps=2)
    assert cli(["fit", "--config", str(config),
                "--trainer.callbacks+=densemtl.training.GradientConflict",
                "--trainer.callbacks.every_n_steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "every_n_steps 3 must be a multiple of trainer.log_every_n_steps 2" in err
