"""Plain image folders (prediction input)."""

from __future__ import annotations

import math

import pytest

from densemtl.data.folder import ImageFolderDataset
from densemtl.data.transforms import Resize
from densemtl.io import DataError

from test_data_helpers import rgb_image


def test_folder_lists_images_and_intrinsics(tmp_path):
    rgb_image(tmp_path / "b.png", 10, 20)
    rgb_image(tmp_path / "sub" / "a.jpg", 12, 16, fmt="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.ids == ["b.png", "sub/a.jpg"] and ds.tasks == ()
    assert "K" not in ds[0] and ds[1]["image"].shape == (3, 12, 16)
    assert ImageFolderDataset(tmp_path, recursive=False).ids == ["b.png"]
    fov = ImageFolderDataset(tmp_path, fov_deg=90.0)[0]["K"]
    assert fov[0, 0].item() == pytest.approx(10.0) and fov[0, 2].item() == pytest.approx(9.5)
    k = ImageFolderDataset(
        tmp_path,
        intrinsics=[100, 100, 49.5, 24.5],
        intrinsics_size=[50, 100],
        transform=Resize(5, 10),
    )[0]["K"]
    assert k[0, 0].item() == pytest.approx(10.0) and k[0, 2].item() == pytest.approx(4.5)
    assert math.isclose(k[1, 2].item(), 2.0, abs_tol=1e-5)
    with pytest.raises(ValueError, match="provides"):
        ImageFolderDataset(tmp_path, tasks=["semseg"])


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"bad\.png"):
        ImageFolderDataset(tmp_path)[0]
