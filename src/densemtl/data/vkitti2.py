"""Virtual KITTI 2 as distributed (the rgb / classSegmentation / depth / textgt archives).

Either the archives extracted side by side under ``<root>`` (``vkitti_2.0.3_rgb/``, ...; or plain
``rgb/``, ``classSegmentation/``, ``depth/``, ``textgt/``) or one merged tree; in all cases::

    Scene<NN>/<variant>/frames/rgb/Camera_<c>/rgb_<frame>.jpg
    Scene<NN>/<variant>/frames/classSegmentation/Camera_<c>/classgt_<frame>.png   RGB-coded classes
    Scene<NN>/<variant>/frames/depth/Camera_<c>/depth_<frame>.png                 uint16, cm
    Scene<NN>/<variant>/intrinsic.txt          frame cameraID K[0,0] K[1,1] K[0,2] K[1,2] (textgt)

``scenes`` (default: all found), ``variants`` (default ``15-deg-left``, as the official code) and
``cameras`` (default ``[0]``) select frames. Classes: each label colour is matched exactly against
the VKITTI2 colour table (14 classes, or the 8 shared with Cityscapes' 8-class set); "Undefined"
(0,0,0) -> 255; any other colour is an unknown id (``unknown_labels``). Depth: cm * 0.01; the sky
is stored as 65535 (655.35 m) and kept unless ``max_depth`` (metres) marks such values invalid.
K comes from ``intrinsic.txt`` when found (per frame and camera), else (725.0087, 725.0087, 620.5,
187.0) at 1242x375, scaled to the stored image. Normals are derived from depth. Split: one seeded
permutation of the sorted frame ids (or ``split_file``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from ..io import DataError, read_png, require_file
from .base import DenseDataset, LabelMap, Reader, Record
from .geometry import make_intrinsics
from .splits import random_split, split_from_file

# (name, colour) in raw-id order; raw id 14 = Undefined
VKITTI2_COLOURS = (
    ("terrain", (210, 0, 200)),
    ("sky", (90, 200, 255)),
    ("tree", (0, 199, 0)),
    ("vegetation", (90, 240, 0)),
    ("building", (140, 140, 140)),
    ("road", (100, 60, 100)),
    ("guardrail", (250, 100, 255)),
    ("trafficsign", (255, 255, 0)),
    ("trafficlight", (200, 200, 0)),
    ("pole", (255, 130, 0)),
    ("misc", (80, 80, 80)),
    ("truck", (160, 60, 60)),
    ("car", (255, 127, 80)),
    ("van", (0, 139, 139)),
    ("undefined", (0, 0, 0)),
)
CLASS_SETS: dict[int, tuple[tuple[str, ...], dict[int, int]]] = {
    14: (tuple(n for n, _ in VKITTI2_COLOURS[:14]), {i: i for i in range(14)}),
    # the 8 classes shared with Cityscapes' 8-class set (same train ids)
    8: (
        (
            "road",
            "building",
            "pole",
            "traffic light",
            "traffic sign",
            "vegetation",
            "sky",
            "vehicle",
        ),
        {5: 0, 4: 1, 9: 2, 8: 3, 7: 4, 2: 5, 3: 5, 1: 6, 11: 7, 12: 7, 13: 7},
    ),
}
NATIVE_SIZE = (375, 1242)
VKITTI2_K = (725.0087, 725.0087, 620.5, 187.0)
_MODALITIES = ("rgb", "classSegmentation", "depth")


def _codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class VKITTI2Dataset(DenseDataset):
    """Virtual KITTI 2: 14 (or 8) classes, depth in cm, derived normals."""

    name = "vkitti2"
    splits = ("train", "val", "all")

    def __init__(
        self,
        root: str | Path,
        *args: Any,
        num_classes: int = 14,
        scenes: Sequence[str] | None = None,
        variants: Sequence[str] = ("15-deg-left",),
        cameras: Sequence[int] = (0,),
        seed: int = 0,
        val_fraction: float = 0.2,
        split_file: str | None = None,
        max_depth: float | None = None,
        **kwargs: Any,
    ):
        if num_classes not in CLASS_SETS:
            raise ValueError(f"VKITTI2 class sets: {sorted(CLASS_SETS)}; got {num_classes}")
        names, mapping = CLASS_SETS[num_classes]
        self.class_names = names
        if num_classes == 14:
            self.palette = np.array([c for _, c in VKITTI2_COLOURS[:14]], dtype=np.uint8)
        else:
            from .cityscapes import class_set

            self.palette = class_set(8)[1]
        self.label_map = LabelMap(mapping, range(len(VKITTI2_COLOURS)), "VKITTI2 colour")
        known = np.array([_codes(np.array(c)) for _, c in VKITTI2_COLOURS])
        self._order = np.argsort(known)
        self._sorted_codes = known[self._order]
        self.scenes = None if scenes is None else list(scenes)
        self.variants, self.cameras = list(variants), [int(c) for c in cameras]
        self.seed, self.val_fraction, self.split_file = seed, val_fraction, split_file
        self.max_depth = max_depth
        self._intrinsics: dict[Path, dict[tuple[int, int], tuple[float, ...]]] = {}
        super().__init__(root, *args, **kwargs)

    # --- layout --------------------------------------------------------------------------------
    def _base(self, modality: str) -> Path | None:
        """The folder holding ``Scene*/`` for one archive (merged tree: the root itself)."""
        names = [f"vkitti_2.0.3_{modality}", modality]
        candidates = [
            self.root,
            *(self.root / n for n in names),
            *sorted(self.root.glob(f"vkitti_2*_{modality}")),
        ]
        pattern = (
            "Scene*/*/intrinsic.txt" if modality == "textgt" else f"Scene*/*/frames/{modality}"
        )
        return next((b for b in candidates if b.is_dir() and any(b.glob(pattern))), None)

    def list_records(self, split: str) -> list[Record]:
        bases = {m: self._base(m) for m in _MODALITIES}
        if bases["rgb"] is None:
            raise FileNotFoundError(
                2,
                f"no Scene*/<variant>/frames/rgb folders under {self.root} "
                "(nor under vkitti_2.0.3_rgb/ or rgb/)",
                str(self.root),
            )
        self._text_base = self._base("textgt")
        found = sorted(p.name for p in bases["rgb"].glob("Scene*") if p.is_dir())
        scenes = found if self.scenes is None else self.scenes
        absent = sorted(set(scenes) - set(found))
        if absent:
            raise FileNotFoundError(
                2, f"scenes {absent} not found in {bases['rgb']}", str(bases["rgb"] / absent[0])
            )
        by_id: dict[str, Record] = {}
        for scene in scenes:
            for variant in self.variants:
                for cam in self.cameras:
                    rel = Path(scene, variant, "frames")
                    folder = bases["rgb"] / rel / "rgb" / f"Camera_{cam}"
                    if not folder.is_dir():
                        raise FileNotFoundError(2, f"missing folder: {folder}", str(folder))
                    for img in sorted(folder.glob("rgb_*.jpg")):
                        frame = img.stem[len("rgb_") :]
                        files = {"image": img}
                        for key, mod, prefix in (
                            ("semseg", "classSegmentation", "classgt"),
                            ("depth", "depth", "depth"),
                        ):
                            base = bases[mod] or bases["rgb"]
                            files[key] = (
                                base / rel / mod / f"Camera_{cam}" / f"{prefix}_{frame}.png"
                            )
                        rid = f"{scene}/{variant}/Camera_{cam}/{frame}"
                        by_id[rid] = Record(rid, files)
        if not by_id:
            raise FileNotFoundError(
                2, f"no rgb_*.jpg frames selected under {bases['rgb']}", str(bases["rgb"])
            )
        if self.split_file:
            ids = split_from_file(self.split_file, list(by_id), split)
        else:
            ids = random_split(list(by_id), split, self.val_fraction, self.seed)
        return [by_id[i] for i in ids]

    # --- decoding ------------------------------------------------------------------------------
    def _intrinsics_table(self, path: Path) -> dict[tuple[int, int], tuple[float, ...]]:
        if path not in self._intrinsics:
            table = {}
            lines = require_file(path).read_text(encoding="utf-8").splitlines()
            try:
                for line in lines[1:]:
                    if line.strip():
                        f, c, fx, fy, cx, cy = line.split()
                        table[(int(f), int(c))] = (float(fx), float(fy), float(cx), float(cy))
            except ValueError as e:
                raise DataError(f"{path}: expected 'frame cameraID fx fy cx cy' rows ({e})") from e
            self._intrinsics[path] = table
        return self._intrinsics[path]

    def intrinsics(self, record: Record, image_hw: tuple[int, int]) -> Tensor:
        scene, variant, camera, frame = record.id.split("/")
        values = VKITTI2_K
        if self._text_base is not None:
            path = self._text_base / scene / variant / "intrinsic.txt"
            if path.is_file():
                key = (int(frame), int(camera.split("_")[1]))
                table = self._intrinsics_table(path)
                if key not in table:
                    raise DataError(f"{path}: no intrinsics for frame {key[0]}, camera {key[1]}")
                values = table[key]
        return self.scaled_intrinsics(make_intrinsics(*values), NATIVE_SIZE, image_hw)

    def decode_colours(self, rgb: np.ndarray, path: Path | str) -> np.ndarray:
        """RGB label image -> train ids (exact colour match)."""
        if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
            raise DataError(
                f"{path}: class labels must be an 8-bit RGB PNG, got {rgb.dtype} {rgb.shape}"
            )
        codes = _codes(rgb[..., :3])
        pos = np.searchsorted(self._sorted_codes, codes).clip(0, len(self._sorted_codes) - 1)
        match = self._sorted_codes[pos] == codes
        if not match.all() and self.unknown_labels == "error":
            bad = [
                ((c >> 16) & 255, (c >> 8) & 255, c & 255)
                for c in np.unique(codes[~match])[:5].tolist()
            ]
            raise DataError(
                f"{path}: colours {bad} are not in the VKITTI2 colour table "
                "(pass unknown_labels='ignore' to map them to 255)"
            )
        raw = np.where(match, self._order[pos], len(VKITTI2_COLOURS))
        return self.label_map(raw, path, self.unknown_labels)

    def _read_semseg(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        path = record.files["semseg"]
        return self.decode_colours(read_png(path), path)

    def _read_depth(self, record: Record, image_hw: tuple[int, int]) -> np.ndarray:
        path = record.files["depth"]
        raw = read_png(path)
        if raw.ndim != 2 or raw.dtype != np.uint16:
            raise DataError(
                f"{path}: depth must be a 16-bit single-channel PNG, got {raw.dtype} {raw.shape}")
        depth = raw.astype(np.float32) * 0.01
        if self.max_depth is not None:
            depth[depth >= self.max_depth] = 0.0
        return depth

    readers: ClassVar[Mapping[str, Reader]] = {"semseg": _read_semseg, "depth": _read_depth}
