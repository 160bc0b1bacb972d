"""Images for prediction: any input a user has as a float batch, and the size to run it at.

:func:`as_image_batch` takes a file path, a Pillow image, a numpy array (``[H,W]`` or
``[H,W,C]``: uint8, uint16, other integers by their type's range, floats) or a tensor
(``[3,H,W]`` or ``[B,3,H,W]``; uint8 and other integer tensors by their type's range, float
tensors must already be in [0, 1]) and returns float32 ``[B,3,H,W]`` in [0, 1].
:func:`working_size` picks the resolution the network sees (the training resolution by
default, aspect ratio kept) and :func:`upsample_decode` brings each task's raw output back to
the input size in strips, so that a 12-megapixel photo never holds a full-size score volume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .io import array_to_float, image_to_float, read_image

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray | Tensor | a list of them


def as_image_batch(image: ImageLike) -> tuple[Tensor, bool]:
    """float32 [B,3,H,W] in [0, 1], and whether the input was a single image (no batch axis)."""
    if isinstance(image, (list, tuple)):
        parts = [as_image_batch(x)[0] for x in image]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"images of one batch must have the same size, got {sorted(sizes)}")
        return torch.cat(parts), False
    if isinstance(image, (str, os.PathLike)):
        return _from_hwc(read_image(image)), True
    if isinstance(image, Image.Image):
        image.load()
        return _from_hwc(image_to_float(image)), True
    if isinstance(image, np.ndarray):
        return _from_hwc(array_to_float(image)), True
    if isinstance(image, Tensor):
        return _from_tensor(image)
    raise TypeError(f"cannot predict from a {type(image).__name__}: give a file path, a PIL "
                    "image, a numpy array or a tensor")


def _from_hwc(arr: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()


def _from_tensor(x: Tensor) -> tuple[Tensor, bool]:
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"an image tensor must be [3,H,W] or [B,3,H,W], got {tuple(x.shape)}")
    single = x.dim() == 3
    x = x[None] if single else x
    if x.dtype == torch.bool:
        return x.float(), single
    if not x.is_floating_point():
        top = torch.iinfo(x.dtype).max
        return x.float().clamp_(min=0).div_(top), single
    x = x.float()
    lo, hi = float(x.min()), float(x.max())  # one host read: not a training path
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"a float image tensor must hold values in [0, 1]; this one holds {lo:.4g} to "
            f"{hi:.4g}" + (" (8-bit values? divide by 255, or pass the uint8 tensor)"
                           if hi <= 255 and lo >= 0 else ""))
    return (x.clamp(0.0, 1.0) if lo < 0 or hi > 1 else x), single


def working_size(size: tuple[int, int], *, exact: tuple[int, int] | None = None,
                 max_side: int | None = None, area_of: Sequence[int] | None = None,
                 minimum: int = 1) -> tuple[int, int]:
    """The (H, W) to run the network at for an image of ``size``.

    ``exact`` wins; else ``max_side`` caps the longer side; else ``area_of`` (the training
    resolution) caps the number of pixels; the aspect ratio is kept and images are never
    enlarged, except up to ``minimum`` pixels on their shorter side (what the network needs).
    """
    h, w = size
    if exact is not None:
        return int(exact[0]), int(exact[1])
    scale = 1.0
    if max_side is not None:
        scale = min(1.0, max_side / max(h, w))
    elif area_of is not None:
        scale = min(1.0, math.sqrt(area_of[0] * area_of[1] / (h * w)))
    scale = max(scale, minimum / min(h, w))
    return max(minimum, round(h * scale)), max(minimum, round(w * scale))


def upsample_decode(task: Any, raw: Tensor, size: tuple[int, int],
                    max_elements: int = 1 << 24) -> Tensor:
    """``task.decode`` of ``raw`` [B,C,h,w] resized bilinearly (``align_corners=True``, as the
    metrics do) to ``size``, computed in strips of rows of at most ``max_elements`` values
    (decoding is per pixel), so the full-size raw volume never exists."""
    b, c, h, w = raw.shape
    H, W = size
    if (h, w) == (H, W):
        return task.decode(raw)
    rows = max(1, max_elements // max(1, b * c * W))
    xs = torch.linspace(-1.0, 1.0, W, device=raw.device) if W > 1 else raw.new_full((1,), -1.0)
    ys = torch.linspace(-1.0, 1.0, H, device=raw.device) if H > 1 else raw.new_full((1,), -1.0)
    parts = []
    for top in range(0, H, rows):
        y = ys[top:top + rows]
        grid = torch.stack(torch.meshgrid(y, xs, indexing="ij")[::-1], dim=-1)
        grid = grid[None].expand(b, -1, -1, -1)
        parts.append(task.decode(F.grid_sample(raw, grid, mode="bilinear",
                                               align_corners=True)))
    return torch.cat(parts, dim=-2)
