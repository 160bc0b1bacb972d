"""Extending densemtl without editing it.

A new task ("foreground": a binary mask of the objects of a scene, with its own loss, metric and
colouriser, derived from the semantic labels) and a new dataset (a folder of JPEG images with
PNG labels) are declared in this file and registered with one call each. Each then goes through
``densemtl fit`` and ``test`` (configs naming this module under ``imports``), ``densemtl predict``
and ``densemtl export`` (ONNX, checked with ONNX Runtime).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor

from densemtl import load_model
from densemtl.cli import main as cli
from densemtl.data import register_dataset
from densemtl.data.base import DenseDataset, Record
from densemtl.data.geometry import make_intrinsics
from densemtl.functional import as_4d, weighted_mean
from densemtl.io import read_png, read_rgb
from densemtl.losses import MultiTaskLoss
from densemtl.models import DenseMTL, build_model, register_arch, save_model
from densemtl.tasks import IGNORE_INDEX, Task, TaskLoss, TaskMetric, register_task

pytestmark = pytest.mark.xdist_group("extending")

H, W = 48, 64
OBJECTS = (3, 4, 5, 6)  # cabinet, table, ball, bin in the built-in benchmark


# --- a new task -------------------------------------------------------------------------------

class ForegroundLoss(TaskLoss):
    """Binary cross-entropy over labelled pixels (label -1 = unlabelled)."""

    def compute(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = as_4d(target).float()
        valid = (target >= 0).float() * mask.unsqueeze(1)
        bce = F.binary_cross_entropy_with_logits(pred, target.clamp(0, 1), reduction="none")
        return weighted_mean(bce, valid)


class ForegroundMetric(TaskMetric):
    """IoU of the foreground and pixel accuracy, from pooled counts."""

    task = "foreground"
    directions: ClassVar[dict[str, bool]] = {"IoU": True, "accuracy": True}
    fractions: ClassVar[frozenset[str]] = frozenset(directions)

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("counts", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, pred: Tensor, target: Tensor, mask: Tensor) -> None:
        gt = as_4d(target)
        valid = (gt >= 0) & mask.unsqueeze(1)
        fg, pos = as_4d(pred) >= self.threshold, gt > 0.5
        self.counts += torch.stack([(fg & pos & valid).sum(), (fg & ~pos & valid).sum(),
                                    (~fg & pos & valid).sum(), (~fg & ~pos & valid).sum()])

    def compute(self) -> dict[str, Tensor]:
        tp, fp, fn, tn = self.counts.double()
        return {"IoU": tp / (tp + fp + fn), "accuracy": (tp + tn) / self.counts.sum()}


class ForegroundTask(Task):
    name = "foreground"
    short = "F"
    fill_value = -1.0
    derived_from = ("semseg",)
    loss = ForegroundLoss
    metric = ForegroundMetric
    main_metric = "IoU"

    def decode(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw)

    def derive(self, sample: Mapping[str, Any]) -> Tensor:
        seg = sample["semseg"]
        fg = torch.isin(seg, torch.tensor(OBJECTS)).float()
        return torch.where(seg == IGNORE_INDEX, -1.0, fg)[None]

    def colourise(self, value: np.ndarray, palette: np.ndarray | None = None,
                  colour_range: Any = None) -> np.ndarray:
        v = np.asarray(value, np.float32).squeeze()
        rgb = np.zeros((*v.shape, 3), np.uint8)
        rgb[..., 0] = (np.clip(v, 0, 1) * 255).round()  # foreground is red, unlabelled black
        return rgb

    def label_stats(self, label: Tensor, channels: int) -> Tensor:
        valid = label[label >= 0].double()
        return torch.stack([valid.sum(), torch.tensor(float(valid.numel()))])

    def constant(self, stats: Tensor) -> float:
        return float(stats[0] / stats[1]) if stats[1] > 0 else 0.0

    def constant_raw(self, stats: Tensor, channels: int, shape: tuple[int, int, int]) -> Tensor:
        p = min(max(self.constant(stats), 1e-6), 1 - 1e-6)
        return torch.full((shape[0], 1, *shape[1:]), float(np.log(p / (1 - p))))


register_task(ForegroundTask())


# --- a new dataset ----------------------------------------------------------------------------

class PngPairsDataset(DenseDataset):
    """``<root>/<split>/<id>.jpg`` with ``<id>_classes.png`` (0 = void, 1.. = class + 1) and
    ``<id>_depth.png`` (16-bit millimetres, 0 = invalid); ``<root>/camera.json`` holds
    ``[fx, fy, cx, cy]`` for the stored size, so normals are derived from depth."""

    name = "pngpairs"
    class_names = tuple(f"class{i}" for i in range(10))
    palette = np.array([[25 * i, 255 - 25 * i, 128] for i in range(10)], np.uint8)

    def list_records(self, split: str) -> list[Record]:
        folder = self.root / split
        return [Record(p.stem, {"image": p, "semseg": p.with_name(f"{p.stem}_classes.png"),
                                "depth": p.with_name(f"{p.stem}_depth.png")})
                for p in sorted(folder.glob("*.jpg"))]

    def intrinsics(self, record: Record, image_hw: tuple[int, int]) -> Tensor:
        fx, fy, cx, cy = json.loads((self.root / "camera.json").read_text())
        return make_intrinsics(fx, fy, cx, cy)

    def _read_semseg(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        raw = read_png(record.files["semseg"]).astype(np.int64)
        return np.where(raw == 0, IGNORE_INDEX, raw - 1)

    def _read_depth(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        return read_png(record.files["depth"]).astype(np.float32) / 1000.0

    readers: ClassVar[dict[str, Any]] = {"semseg": _read_semseg, "depth": _read_depth}


register_dataset("pngpairs", PngPairsDataset)


# --- a new method -------------------------------------------------------------------------------

class MeanExchange(torch.nn.Module):
    """Each task adds a 1x1 projection of the mean of all tasks' features."""

    def __init__(self, tasks: list[str], channels: int) -> None:
        super().__init__()
        self.mix = torch.nn.ModuleDict({t: torch.nn.Conv2d(channels, channels, 1) for t in tasks})

    def forward(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        mean = torch.stack(list(feats.values())).mean(0)
        return {t: f + self.mix[t](mean) for t, f in feats.items()}


class MeanExchangeNet(DenseMTL):
    def build_exchange(self, channels: int, downsample: int, opts: dict[str, Any]) -> MeanExchange:
        return MeanExchange(list(self.tasks), channels)


register_arch("mean_exchange", MeanExchangeNet)


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    assert cli(["synth", "--out", str(root), "--train", "8", "--val", "4", "--height", str(H),
                "--width", str(W), "--seed", "5", "--quiet", "--workers", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def pngpairs(tmp_path_factory, synthetic) -> Path:
    """The built-in benchmark rewritten in PngPairsDataset's format."""
    root = tmp_path_factory.mktemp("pngpairs")
    meta = json.loads((synthetic / "meta.json").read_text())
    K = meta["K"]
    (root / "camera.json").write_text(json.dumps([K[0][0], K[1][1], K[0][2], K[1][2]]))
    for split in ("train", "val"):
        (root / split).mkdir()
        for sid in (synthetic / "gt_sets" / f"{split}.txt").read_text().split():
            image = read_rgb(next((synthetic / "images").glob(f"{sid}.*")))
            Image.fromarray(image).save(root / split / f"{sid}.jpg", quality=95)
            seg = read_png(synthetic / "segmentation" / f"{sid}.png")
            Image.fromarray(seg.astype(np.uint8)).save(root / split / f"{sid}_classes.png")
            depth = np.load(synthetic / "depth" / f"{sid}.npy")
            mm = np.clip(np.round(depth * 1000), 0, 65535).astype(np.uint16)
            Image.fromarray(mm).save(root / split / f"{sid}_depth.png")
    return root


def run_config(path: Path, run: Path, tasks: dict, data: dict) -> Path:
    cfg = {
        "imports": ["test_extending"],
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(run), "accelerator": "cpu", "devices": 1,
                    "max_steps": 3, "val_check_interval": 3, "check_val_every_n_epoch": None,
                    "log_every_n_steps": 1, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "densemtl.training.MultiTaskModule", "init_args": {
            "tasks": tasks,
            "network": {"arch": "densemtl", "encoder": {"name": "resnet18", "pretrained": False},
                        "decoder": {"num_ch_dec": [8, 16, 16, 32, 32]}},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "grid_samples": 2, "constant_fit_batches": 2}},
        "data": {"class_path": "densemtl.data.DenseDataModule", "init_args": {
            "height": H, "width": W, "batch_size": 4, "num_workers": 0, "hflip": 0.5, **data}},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fit_and_test(tmp_path: Path, tasks: dict, data: dict) -> tuple[Path, dict[str, float]]:
    run = tmp_path / "run"
    config = run_config(tmp_path / "config.yaml", run, tasks, data)
    assert cli(["fit", "--config", str(config)]) == 0
    last = run / "checkpoints" / "last.ckpt"
    assert cli(["test", "--config", str(config), "--ckpt_path", str(last)]) == 0
    result = json.loads((run / "metrics.json").read_text())
    assert result["step"] == 3
    return last, result


def predict_and_export(tmp_path: Path, ckpt: Path, images: Path, tasks: list[str]) -> None:
    """``densemtl predict`` writes every task; the ONNX export gives the same predictions."""
    out = tmp_path / "pred"
    assert cli(["predict", "--ckpt", str(ckpt), "--input", str(images), "--output",
                str(out)]) == 0
    first = sorted(p for p in images.iterdir() if p.suffix in (".jpg", ".png")
                   and not p.stem.endswith(("_classes", "_depth")))[0]
    model = load_model(ckpt)
    image = torch.from_numpy(read_rgb(first).copy()).permute(2, 0, 1).float() / 255
    expected = model.predict(image)
    for task in tasks:
        saved = np.load(out / f"{first.name}.{task}.npy")
        assert saved.shape[-2:] == (H, W), task
        png = np.asarray(Image.open(out / f"{first.name}.{task}.png"))
        assert png.shape == (H, W, 3) and png.std() > 0, task
    fg = np.load(out / f"{first.name}.foreground.npy") if "foreground" in tasks else None
    if fg is not None:
        np.testing.assert_allclose(fg, expected["foreground"][0].numpy(), atol=1e-6)
        png = np.asarray(Image.open(out / f"{first.name}.foreground.png"))
        assert (png[..., 1:] == 0).all()  # the test's own colouriser: red only
        np.testing.assert_array_equal(png[..., 0], np.round(fg * 255).astype(np.uint8))

    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "model.onnx"
    assert cli(["export", "--ckpt", str(ckpt), "--out", str(onnx_path), "--height", str(H),
                "--width", str(W)]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == list(model.tasks)
    outputs = dict(zip(names, session.run(None, {"image": image[None].numpy()})))
    for task in tasks:
        got, want = outputs[task][0], expected[task].numpy()
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=task)
        else:  # class ids: equal except where two logits tie within float noise
            assert (got == want).mean() > 0.99, task


# --- the tests --------------------------------------------------------------------------------

def test_a_task_declared_in_this_file_trains_tests_predicts_and_exports(tmp_path, synthetic):
    tasks = {"semseg": {"channels": 10}, "foreground": None}
    ckpt, result = fit_and_test(tmp_path, tasks, {"dataset": "synthetic", "root": str(synthetic)})
    metrics, constant = result["metrics"], result["constant_predictor"]
    for name in ("foreground/IoU", "foreground/accuracy", "semseg/mIoU"):
        assert 0 <= metrics[name] <= 1, name
    # the constant predictor predicts the majority class of the mask (background): IoU 0
    assert constant["foreground/IoU"] == 0.0
    assert 0.5 < constant["foreground/accuracy"] < 1
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| foreground | IoU |" in report and "| foreground | accuracy |" in report
    assert list((tmp_path / "run" / "grids").glob("*.png"))
    predict_and_export(tmp_path, ckpt, synthetic / "images", ["semseg", "foreground"])


def test_the_derived_task_label_follows_the_transforms(synthetic):
    from densemtl.data.registry import build_dataset
    from densemtl.data.transforms import build_transforms

    plain = build_dataset("synthetic", str(synthetic), "train", ["foreground"])
    sample = plain[0]
    assert set(sample) == {"image", "id", "K", "foreground"}  # semseg read, then dropped
    seg = build_dataset("synthetic", str(synthetic), "train", ["semseg"])[0]["semseg"]
    expected = torch.isin(seg, torch.tensor(OBJECTS)).float()
    expected[seg == IGNORE_INDEX] = -1
    assert torch.equal(sample["foreground"][0], expected)
    assert 0 < float((expected == 1).float().mean()) < 1
    torch.manual_seed(0)
    flipped = build_dataset("synthetic", str(synthetic), "train", ["foreground", "semseg"],
                            build_transforms(24, 32, train=True, hflip_p=1.0))[0]
    fg = torch.isin(flipped["semseg"], torch.tensor(OBJECTS)).float()
    fg[flipped["semseg"] == IGNORE_INDEX] = -1
    assert flipped["foreground"].shape == (1, 24, 32)
    assert torch.equal(flipped["foreground"][0], fg)


def test_a_dataset_declared_in_this_file_trains_tests_predicts_and_exports(tmp_path, pngpairs):
    tasks = {"semseg": {"channels": 10}, "depth": {}, "normals": {}}
    ckpt, result = fit_and_test(tmp_path, tasks, {"dataset": "pngpairs", "root": str(pngpairs)})
    metrics = result["metrics"]
    for name in ("semseg/mIoU", "depth/rmse", "normals/mean"):
        assert np.isfinite(metrics[name]), name
    assert 0 < metrics["normals/mean"] < 180
    model = load_model(ckpt)
    assert model.class_names == list(PngPairsDataset.class_names)  # kept for predict
    np.testing.assert_array_equal(model.palette, PngPairsDataset.palette)
    predict_and_export(tmp_path, ckpt, pngpairs / "val", list(tasks))


def test_the_new_dataset_reads_its_files_exactly(pngpairs, synthetic):
    from densemtl.data.registry import build_dataset

    ds = build_dataset("pngpairs", str(pngpairs), "train", ["semseg", "depth", "normals"],
                       validate=True)
    ref = build_dataset("synthetic", str(synthetic), "train", ["semseg", "depth"])
    # normals derived from depth and K, self-supervised depth scored on the depth label, and
    # this file's foreground task from the classes
    assert ds.available_tasks == ("semseg", "depth", "normals", "disp", "foreground")
    a, b = ds[0], ref[0]
    assert torch.equal(a["semseg"], b["semseg"])
    torch.testing.assert_close(a["depth"], b["depth"], atol=5e-4, rtol=0)  # millimetre PNG
    assert torch.equal(a["K"], b["K"])
    valid = a["normals"].norm(dim=0) > 0
    assert float(valid.float().mean()) > 0.9


def test_a_method_declared_in_this_file_builds_trains_and_round_trips(tmp_path):
    config = {"tasks": {"semseg": {"channels": 5}, "depth": None, "foreground": None},
              "network": {"arch": "mean_exchange",
                          "encoder": {"name": "resnet18", "pretrained": False},
                          "decoder": {"num_ch_dec": [8, 16, 16, 32, 32]}}}
    torch.manual_seed(0)
    model = build_model(config)
    assert isinstance(model.exchange["1"], MeanExchange)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, H, W, generator=g)
    batch = {"image": x, "semseg": torch.randint(0, 5, (2, H, W), generator=g),
             "depth": torch.rand(2, 1, H, W, generator=g) * 5 + 1,
             "foreground": (torch.rand(2, 1, H, W, generator=g) > 0.5).float()}
    losses = MultiTaskLoss(list(config["tasks"]))(model(x), batch)
    assert all(torch.isfinite(losses[t]) and losses[t] > 0 for t in config["tasks"])
    losses["total"].backward()
    for name, p in model.exchange.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    model.eval()
    for task, value in model.predict(x).items():
        assert torch.equal(value, loaded.predict(x)[task]), task


def test_registration_refuses_broken_declarations():
    from densemtl.tasks import get_task, unregister_task

    class NoLoss(Task):
        name = "noloss"
        metric = ForegroundMetric
        main_metric = "IoU"

    with pytest.raises(TypeError, match="does not declare 'loss'"):
        register_task(NoLoss())

    class WrongLoss(ForegroundTask):
        name = "wrongloss"
        loss = torch.nn.L1Loss  # a torch loss, not a TaskLoss

    with pytest.raises(TypeError, match="loss must be a TaskLoss subclass"):
        register_task(WrongLoss())

    class WrongMain(ForegroundTask):
        name = "wrongmain"
        main_metric = "mIoU"

    with pytest.raises(KeyError, match="no metric 'mIoU'"):
        register_task(WrongMain())

    class SameName(ForegroundTask):
        label_key = "other"

    with pytest.raises(ValueError, match="already registered"):
        register_task(SameName())

    class SameLabel(ForegroundTask):
        name = "background"
        label_key = "foreground"

    with pytest.raises(ValueError, match="label key 'foreground' already belongs"):
        register_task(SameLabel())
    with pytest.raises(ValueError, match="register_task"):
        get_task("background")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("nyudv2", PngPairsDataset)
    with pytest.raises(TypeError, match="DenseDataset subclass"):
        register_dataset("plain", dict)  # type: ignore[arg-type]
    replaced = register_task(ForegroundTask(), replace=True)  # replacing is explicit
    assert get_task("foreground") is replaced
    with pytest.raises(KeyError):
        unregister_task("background")
