"""SYNTHIA RAND-CITYSCAPES as distributed.

::

    <root>/RGB/<id>.png             RGB, 1280x760
    <root>/GT/LABELS/<id>.png       16-bit PNG, class id in channel 0 (instance ids in the others)
    <root>/Depth/Depth/<id>.png     16-bit PNG, depth in centimetres (channel 0 if several)

Labels: Synthia ids 0..22 mapped to the 16 Cityscapes-compatible classes (same train ids and order
as Cityscapes' 16-class set, so Synthia -> Cityscapes adaptation works); other defined ids -> 255;
values above 22 are unknown ids (``unknown_labels``). Depth: raw * ``depth_scale`` (0.01: cm -> m);
raw 0 -> invalid; ``max_depth`` (metres) optionally marks far values (sky) invalid. Normals are
derived from depth with K = (fx = fy = 532.740352, cx = 640, cy = 380) at 1280x760, scaled to the
stored image size. There is no official split: ``train`` / ``val`` come from one seeded permutation
of the sorted ids (:func:`densemtl.data.splits.random_split`), or from ``split_file``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from ..io import DataError, read_png
from .base import DenseDataset, LabelMap, Reader, Record
from .cityscapes import class_set
from .geometry import make_intrinsics
from .splits import random_split, split_from_file

SYNTHIA_IDS = (
    "void",
    "sky",
    "building",
    "road",
    "sidewalk",
    "fence",
    "vegetation",
    "pole",
    "car",
    "traffic sign",
    "pedestrian",
    "bicycle",
    "motorcycle",
    "parking-slot",
    "road-work",
    "traffic light",
    "terrain",
    "rider",
    "truck",
    "bus",
    "train",
    "wall",
    "lanemarking",
)
# Synthia id -> Cityscapes-16 train id
SYNTHIA_TO_CS16 = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    1: 9,
    10: 10,
    17: 11,
    8: 12,
    19: 13,
    12: 14,
    11: 15,
}
NATIVE_SIZE = (760, 1280)
SYNTHIA_K = (532.740352, 532.740352, 640.0, 380.0)


class SynthiaDataset(DenseDataset):
    """SYNTHIA RAND-CITYSCAPES: 16 classes, depth (cm PNG), derived normals."""

    name = "synthia"
    splits = ("train", "val", "all")

    def __init__(
        self,
        root: str | Path,
        *args: Any,
        seed: int = 0,
        val_fraction: float = 0.2,
        split_file: str | None = None,
        depth_scale: float = 0.01,
        max_depth: float | None = None,
        **kwargs: Any,
    ):
        self.class_names, self.palette, _ = class_set(16)
        self.label_map = LabelMap(SYNTHIA_TO_CS16, range(len(SYNTHIA_IDS)), "Synthia (0..22)")
        self.seed, self.val_fraction, self.split_file = seed, val_fraction, split_file
        self.depth_scale, self.max_depth = float(depth_scale), max_depth
        super().__init__(root, *args, **kwargs)

    def list_records(self, split: str) -> list[Record]:
        rgb = self.root / "RGB"
        if not rgb.is_dir():
            raise FileNotFoundError(2, f"missing folder: {rgb}", str(rgb))
        all_ids = sorted(p.stem for p in rgb.glob("*.png"))
        if not all_ids:
            raise FileNotFoundError(2, f"no PNG images in {rgb}", str(rgb))
        if self.split_file:
            ids = split_from_file(self.split_file, all_ids, split)
        else:
            ids = random_split(all_ids, split, self.val_fraction, self.seed)
        return [
            Record(
                i,
                {
                    "image": rgb / f"{i}.png",
                    "semseg": self.root / "GT" / "LABELS" / f"{i}.png",
                    "depth": self.root / "Depth" / "Depth" / f"{i}.png",
                },
            )
            for i in ids
        ]

    def intrinsics(self, record: Record, image_hw: tuple[int, int]) -> Tensor:
        return self.scaled_intrinsics(make_intrinsics(*SYNTHIA_K), NATIVE_SIZE, image_hw)

    @staticmethod
    def _read_grey(path: Path) -> np.ndarray:
        raw = read_png(path)
        return raw[..., 0] if raw.ndim == 3 else raw

    def _read_semseg(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        path = record.files["semseg"]
        return self.label_map(self._read_grey(path), path, self.unknown_labels)

    def _read_depth(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        path = record.files["depth"]
        raw = self._read_grey(path)
        if raw.dtype != np.uint16:
            raise DataError(f"{path}: Synthia depth must be a 16-bit PNG, got {raw.dtype}")
        depth = raw.astype(np.float32) * self.depth_scale
        if self.max_depth is not None:
            depth[depth >= self.max_depth] = 0.0
        return depth

    readers: ClassVar[Mapping[str, Reader]] = {"semseg": _read_semseg, "depth": _read_depth}
