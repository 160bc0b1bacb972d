"""DataModules: batches, registry, partial labels, domain adaptation (target labels unread)."""

from __future__ import annotations

import json

import pytest
import torch

from densemtl.data.datamodule import AdaptationDataModule, DenseDataModule
from densemtl.data.registry import DATASETS, build_dataset
from densemtl.data.synthetic import generate

from test_data_helpers import rgb_image

TASKS = ["semseg", "depth", "normals", "edges"]
LABEL_DIRS = ("segmentation", "depth", "normals", "edge")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root / "a", 6, 3, 36, 48, seed=0, style="a", workers=1, progress=False)
    generate(root / "b", 6, 3, 36, 48, seed=1, style="b", workers=1, progress=False)
    return root


def test_registry_names():
    # the built-in readers (a test module may register more in the same process)
    builtin = {"synthetic", "nyudv2", "cityscapes", "synthia", "vkitti2", "folder"}
    assert builtin <= set(DATASETS)
    assert all(DATASETS[name].__module__.startswith("densemtl.data.") for name in builtin)
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        build_dataset("kitti", ".", "train", [])


def test_dense_datamodule_batches(synth, tmp_path):
    dm = DenseDataModule(
        "synthetic",
        str(synth / "a"),
        TASKS,
        24,
        32,
        batch_size=4,
        num_workers=0,
        scale_min=0.8,
        scale_max=1.2,
        color_jitter=0.1,
        validate=True,
        predict_root=str(tmp_path),
    )
    assert dm.num_classes == 10 and dm.class_names[0] == "floor" and dm.palette.shape == (10, 3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 32) and batch["K"].shape == (4, 3, 3)
    for key, shape in (
        ("semseg", (4, 24, 32)),
        ("depth", (4, 1, 24, 32)),
        ("normals", (4, 3, 24, 32)),
        ("edges", (4, 1, 24, 32)),
    ):
        assert batch[key].shape == shape and batch[f"has_{key}"].tolist() == [True] * 4
    assert len(dm.train_dataloader()) == 1  # 6 samples, batch 4, drop_last
    val = list(dm.val_dataloader())
    assert [len(b["id"]) for b in val] == [3]
    assert val[0]["K"][0, 0, 0].item() == pytest.approx(0.81 * 48 * 32 / 48)
    rgb_image(tmp_path / "x" / "photo.jpg", 30, 40, fmt="JPEG")
    dm.setup("predict")
    pred = next(iter(dm.predict_dataloader()))
    assert pred["id"] == ["x/photo.jpg"] and pred["image"].shape == (1, 3, 24, 32)
    assert "semseg" not in pred and "K" not in pred


def test_workers_and_limit_train(synth):
    dm = DenseDataModule(
        "synthetic",
        str(synth / "a"),
        ["semseg", "depth"],
        24,
        32,
        batch_size=2,
        num_workers=2,
        limit_train=4,
        seed=3,
    )
    dm.setup("fit")
    ids = [i for b in dm.train_dataloader() for i in b["id"]]
    assert sorted(ids) == [f"train_{i:06d}" for i in range(4)]
    assert "normals" not in next(iter(dm.train_dataloader()))


def test_partially_labelled_batches(synth, tmp_path):
    import shutil

    root = tmp_path / "partial"
    shutil.copytree(synth / "a", root)
    (root / "depth" / "train_000001.npy").unlink()
    with pytest.warns(UserWarning, match="labels dropped"):
        dm = DenseDataModule(
            "synthetic",
            str(root),
            ["semseg", "depth", "normals"],
            24,
            32,
            batch_size=6,
            num_workers=0,
            hflip=0.0,
            dataset_options={"on_missing": "drop_label"},
        )
        dm.setup("fit")
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                dm.dataset("train"), batch_size=6, collate_fn=dm.train_dataloader().collate_fn
            )
        )
    )
    i = batch["id"].index("train_000001")
    assert batch["has_depth"].tolist() == [j != i for j in range(6)]
    assert (batch["depth"][i] == 0).all() and (batch["depth"][i - 1] > 0).all()
    assert batch["has_semseg"].all() and batch["has_normals"].all()  # files, not derived


