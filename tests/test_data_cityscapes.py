"""Cityscapes: disparity + camera JSON -> metres, class mappings, pre-resized images, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.data.cityscapes import MEAN_K, CityscapesDataset
from densemtl.data.transforms import build_transforms
from densemtl.io import DataError

from test_data_helpers import grey_png, rgb_image, write_json

H, W = 8, 16
RAW = np.array([7, 8, 22, 27, 28, 26, 0, 24, 12], dtype=np.uint8)
EXPECTED = {
    19: [0, 1, 9, 14, 15, 13, 255, 11, 3],
    16: [0, 1, 255, 255, 13, 12, 255, 10, 3],
    8: [0, 255, 255, 255, 7, 7, 255, 255, 255],
    7: [0, 0, 3, 6, 6, 6, 255, 5, 1],
}
CAMERA = {
    "extrinsic": {
        "baseline": 0.2,
        "pitch": 0.0,
        "roll": 0.0,
        "x": 1.7,
        "y": 0.1,
        "yaw": 0.0,
        "z": 1.2,
    },
    "intrinsic": {"fx": 2000.0, "fy": 2010.0, "u0": 1000.0, "v0": 500.0},
}


def make_cityscapes(
    root,
    split="train",
    frames=(("aachen", "000000_000019"), ("bochum", "000001_000019")),
    image_folder="leftImg8bit",
    image_size=(H, W),
):
    for k, (city, frame) in enumerate(frames):
        stem = f"{city}_{frame}"
        rgb_image(
            root / image_folder / split / city / f"{stem}_leftImg8bit.png", *image_size, seed=k
        )
        grey_png(
            root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", np.resize(RAW, (H, W))
        )
        disp = np.full((H, W), 1 + 256 * 50, np.uint16)  # disparity 50 px -> 0.2 * 2000 / 50 = 8 m
        disp[0, :4] = [0, 1, 2, 1 + 256 * 16]  # invalid, invalid, 1/256 px, 16 px
        grey_png(root / "disparity" / split / city / f"{stem}_disparity.png", disp)
        write_json(root / "camera" / split / city / f"{stem}_camera.json", CAMERA)
    return root


def test_disparity_to_metres_and_intrinsics(tmp_path):
    root = make_cityscapes(tmp_path)
    ds = CityscapesDataset(root, "train", ["semseg", "depth", "normals"], validate=True)
    assert ds.ids == ["aachen/aachen_000000_000019", "bochum/bochum_000001_000019"]
    s = ds[0]
    d = s["depth"][0]
    assert d[0, 0] == 0 and d[0, 1] == 0  # p = 0 and p = 1 are invalid
    assert d[0, 2].item() == pytest.approx(0.2 * 2000 * 256)
    assert d[0, 3].item() == pytest.approx(0.2 * 2000 / 16)
    assert d[1, 0].item() == pytest.approx(8.0)
    sx = W / 2048
    K = s["K"]
    assert K[0, 0].item() == pytest.approx(2000 * sx) and K[1, 1].item() == pytest.approx(
        2010 * H / 1024
    )
    assert K[0, 2].item() == pytest.approx(sx * (1000 + 0.5) - 0.5)
    # normals derived from the (constant) depth: fronto-parallel plane, towards the camera
    n = s["normals"]
    assert torch.allclose(n[:, 3:, 1:-1], torch.tensor([0.0, 0.0, -1.0])[:, None, None], atol=1e-5)


@pytest.mark.parametrize("num_classes", [19, 16, 8, 7])
def test_class_mappings(tmp_path, num_classes):
    root = make_cityscapes(tmp_path)
    ds = CityscapesDataset(root, "train", ["semseg"], num_classes=num_classes)
    assert ds.num_classes == num_classes == len(ds.palette)
    assert ds[0]["semseg"].flatten()[: len(RAW)].tolist() == EXPECTED[num_classes]
    if num_classes == 16:
        assert "terrain" not in ds.class_names and ds.class_names[13] == "bus"
    with pytest.raises(ValueError, match="class sets"):
        CityscapesDataset(root, "train", ["semseg"], num_classes=13)


def test_pre_resized_images_get_resized_labels(tmp_path):
    root = make_cityscapes(tmp_path, image_folder="leftImg8bit_small", image_size=(H // 2, W // 2))
    s = CityscapesDataset(root, "train", ["semseg", "depth"])[0]
    assert s["semseg"].shape == (H // 2, W // 2) and s["depth"].shape == (1, H // 2, W // 2)
    full = np.resize(RAW, (H, W))
    assert s["semseg"][0, 0].item() == EXPECTED[19][list(RAW).index(full[1, 1])]
    assert s["K"][0, 0].item() == pytest.approx(2000 * (W // 2) / 2048)
    strict = CityscapesDataset(root, "train", ["semseg"], on_size_mismatch="error")
    with pytest.raises(DataError, match=r"gtFine_labelIds\.png: semseg label is 8x16"):
        strict[0]


def test_bad_input(tmp_path):
    root = make_cityscapes(tmp_path)
    cam = root / "camera" / "train" / "bochum" / "bochum_000001_000019_camera.json"
    cam.unlink()
    with pytest.raises(FileNotFoundError, match=r"bochum_000001_000019_camera\.json"):
        CityscapesDataset(root, "train", ["depth"])
    seg_only = CityscapesDataset(root, "train", ["semseg"])  # no camera needed: mean K
    assert seg_only[1]["K"][0, 0].item() == pytest.approx(MEAN_K[0] * W / 2048)
    with pytest.warns(UserWarning):
        partial = CityscapesDataset(root, "train", ["semseg", "depth"], on_missing="drop_label")
    assert "depth" not in partial[1] and "semseg" in partial[1] and "depth" in partial[0]
    write_json(cam, {"intrinsic": {"fx": 1.0}})
    with pytest.raises(DataError, match=r"bochum_000001_000019_camera\.json"):
        CityscapesDataset(root, "train", ["depth"])[1]
    label = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    grey_png(label, np.full((H, W), 40, np.uint8))
    with pytest.raises(DataError, match=r"aachen_000000_000019_gtFine_labelIds.png.*\[40\]"):
        CityscapesDataset(root, "train", ["semseg"])[0]
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesDataset(root, "val", ["semseg"])


def write_sequence(root, split="train", size=(H, W)):
    """leftImg8bit_sequence frames 18 and 20 around each labelled frame 19: frame 18 is the
    labelled image itself (at ``size``), frame 20 another random image."""
    out = {}
    for k, (city, seq) in enumerate((("aachen", "000000"), ("bochum", "000001"))):
        image = np.asarray(Image.open(
            root / "leftImg8bit" / split / city / f"{city}_{seq}_000019_leftImg8bit.png"))
        folder = root / "leftImg8bit_sequence" / split / city
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize(size[::-1], Image.NEAREST).save(
            folder / f"{city}_{seq}_000018_leftImg8bit.png")
        out[city] = rgb_image(folder / f"{city}_{seq}_000020_leftImg8bit.png", *size, seed=10 + k)
    return out


def test_sequence_frames_are_read_around_the_labelled_frame(tmp_path):
    root = make_cityscapes(tmp_path)
    later = write_sequence(root)
    ds = CityscapesDataset(root, "train", ["semseg", "depth"], frames=[-1, 1], validate=True)
    s = ds[1]
    assert s["frame_offsets"] == [-1, 1] and s["frames"].shape == (2, 3, H, W)
    assert torch.equal(s["frames"][0], s["image"])  # frame 18 is a copy of the labelled image
    expected = torch.from_numpy(later["bochum"]).permute(2, 0, 1).float() / 255
    assert torch.equal(s["frames"][1], expected)
    assert "poses" not in s  # Cityscapes has no ground-truth motion
    # one shared crop and flip for the image and its frames, intrinsics updated once
    torch.manual_seed(0)
    train = CityscapesDataset(root, "train", ["semseg"], frames=[-1, 1],
                              transform=build_transforms(H, W, train=True, crop=(6, 10)))
    for _ in range(4):
        t = train[0]
        assert t["frames"].shape == (2, 3, 6, 10)
        assert torch.equal(t["frames"][0], t["image"])


def test_sequence_frames_of_another_size_are_resized(tmp_path):
    """Full-size frames next to pre-resized images: resized to the image (same camera)."""
    root = make_cityscapes(tmp_path)
    yy, xx = np.mgrid[0 : 2 * H, 0 : 2 * W]
    smooth = np.stack([xx * 4, yy * 8, xx + yy], -1).astype(np.uint8)  # gentle ramps
    for city, seq in (("aachen", "000000"), ("bochum", "000001")):
        folder = root / "leftImg8bit_sequence" / "train" / city
        folder.mkdir(parents=True)
        Image.fromarray(smooth).save(folder / f"{city}_{seq}_000018_leftImg8bit.png")
    s = CityscapesDataset(root, "train", [], frames=[-1])[0]
    assert s["frames"].shape == (1, 3, H, W)
    half = torch.from_numpy(smooth[::2, ::2] + np.array([2, 4, 1])).permute(2, 0, 1) / 255
    assert (s["frames"][0] - half.float()).abs()[:, 1:-1, 1:-1].max() < 2.5 / 255
    with pytest.raises(DataError, match="frame -1 is"):  # another aspect ratio: refused
        Image.fromarray(smooth[:, :W]).save(folder / "bochum_000001_000018_leftImg8bit.png")
        CityscapesDataset(root, "train", [], frames=[-1])[1]


def test_missing_sequence_frames_are_named_or_skipped(tmp_path):
    root = make_cityscapes(tmp_path)
    write_sequence(root)
    gone = (root / "leftImg8bit_sequence" / "train" / "aachen"
            / "aachen_000000_000020_leftImg8bit.png")
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=r"aachen_000000_000020_leftImg8bit\.png"):
        CityscapesDataset(root, "train", ["semseg"], frames=[-1, 1])
    with pytest.warns(UserWarning, match="1 sample"):
        ds = CityscapesDataset(root, "train", ["semseg"], frames=[-1, 1], on_missing="drop_sample")
    assert ds.ids == ["bochum/bochum_000001_000019"]
    with pytest.raises(FileNotFoundError, match="missing frame"):
        CityscapesDataset(root, "train", ["semseg"], frames=[-1, 1], on_missing="drop_label")
    # without frames nothing of the sequence package is needed
    assert len(CityscapesDataset(root, "train", ["semseg"])) == 2
    with pytest.raises(FileNotFoundError, match="leftImg8bit_sequence"):
        CityscapesDataset(root, "train", ["semseg"], frames=[1],
                          sequence_folder="leftImg8bit_sequence_missing")
