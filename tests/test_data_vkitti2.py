"""Virtual KITTI 2: archive and merged layouts, colour-coded classes, depth in cm, selection."""

from __future__ import annotations

import numpy as np
import pytest

from densemtl.data.vkitti2 import VKITTI2Dataset
from densemtl.io import DataError

from test_data_helpers import grey_png, raw_png, rgb_image

H, W = 15, 50  # 375x1242 scaled by ~1/25
COLOURS = [
    (100, 60, 100),
    (90, 200, 255),
    (0, 199, 0),
    (90, 240, 0),
    (255, 127, 80),
    (0, 139, 139),
    (210, 0, 200),
    (0, 0, 0),
    (250, 100, 255),
]
CLS14 = [5, 1, 2, 3, 12, 13, 0, 255, 6]
CLS8 = [0, 6, 5, 5, 7, 7, 255, 255, 255]


def make_vkitti2(
    root,
    merged=False,
    scenes=("Scene01", "Scene02"),
    frames=3,
    variants=("15-deg-left", "clone"),
    intrinsics=True,
):
    def base(mod):
        return root if merged else root / f"vkitti_2.0.3_{mod}"

    label = np.zeros((H, W, 3), np.uint8)
    flat = label.reshape(-1, 3)
    for i, c in enumerate(COLOURS):
        flat[i] = c
    for scene in scenes:
        for variant in variants:
            for cam in (0, 1):
                rel = f"{scene}/{variant}/frames"
                for f in range(frames):
                    rgb_image(
                        base("rgb") / rel / "rgb" / f"Camera_{cam}" / f"rgb_{f:05d}.jpg",
                        H,
                        W,
                        seed=f,
                        fmt="JPEG",
                    )
                    raw_png(
                        base("classSegmentation")
                        / rel
                        / "classSegmentation"
                        / f"Camera_{cam}"
                        / f"classgt_{f:05d}.png",
                        label,
                    )
                    depth = np.full((H, W), 1500, np.uint16)
                    depth[0, 0] = 65535
                    grey_png(
                        base("depth") / rel / "depth" / f"Camera_{cam}" / f"depth_{f:05d}.png",
                        depth,
                    )
            if intrinsics:
                lines = ["frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"]
                lines += [
                    f"{f} {c} {700 + f} 725.0087 620.5 187.0" for f in range(frames) for c in (0, 1)
                ]
                path = base("textgt") / scene / variant / "intrinsic.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("merged", [False, True])
def test_layouts_classes_depth_intrinsics(tmp_path, merged):
    root = make_vkitti2(tmp_path, merged=merged)
    ds = VKITTI2Dataset(root, "all", ["semseg", "depth", "normals"], validate=True)
    assert len(ds) == 2 * 3  # 15-deg-left, Camera_0 only, by default
    assert ds.ids[0] == "Scene01/15-deg-left/Camera_0/00000"
    s = ds[1]
    assert s["semseg"].flatten()[: len(COLOURS)].tolist() == CLS14
    assert s["depth"][0, 0, 0].item() == pytest.approx(655.35) and s["depth"][
        0, 1, 1
    ].item() == pytest.approx(15.0)
    assert s["K"][0, 0].item() == pytest.approx(701 * W / 1242)  # frame 1 of intrinsic.txt
    s8 = VKITTI2Dataset(root, "all", ["semseg"], num_classes=8)[0]
    assert s8["semseg"].flatten()[: len(COLOURS)].tolist() == CLS8


def test_selection_and_split(tmp_path):
    root = make_vkitti2(tmp_path, scenes=("Scene01", "Scene02", "Scene06"), frames=5)
    sel = VKITTI2Dataset(
        root, "all", ["semseg"], scenes=["Scene06"], variants=["clone"], cameras=[0, 1]
    )
    assert len(sel) == 10 and {i.split("/")[2] for i in sel.ids} == {"Camera_0", "Camera_1"}
    train = VKITTI2Dataset(root, "train", ["semseg"], seed=3).ids
    val = VKITTI2Dataset(root, "val", ["semseg"], seed=3).ids
    assert len(train) == 12 and len(val) == 3 and not set(train) & set(val)
    with pytest.raises(FileNotFoundError, match="Scene99"):
        VKITTI2Dataset(root, "all", ["semseg"], scenes=["Scene99"])
    with pytest.raises(FileNotFoundError, match="15-deg-right"):
        VKITTI2Dataset(root, "all", ["semseg"], variants=["15-deg-right"])


def test_bad_input(tmp_path):
    root = make_vkitti2(tmp_path, intrinsics=False)
    ds = VKITTI2Dataset(root, "all", ["semseg", "depth"])
    assert ds[0]["K"][0, 0].item() == pytest.approx(725.0087 * W / 1242)  # constants without textgt
    bad = np.zeros((H, W, 3), np.uint8)
    bad[4, 4] = (1, 2, 3)
    label = (
        root
        / "vkitti_2.0.3_classSegmentation/Scene01/15-deg-left/frames/classSegmentation"
        / "Camera_0/classgt_00002.png"
    )
    raw_png(label, bad)
    with pytest.raises(DataError, match=r"classgt_00002\.png: colours \[\(1, 2, 3\)\]"):
        ds[2]
    ok = VKITTI2Dataset(root, "all", ["semseg"], unknown_labels="ignore")[2]["semseg"]
    assert ok[4, 4] == 255 and (ok == 255).all()
    depth = root / "vkitti_2.0.3_depth/Scene01/15-deg-left/frames/depth/Camera_0/depth_00001.png"
    depth.unlink()
    with pytest.raises(FileNotFoundError, match=r"depth_00001\.png"):
        VKITTI2Dataset(root, "all", ["depth"])
    grey_png(depth, np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match="16-bit"):
        VKITTI2Dataset(root, "all", ["depth"])[1]
