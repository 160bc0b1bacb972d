"""NYUDv2 (ATRC layout, PNG and NPY variants): decoded values and bad-input handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densemtl.data.nyud import NYUD_K, NYUDv2Dataset
from densemtl.io import DataError

from test_data_helpers import grey_png, raw_png, rgb_image

H, W = 6, 8
TASKS = ["semseg", "depth", "normals", "edges"]
SEG = np.array([0, 1, 5, 40], dtype=np.uint8)  # -> 255, 0, 4, 39
NORMAL = np.array([0.6, -0.48, -0.64], dtype=np.float32)  # unit


def make_nyud(root, variant="png", train=("0001", "0002"), val=("0003",)):
    root.mkdir(parents=True, exist_ok=True)
    (root / "gt_sets").mkdir()
    (root / "gt_sets" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "gt_sets" / "val.txt").write_text("\n".join(val) + "\n")
    for k, sid in enumerate((*train, *val)):
        ext = "png" if variant == "png" else "jpg"
        rgb_image(root / "images" / f"{sid}.{ext}", H, W, seed=k)
        grey_png(root / "segmentation" / f"{sid}.png", np.resize(SEG, (H, W)))
        depth = np.full((H, W), 2.5, np.float32)
        depth[0, :4] = [np.nan, np.inf, -1.0, 7.25]
        (root / "depth").mkdir(exist_ok=True)
        np.save(root / "depth" / f"{sid}.npy", depth)
        normals = np.broadcast_to(NORMAL, (H, W, 3)).copy()
        edges = np.zeros((H, W), np.float32)
        edges[2, :] = 1
        if variant == "png":
            png = np.rint((normals + 1) * 127.5).astype(np.uint8)
            png[1, 1] = 128  # encodes ~(0, 0, 0): invalid
            raw_png(root / "normals" / f"{sid}.png", png)
            grey_png(root / "edge" / f"{sid}.png", (edges * 255).astype(np.uint8))
        else:
            normals[1, 1] = 0.0
            (root / "normals").mkdir(exist_ok=True)
            (root / "edge").mkdir(exist_ok=True)
            np.save(root / "normals" / f"{sid}.npy", normals)
            np.save(root / "edge" / f"{sid}.npy", edges)
    return root


@pytest.mark.parametrize("variant", ["png", "npy"])
def test_decoded_values(tmp_path, variant):
    root = make_nyud(tmp_path / "NYUD_MT", variant)
    ds = NYUDv2Dataset(tmp_path, "train", TASKS, validate=True)  # parent of NYUD_MT works too
    assert ds.ids == ["0001", "0002"] and ds.num_classes == 40 and ds.palette.shape == (40, 3)
    assert NYUDv2Dataset(root, "val", TASKS).ids == ["0003"]
    s = ds[0]
    assert s["semseg"].flatten()[:4].tolist() == [255, 0, 4, 39]
    assert s["depth"][0, 0, :5].tolist() == [0.0, 0.0, 0.0, 7.25, 2.5]
    n = s["normals"]
    assert n[:, 1, 1].abs().sum() == 0
    tol = 1e-6 if variant == "npy" else 0.01  # PNG quantisation
    assert torch.allclose(n[:, 0, 0], torch.from_numpy(NORMAL), atol=tol)
    assert s["edges"][0].sum() == W and s["edges"][0, 2].tolist() == [1.0] * W
    assert s["K"][0, 0] == pytest.approx(NYUD_K[0] * W / 560, rel=1e-6)
    if variant == "png":
        assert np.allclose(
            s["image"].permute(1, 2, 0).numpy() * 255,
            rgb_image(tmp_path / "ref.png", H, W, seed=0),
            atol=1e-3,
        )


def test_variant_is_enforced_and_signs_apply(tmp_path):
    root = make_nyud(tmp_path / "n", "png")
    with pytest.raises(FileNotFoundError, match=r"images/0001\.jpg"):
        NYUDv2Dataset(root, "train", TASKS, variant="npy")
    ds = NYUDv2Dataset(root, "train", ["normals"], variant="png", normals_signs=[-1, 1, 1])
    assert ds[0]["normals"][0, 0, 0] == pytest.approx(-0.6, abs=0.01)
    with pytest.raises(ValueError, match="depth"):
        NYUDv2Dataset(root, "train", ["disparity"])


def test_unknown_class_ids(tmp_path):
    root = make_nyud(tmp_path / "n")
    seg = np.resize(SEG, (H, W))
    seg[3, 3] = 41
    grey_png(root / "segmentation" / "0002.png", seg)
    ds = NYUDv2Dataset(root, "train", ["semseg"])
    with pytest.raises(DataError, match=r"segmentation/0002\.png.*\[41\]"):
        ds[1]
    ok = NYUDv2Dataset(root, "train", ["semseg"], unknown_labels="ignore")[1]["semseg"]
    assert ok[3, 3] == 255 and ok[0, 1] == 0


def test_size_mismatch_and_corrupt_image(tmp_path):
    root = make_nyud(tmp_path / "n")
    np.save(root / "depth" / "0001.npy", np.ones((5, W), np.float32))
    ds = NYUDv2Dataset(root, "train", ["depth"])
    with pytest.raises(DataError, match=r"depth/0001\.npy: depth label is 5x8.*6x8"):
        ds[0]
    np.save(root / "depth" / "0001.npy", np.ones((3, 4), np.float32))  # same aspect: resizable
    with pytest.raises(DataError, match=r"0001\.npy"):
        ds[0]
    fixed = NYUDv2Dataset(root, "train", ["depth"], on_size_mismatch="resize")[0]
    assert fixed["depth"].shape == (1, H, W)
    (root / "images" / "0002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"images/0002\.png"):
        ds[1]


def test_missing_files_policies(tmp_path):
    root = make_nyud(tmp_path / "n", train=("0001", "0002", "0004"))
    (root / "normals" / "0002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 missing file.*normals/0002\.png"):
        NYUDv2Dataset(root, "train", TASKS)
    assert len(NYUDv2Dataset(root, "train", ["semseg", "depth"])) == 3  # normals not requested
    with pytest.warns(UserWarning, match="1 sample"):
        dropped = NYUDv2Dataset(root, "train", TASKS, on_missing="drop_sample")
    assert dropped.ids == ["0001", "0004"]
    with pytest.warns(UserWarning, match="labels dropped"):
        partial = NYUDv2Dataset(root, "train", TASKS, on_missing="drop_label")
    assert "normals" not in partial[1] and "depth" in partial[1] and "normals" in partial[0]
    (root / "images" / "0004.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/0004\.png"):
        NYUDv2Dataset(root, "train", TASKS, on_missing="drop_label")
    (root / "gt_sets" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"gt_sets/val\.txt"):
        NYUDv2Dataset(root, "val", TASKS)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        NYUDv2Dataset(tmp_path / "nowhere", "train", TASKS)
