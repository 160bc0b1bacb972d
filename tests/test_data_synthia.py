"""SYNTHIA RAND-CITYSCAPES (16-bit multi-channel labels, 16-bit depth) and seeded splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from densemtl.data.splits import random_split, split_from_file
from densemtl.data.synthia import SynthiaDataset
from densemtl.io import DataError

from test_data_helpers import grey_png, raw_png, rgb_image

H, W = 19, 32  # 760x1280 scaled by 1/40
RAW = [3, 4, 2, 21, 1, 8, 0, 13, 22, 18, 10]
CS16 = [0, 1, 2, 3, 9, 12, 255, 255, 255, 255, 10]


def make_synthia(root, n=10):
    for i in range(n):
        sid = f"{i:07d}"
        rgb_image(root / "RGB" / f"{sid}.png", H, W, seed=i)
        label = np.zeros((H, W, 3), np.uint16)
        label[..., 0] = np.resize(np.array(RAW, np.uint16), (H, W))
        label[..., 1] = 1000 + i  # instance ids: must be ignored
        raw_png(root / "GT" / "LABELS" / f"{sid}.png", label)
        depth = np.full((H, W), 1234, np.uint16)
        depth[0, 0] = 0
        depth[0, 1] = 65535
        raw_png(root / "Depth" / "Depth" / f"{sid}.png", np.stack([depth] * 3, -1))
    return root


def test_labels_depth_and_intrinsics(tmp_path):
    root = make_synthia(tmp_path, n=3)
    ds = SynthiaDataset(root, "all", ["semseg", "depth", "normals"], validate=True)
    assert ds.num_classes == 16 and ds.class_names[9] == "sky"
    s = ds[0]
    assert s["semseg"].flatten()[: len(RAW)].tolist() == CS16
    d = s["depth"][0]
    assert (
        d[0, 0] == 0
        and d[0, 1].item() == pytest.approx(655.35)
        and d[1, 1].item() == pytest.approx(12.34)
    )
    assert s["K"][0, 0].item() == pytest.approx(532.740352 * W / 1280)
    assert s["K"][0, 2].item() == pytest.approx((640 + 0.5) * W / 1280 - 0.5)
    far = SynthiaDataset(root, "all", ["depth"], max_depth=600.0)[0]["depth"][0]
    assert far[0, 1] == 0 and far[1, 1].item() == pytest.approx(12.34)
    grey_png(root / "Depth" / "Depth" / "0000001.png", np.full((H, W), 500, np.uint16))
    assert SynthiaDataset(root, "all", ["depth"])[1]["depth"][0, 0, 0].item() == pytest.approx(5.0)


def test_unknown_synthia_id(tmp_path):
    root = make_synthia(tmp_path, n=2)
    label = np.zeros((H, W, 3), np.uint16)
    label[2, 2, 0] = 23
    raw_png(root / "GT" / "LABELS" / "0000001.png", label)
    with pytest.raises(DataError, match=r"LABELS/0000001\.png.*\[23\]"):
        SynthiaDataset(root, "all", ["semseg"])[1]


def test_random_split_is_disjoint_deterministic_and_complete(tmp_path):
    root = make_synthia(tmp_path, n=10)
    train = SynthiaDataset(root, "train", ["semseg"], seed=5).ids
    val = SynthiaDataset(root, "val", ["semseg"], seed=5).ids
    assert len(train) == 8 and len(val) == 2
    assert not set(train) & set(val) and sorted(train + val) == [f"{i:07d}" for i in range(10)]
    assert SynthiaDataset(root, "train", ["semseg"], seed=5).ids == train
    assert (
        SynthiaDataset(root, "val", ["semseg"], seed=6).ids != val
        or SynthiaDataset(root, "val", ["semseg"], seed=7).ids != val
    )


def test_split_helpers():
    ids = [f"x{i}" for i in range(101)]
    tr, va = random_split(ids, "train", 0.2, 1), random_split(ids, "val", 0.2, 1)
    assert len(tr) == 81 and len(va) == 20 and not set(tr) & set(va)
    assert random_split(list(reversed(ids)), "val", 0.2, 1) == va  # listing order does not matter
    with pytest.raises(ValueError, match="unique"):
        random_split(["a", "a"], "train")


def test_split_file(tmp_path):
    root = make_synthia(tmp_path / "s", n=4)
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ["0000000", "0000001"], "val": ["0000003"]}))
    assert SynthiaDataset(root, "val", ["semseg"], split_file=str(f)).ids == ["0000003"]
    f.write_text(json.dumps({"train": ["0000000", "0000003"], "val": ["0000003"]}))
    with pytest.raises(DataError, match="share 1 ids"):
        SynthiaDataset(root, "val", ["semseg"], split_file=str(f))
    f.write_text(json.dumps({"train": ["0000009"], "val": []}))
    with pytest.raises(DataError, match="no files"):
        split_from_file(f, ["0000000"], "train")