def test_adaptation_never_reads_target_training_labels(synth, tmp_path):
    import shutil

    target = tmp_path / "target"
    shutil.copytree(synth / "b", target)
    for folder in LABEL_DIRS:  # remove every *training* label of the target domain
        for f in (target / folder).glob("train_*"):
            f.unlink()
    dm = AdaptationDataModule(
        "synthetic",
        str(synth / "a"),
        "synthetic",
        str(target),
        ["semseg", "depth", "normals"],
        24,
        32,
        target_height=20,
        target_width=28,
        batch_size=2,
        num_workers=0,
        mode="min_size",
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = [b for b, _, _ in loader]
    assert len(batches) == 3
    src, tgt = batches[0]["source"], batches[0]["target"]
    assert src["semseg"].shape == (2, 24, 32) and src["has_depth"].all()
    assert set(tgt) == {"image", "id", "K"} and tgt["image"].shape == (2, 3, 20, 28)
    val = next(iter(dm.val_dataloader()))  # target validation labels are used
    assert val["semseg"].shape[1:] == (20, 28) and val["id"][0].startswith("val_")
    assert dm.num_classes == 10


def test_adaptation_class_count_mismatch(synth, tmp_path):
    from test_data_nyud import make_nyud

    nyud = make_nyud(tmp_path / "nyud")
    dm = AdaptationDataModule(
        "synthetic", str(synth / "a"), "nyudv2", str(nyud), ["semseg"], 24, 32, num_workers=0
    )
    with pytest.raises(ValueError, match="class counts differ"):
        dm.setup("fit")


def test_synthesize_generates_once_and_guards_folders(tmp_path):
    spec = {"train": 4, "val": 2, "height": 24, "width": 32, "seed": 3, "workers": 1}
    root = tmp_path / "bench"
    dm = DenseDataModule("synthetic", str(root), TASKS, 24, 32, batch_size=2, num_workers=0,
                         synthesize=spec)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.dataset("train")) == 4 and len(dm.dataset("val")) == 2
    # byte-identical to the command-line generator with the same arguments
    generate(tmp_path / "ref", 4, 2, 24, 32, seed=3, workers=1, progress=False)
    for name in ("images/train_000001.png", "depth/train_000001.npy"):
        ours, ref = root / name, tmp_path / "ref" / name
        assert ours.read_bytes() == ref.read_bytes()
    # a second call keeps the data; other settings only warn
    stamp = (root / "meta.json").stat().st_mtime_ns
    dm.prepare_data()
    assert (root / "meta.json").stat().st_mtime_ns == stamp
    other = DenseDataModule("synthetic", str(root), TASKS, 24, 32, num_workers=0,
                            synthesize={**spec, "train": 8})
    with pytest.warns(UserWarning, match=r"'train': \(4, 8\)"):
        other.prepare_data()
    # a folder with foreign files is refused, by name
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    dm = DenseDataModule("synthetic", str(foreign), TASKS, 24, 32, synthesize=spec)
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        dm.prepare_data()
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="only applies to the 'synthetic' dataset"):
        DenseDataModule("nyudv2", str(root), TASKS, 24, 32, synthesize=spec)
    with pytest.raises(ValueError, match="unknown option"):
        DenseDataModule("synthetic", str(tmp_path / "x"), TASKS, 24, 32,
                        synthesize={**spec, "colour": 1}).prepare_data()


def test_adaptation_synthesizes_both_domains(tmp_path):
    common = {"train": 4, "val": 2, "height": 24, "width": 32, "workers": 1}
    dm = AdaptationDataModule(
        "synthetic", str(tmp_path / "a"), "synthetic", str(tmp_path / "b"), ["semseg", "depth"],
        24, 32, batch_size=2, num_workers=0,
        source_synthesize={**common, "seed": 0, "style": "a"},
        target_synthesize={**common, "seed": 1, "style": "b"})
    dm.prepare_data()
    metas = [json.loads((tmp_path / d / "meta.json").read_text()) for d in "ab"]
    assert [(m["style"], m["seed"]) for m in metas] == [("a", 0), ("b", 1)]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert batch["source"]["image"].shape == (2, 3, 24, 32)
