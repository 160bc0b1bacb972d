"""Cityscapes as distributed (``leftImg8bit``, ``gtFine``, ``disparity``, ``camera``).

::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png   (see image_folder)
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     uint8 raw ids 0..33
    <root>/disparity/<split>/<city>/<city>_<seq>_<frame>_disparity.png       uint16
    <root>/camera/<split>/<city>/<city>_<seq>_<frame>_camera.json

Official splits ``train`` (2975) / ``val`` (500) / ``test`` (1525, dummy labels). The sample list is
the sorted set of ``*_leftImg8bit.png`` files of ``<image_folder>/<split>``.

Depth: a disparity pixel p > 1 has disparity d = (p - 1) / 256 (full-resolution pixels) and depth
``baseline * fx / d`` metres, with ``baseline`` (``extrinsic``) and ``fx`` (``intrinsic``) from the
image's camera JSON; p <= 1 is invalid (depth 0). K comes from the same JSON (``fx, fy, u0, v0``,
given for 2048x1024) scaled to the image as stored; without a camera JSON the dataset's mean
intrinsics are used (only when depth is not requested: for depth a missing JSON is a missing file).
Normals are derived from depth. Labels (19, 16, 8 or 7 classes) and disparity of a pre-resized copy
of the images (``leftImg8bit_small`` of the official code) are nearest-resized to the image
(``on_size_mismatch="resize"`` is this dataset's default).

Video frames (``frames=[-1, 1]``, for self-supervised depth) come from the sequence package::

    <root>/leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame +- k>_leftImg8bit.png

(``sequence_folder``; ``leftImg8bit_sequence_small`` is tried too), the six-digit frame number
being the labelled frame's plus the offset. Frames of another size than the image (same aspect
ratio) are resized to it. A missing neighbour is an error naming the file; ``on_missing=
"drop_sample"`` trains without the samples that lack one (with a warning that counts them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from ..io import DataError, read_json, read_png
from .base import DenseDataset, LabelMap, Reader, Record, frame_key
from .geometry import make_intrinsics

NATIVE_SIZE = (1024, 2048)
MEAN_K = (2262.52, 2265.3017905988554, 1096.98, 513.137)

# (name, colour, raw labelIds) per train id, for each class set
_C19 = [
    ("road", (128, 64, 128), [7]),
    ("sidewalk", (244, 35, 232), [8]),
    ("building", (70, 70, 70), [11]),
    ("wall", (102, 102, 156), [12]),
    ("fence", (190, 153, 153), [13]),
    ("pole", (153, 153, 153), [17]),
    ("traffic light", (250, 170, 30), [19]),
    ("traffic sign", (220, 220, 0), [20]),
    ("vegetation", (107, 142, 35), [21]),
    ("terrain", (152, 251, 152), [22]),
    ("sky", (70, 130, 180), [23]),
    ("person", (220, 20, 60), [24]),
    ("rider", (255, 0, 0), [25]),
    ("car", (0, 0, 142), [26]),
    ("truck", (0, 0, 70), [27]),
    ("bus", (0, 60, 100), [28]),
    ("train", (0, 80, 100), [31]),
    ("motorcycle", (0, 0, 230), [32]),
    ("bicycle", (119, 11, 32), [33]),
]
CLASS_SETS: dict[int, list[tuple[str, tuple[int, int, int], list[int]]]] = {
    19: _C19,
    # the 16 classes shared with Synthia: 19 without terrain, truck, train
    16: [c for c in _C19 if c[0] not in ("terrain", "truck", "train")],
    # the 8 classes shared with Virtual KITTI 2 (car and bus form "vehicle")
    8: [
        ("road", (128, 64, 128), [7]),
        ("building", (70, 70, 70), [11]),
        ("pole", (153, 153, 153), [17]),
        ("traffic light", (250, 170, 30), [19]),
        ("traffic sign", (220, 220, 0), [20]),
        ("vegetation", (107, 142, 35), [21]),
        ("sky", (70, 130, 180), [23]),
        ("vehicle", (0, 0, 142), [26, 28]),
    ],
    # the 7 Cityscapes categories over the 19 evaluated classes
    7: [
        ("flat", (128, 64, 128), [7, 8]),
        ("construction", (70, 70, 70), [11, 12, 13]),
        ("object", (153, 153, 153), [17, 19, 20]),
        ("nature", (107, 142, 35), [21, 22]),
        ("sky", (70, 130, 180), [23]),
        ("human", (220, 20, 60), [24, 25]),
        ("vehicle", (0, 0, 142), [26, 27, 28, 31, 32, 33]),
    ],
}
RAW_IDS = range(34)  # labelIds 0 (unlabeled) .. 33 (bicycle)


def class_set(num_classes: int) -> tuple[tuple[str, ...], np.ndarray, dict[int, int]]:
    """Names, palette and raw-id -> train-id mapping of a Cityscapes class set."""
    if num_classes not in CLASS_SETS:
        raise ValueError(f"Cityscapes class sets: {sorted(CLASS_SETS)}; got {num_classes}")
    spec = CLASS_SETS[num_classes]
    mapping = {raw: train for train, (_, _, raws) in enumerate(spec) for raw in raws}
    return (
        tuple(n for n, _, _ in spec),
        np.array([c for _, c, _ in spec], dtype=np.uint8),
        mapping,
    )


class CityscapesDataset(DenseDataset):
    """Cityscapes: semseg (19/16/8/7 classes), depth from disparity, derived normals."""

    name = "cityscapes"
    splits = ("train", "val", "test")
    has_sequences = True

    def __init__(
        self,
        root: str | Path,
        *args: Any,
        num_classes: int = 19,
        image_folder: str | None = None,
        sequence_folder: str | None = None,
        on_size_mismatch: str = "resize",
        **kwargs: Any,
    ):
        self.class_names, self.palette, mapping = class_set(num_classes)
        self.label_map = LabelMap(mapping, RAW_IDS, "Cityscapes labelIds (0..33)")
        self.image_folder = image_folder
        self.sequence_folder = sequence_folder
        super().__init__(root, *args, on_size_mismatch=on_size_mismatch, **kwargs)

    def _image_dir(self) -> Path:
        names = [self.image_folder] if self.image_folder else ["leftImg8bit", "leftImg8bit_small"]
        for name in names:
            if (self.root / name / self.split).is_dir():
                return self.root / name / self.split
        raise FileNotFoundError(
            2,
            f"no image folder {' or '.join(names)}/{self.split} under {self.root}",
            str(self.root / names[0] / self.split),
        )

    def _sequence_dir(self) -> Path:
        names = ([self.sequence_folder] if self.sequence_folder
                 else ["leftImg8bit_sequence", "leftImg8bit_sequence_small"])
        for name in names:
            if (self.root / name / self.split).is_dir():
                return self.root / name / self.split
        raise FileNotFoundError(
            2, f"frames {list(self.frames)} need the video frames: no folder "
            f"{' or '.join(names)}/{self.split} under {self.root}",
            str(self.root / names[0] / self.split))

    def _frame_files(self, city: str, stem: str) -> dict[str, Path]:
        if not self.frames:
            return {}
        prefix, number = stem.rsplit("_", 1)
        if not number.isdigit():
            raise DataError(f"{stem}: cannot read a frame number from this image name")
        folder = self._sequence_dir() / city
        return {frame_key(k): folder / f"{prefix}_{int(number) + k:0{len(number)}d}_leftImg8bit.png"
                for k in self.frames}

    def list_records(self, split: str) -> list[Record]:
        records = []
        for img in sorted(self._image_dir().glob("*/*_leftImg8bit.png")):
            city, stem = img.parent.name, img.name[: -len("_leftImg8bit.png")]
            records.append(
                Record(
                    f"{city}/{stem}",
                    {
                        "image": img,
                        "semseg": self.root
                        / "gtFine"
                        / split
                        / city
                        / f"{stem}_gtFine_labelIds.png",
                        "depth": self.root / "disparity" / split / city / f"{stem}_disparity.png",
                        "camera": self.root / "camera" / split / city / f"{stem}_camera.json",
                        **self._frame_files(city, stem),
                    },
                )
            )
        if not records:
            raise FileNotFoundError(
                2, f"no *_leftImg8bit.png files in {self._image_dir()}/*/", str(self._image_dir())
            )
        return records

    def task_files(self, task: str) -> tuple[str, ...]:
        if task == "depth":  # disparity to metres needs the camera's baseline and focal length
            return ("depth", "camera")
        return super().task_files(task)

    def _camera(self, record: Record) -> dict[str, float]:
        path = record.files["camera"]
        cam = read_json(path)
        try:
            values = {
                "baseline": float(cam["extrinsic"]["baseline"]),
                "fx": float(cam["intrinsic"]["fx"]),
                "fy": float(cam["intrinsic"]["fy"]),
                "u0": float(cam["intrinsic"]["u0"]),
                "v0": float(cam["intrinsic"]["v0"]),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: not a Cityscapes camera file ({e!r})") from e
        if not (values["baseline"] > 0 and values["fx"] > 0 and values["fy"] > 0):
            raise DataError(f"{path}: baseline and focal lengths must be > 0, got {values}")
        return values

    def intrinsics(self, record: Record, image_hw: tuple[int, int]) -> Tensor:
        if record.files["camera"].is_file():
            c = self._camera(record)
            K = make_intrinsics(c["fx"], c["fy"], c["u0"], c["v0"])
        else:
            K = make_intrinsics(*MEAN_K)
        return self.scaled_intrinsics(K, NATIVE_SIZE, image_hw)

    def _read_semseg(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        return self.label_map.read(record.files["semseg"], self.unknown_labels)

    def _read_depth(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        cam = self._camera(record)
        path = record.files["depth"]
        return disparity_to_depth(read_png(path), cam["baseline"], cam["fx"], path)

    readers: ClassVar[Mapping[str, Reader]] = {"semseg": _read_semseg, "depth": _read_depth}


def disparity_to_depth(
    raw: np.ndarray, baseline: float, fx: float, path: Path | str = ""
) -> np.ndarray:
    """Cityscapes disparity PNG values -> depth in metres (0 where p <= 1)."""
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise DataError(
            f"{path}: disparity must be a 16-bit single-channel PNG, got {raw.dtype} {raw.shape}"
        )
    p = raw.astype(np.float64)
    valid = p > 1
    disparity = (p - 1.0) / 256.0
    depth = np.where(valid, baseline * fx / np.where(valid, disparity, 1.0), 0.0)
    return depth.astype(np.float32)
