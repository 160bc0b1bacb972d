"""A plain folder of images (no labels), for prediction.

Every file under ``root`` (recursively unless ``recursive=False``) whose extension is in
``extensions`` is a sample, in sorted order; its id is the path relative to ``root``. Other files
are not samples; unreadable images raise an error naming them when loaded. Intrinsics are
unknown unless given: ``intrinsics=[fx, fy, cx, cy]`` for images of ``intrinsics_size=[H, W]``
(scaled to each image), or ``fov_deg`` (horizontal field of view, principal point at the centre).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor

from .base import DenseDataset, Record
from .geometry import make_intrinsics
from .sample import Sample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageFolderDataset(DenseDataset):
    """Images only; ``split`` is ignored apart from naming (``all``)."""

    name = "folder"
    splits = ("all", "train", "val", "test", "predict")

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        tasks: Sequence[str] = (),
        transform: Callable[[Sample], Sample] | None = None,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        recursive: bool = True,
        intrinsics: Sequence[float] | None = None,
        intrinsics_size: Sequence[int] | None = None,
        fov_deg: float | None = None,
        **policies,
    ):
        self.extensions = tuple(e.lower() for e in extensions)
        self.recursive = recursive
        if intrinsics is not None and intrinsics_size is None:
            raise ValueError("intrinsics needs intrinsics_size=[H, W] of the images it is for")
        self.K_values = None if intrinsics is None else tuple(float(x) for x in intrinsics)
        self.K_size = None if intrinsics_size is None else tuple(int(x) for x in intrinsics_size)
        self.fov_deg = fov_deg
        super().__init__(root, split, tasks, transform, **policies)

    def list_records(self, split: str) -> list[Record]:
        pattern = "**/*" if self.recursive else "*"
        files = sorted(
            p
            for p in self.root.glob(pattern)
            if p.is_file() and p.suffix.lower() in self.extensions
        )
        if not files:
            raise FileNotFoundError(
                2, f"no images ({', '.join(self.extensions)}) in {self.root}", str(self.root)
            )
        return [Record(p.relative_to(self.root).as_posix(), {"image": p}) for p in files]

    def intrinsics(self, record: Record, image_hw: tuple[int, int]) -> Tensor | None:
        if self.K_values is not None and self.K_size is not None:
            return self.scaled_intrinsics(make_intrinsics(*self.K_values), self.K_size, image_hw)
        if self.fov_deg is not None:
            h, w = image_hw
            f = (w / 2) / math.tan(math.radians(self.fov_deg) / 2)
            return make_intrinsics(f, f, (w - 1) / 2, (h - 1) / 2)
        return None
