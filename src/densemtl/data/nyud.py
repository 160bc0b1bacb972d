"""NYUDv2 in the ATRC / MTI-Net ``NYUD_MT`` layout (both variants).

::

    <root>/gt_sets/{train,val}.txt    one id per line (official split: 795 / 654)
    <root>/images/<id>.png | .jpg     RGB
    <root>/segmentation/<id>.png      uint8: 0 = void, 1..40 = classes (train id = value - 1)
    <root>/depth/<id>.npy             float, metres ([H,W] or [H,W,1])
    <root>/normals/<id>.png | .npy    PNG: n = 2 v / 255 - 1; NPY: float [H,W,3] in [-1, 1]
    <root>/edge/<id>.png | .npy       PNG: 0 / 255; NPY: 0 / 1

``<root>`` may also be the folder that contains ``NYUD_MT``. ``variant="auto"`` takes, per file,
the first extension that exists (PNG first); ``"png"`` / ``"npy"`` demand one variant (NPY = the
ATRC archive: JPEG images, NPY normals and edges). Decoding: void -> 255; a segmentation value
above the number of classes is an unknown id (see ``unknown_labels``); NaN/inf/negative depth -> 0;
normals shorter than 0.5 before normalisation (e.g. PNG grey 128) -> invalid; an edge is a value of
at least half the code range (128 in PNG, 0.5 in NPY).

The normals are taken as stored; ``normals_signs`` multiplies their (x, y, z) components if a
copy of the data uses other axis directions than densemtl's (x right, y down, z forward, towards
the camera). Intrinsics: the NYUv2 Kinect colour camera (640x480: fx 518.86, fy 519.47,
cx 325.58, cy 253.74) shifted by the usual crop offset (top 45, left 40) for the 425x560 images
-- an approximation, since the archive does not store it; ``intrinsics=[fx, fy, cx, cy]``
(for the stored image size) overrides it.

The built-in synthetic benchmark is written in this layout and read by a subclass
(``densemtl.data.synthetic.SyntheticDataset``) that takes class names, palette and exact
intrinsics from its ``meta.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from ..io import DataError, read_npy, read_png
from ..io import palette as bit_palette
from .base import DenseDataset, LabelMap, Reader, Record, clean_depth, unit_normals
from .geometry import make_intrinsics
from .splits import read_id_list

NYUD_CLASSES = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floormat",
    "clothes",
    "ceiling",
    "books",
    "fridge",
    "tv",
    "paper",
    "towel",
    "showercurtain",
    "box",
    "whiteboard",
    "person",
    "nightstand",
    "toilet",
    "sink",
    "lamp",
    "bath",
    "bag",
    "otherstru",
    "otherfurntr",
    "otherprop",
)
NYUD_SIZE = (425, 560)
NYUD_K = (518.857901, 519.469611, 325.582449 - 40, 253.736166 - 45)

_EXTENSIONS = {
    # file key: (folder, {variant: extensions tried in order})
    "image": ("images", {"auto": (".png", ".jpg"), "png": (".png",), "npy": (".jpg",)}),
    "semseg": ("segmentation", {"auto": (".png",), "png": (".png",), "npy": (".png",)}),
    "depth": ("depth", {"auto": (".npy",), "png": (".npy",), "npy": (".npy",)}),
    "normals": ("normals", {"auto": (".png", ".npy"), "png": (".png",), "npy": (".npy",)}),
    "edges": ("edge", {"auto": (".png", ".npy"), "png": (".png",), "npy": (".npy",)}),
}


class NYUDv2Dataset(DenseDataset):
    """NYUDv2 (ATRC layout): 40 classes, depth, normals and edges from files."""

    name = "nyudv2"
    splits = ("train", "val", "test")
    edge_max_dist = 0.011  # the NYUDv2 multi-task works' edge benchmark (the built-in one too)
    class_names = NYUD_CLASSES
    palette = bit_palette(40)

    def __init__(
        self,
        root: str | Path,
        *args: Any,
        variant: str = "auto",
        intrinsics: Sequence[float] | None = None,
        normals_signs: Sequence[float] = (1.0, 1.0, 1.0),
        **kwargs: Any,
    ):
        if variant not in ("auto", "png", "npy"):
            raise ValueError(f"variant must be 'auto', 'png' or 'npy', got {variant!r}")
        root = Path(root).expanduser()
        if (root / "NYUD_MT" / "gt_sets").is_dir():
            root = root / "NYUD_MT"
        self.variant = variant
        self.normals_signs = np.asarray(normals_signs, dtype=np.float32).reshape(3)
        self._K_override = None if intrinsics is None else tuple(float(x) for x in intrinsics)
        n = len(self.class_names)
        self.label_map = LabelMap(
            {v: v - 1 for v in range(1, n + 1)}, range(n + 1), f"{self.name} segmentation (0..{n})"
        )
        super().__init__(root, *args, **kwargs)

    def list_records(self, split: str) -> list[Record]:
        ids = read_id_list(self.root / "gt_sets" / f"{split}.txt")
        return [Record(i, {k: self._path(k, i) for k in _EXTENSIONS}) for i in ids]

    def _path(self, key: str, sample_id: str) -> Path:
        folder, exts = _EXTENSIONS[key]
        candidates = [self.root / folder / f"{sample_id}{e}" for e in exts[self.variant]]
        return next((p for p in candidates if p.is_file()), candidates[0])

    def intrinsics(self, record: Record, image_hw: tuple[int, int]) -> Tensor:
        if self._K_override is not None:
            return make_intrinsics(*self._K_override)
        values, native = self.camera()
        return self.scaled_intrinsics(make_intrinsics(*values), native, image_hw)

    def camera(self) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
        """(fx, fy, cx, cy) and the image size they are given for."""
        return NYUD_K, NYUD_SIZE

    def _read_semseg(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        return self.label_map.read(record.files["semseg"], self.unknown_labels)

    def _read_depth(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        path = record.files["depth"]
        return clean_depth(_squeeze_2d(read_npy(path), path))

    def _read_normals(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        path = record.files["normals"]
        if path.suffix == ".png":
            raw = read_png(path)
            if raw.ndim != 3 or raw.shape[2] != 3 or raw.dtype != np.uint8:
                raise DataError(
                    f"{path}: normals PNG must be 8-bit RGB, got {raw.shape} {raw.dtype}")
            vec = raw.astype(np.float32) * (2.0 / 255.0) - 1.0
        else:
            vec = read_npy(path).astype(np.float32)
            if vec.ndim != 3 or vec.shape[2] != 3:
                raise DataError(f"{path}: normals array must be [H,W,3], got {vec.shape}")
        return unit_normals(vec) * self.normals_signs

    def _read_edges(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        path = record.files["edges"]
        if path.suffix == ".png":
            raw = read_png(path)
            if raw.ndim == 3:
                raw = raw[..., 0]
            return raw >= (128 if raw.dtype == np.uint8 else 32768)
        arr = _squeeze_2d(read_npy(path), path).astype(np.float32)
        return np.nan_to_num(arr, nan=0.0) >= 0.5

    readers: ClassVar[Mapping[str, Reader]] = {
        "semseg": _read_semseg, "depth": _read_depth, "normals": _read_normals,
        "edges": _read_edges}


def _squeeze_2d(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a [H,W] array, got shape {arr.shape}")
    return arr
