"""Joint transforms over the sample dict; every geometric one keeps ``K`` exact.

The image is resized bilinearly with antialiasing (``torchvision.transforms.v2.functional``);
every label is resized, padded and flipped the way its task declares (``densemtl.tasks``):

* ``semseg``, ``depth``, ``normals``: nearest, sampling the source pixel whose centre is nearest
  to the target pixel centre (depth is never averaged across a discontinuity or with an invalid 0);
  normals are renormalised afterwards (0-vectors stay 0);
* ``edges``: max over the source pixels each target pixel overlaps (adaptive max pooling), so thin
  edges survive downsampling.

Cropping outside the image pads with the "no label" values (image 0, semseg 255, depth 0,
normals 0, edges 0). A horizontal flip mirrors every map, negates the x component of the normals
and sets ``cx' = W - 1 - cx`` (see :mod:`densemtl.data.geometry`). The neighbouring ``frames`` of
a sequence sample get exactly what the image gets (same resize, crop window, flip and colour
jitter), and a flip mirrors their ``poses`` (``S T S`` with ``S = diag(-1, 1, 1, 1)``: the
mirrored scene seen by the mirrored cameras). A tensor under a key that is
neither ``image``, ``K`` nor a registered task's label is refused: there is no way to know how to
transform it. Randomness comes from torch's global generator, which the DataLoader seeds per
worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from densemtl.tasks import Task, task_for_label

from .geometry import crop_intrinsics, hflip_intrinsics, resize_intrinsics
from .sample import NON_LABEL_KEYS, Sample, SampleError, sample_size

Transform = Callable[[Sample], Sample]


def images(sample: Sample) -> list[str]:
    """The keys of ``sample`` holding images: ``image`` and, in a sequence, ``frames``."""
    return [k for k in ("image", "frames") if k in sample]


def labels(sample: Sample) -> Iterator[tuple[str, Task]]:
    """(key, task) for every label of ``sample``; a tensor under an unknown key is an error."""
    for key, value in sample.items():
        if key in NON_LABEL_KEYS or not isinstance(value, Tensor):
            continue
        task = task_for_label(key)
        if task is None:
            raise SampleError(
                f"{sample.get('id', 'sample')}: '{key}' is not the label of any registered task, "
                "so it cannot be resized, cropped or flipped with the image (register a task "
                f"with label_key '{key}' or remove the key)")
        yield key, task


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Images [..., 3, H, W] in [0, 1], bilinear with antialiasing, to ``size``."""
    return TF.resize(image, list(size), antialias=True).clamp_(0.0, 1.0)


def resize(sample: Sample, height: int, width: int) -> Sample:
    """Resize every map of ``sample`` to ``height x width`` and update ``K``."""
    h, w = sample_size(sample)
    if (h, w) == (height, width):
        return dict(sample)
    out = dict(sample)
    for key in images(sample):
        out[key] = resize_image(sample[key], (height, width))
    for key, task in labels(sample):
        out[key] = task.resize_label(sample[key], (height, width))
    if "K" in sample:
        out["K"] = resize_intrinsics(sample["K"], (h, w), (height, width))
    return out


def crop(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop a ``height x width`` window at (top, left); parts outside the image are padded."""
    h, w = sample_size(sample)
    out = dict(sample)
    src_r = slice(max(top, 0), min(top + height, h))
    src_c = slice(max(left, 0), min(left + width, w))
    dst_r = slice(src_r.start - top, src_r.stop - top)
    dst_c = slice(src_c.start - left, src_c.stop - left)
    inside = top >= 0 and left >= 0 and top + height <= h and left + width <= w
    fills = {**dict.fromkeys(images(sample), 0.0),
             **{key: task.fill_value for key, task in labels(sample)}}
    for key, fill in fills.items():
        x = sample[key]
        if inside:
            out[key] = x[..., src_r, src_c]
            continue
        new = torch.full((*x.shape[:-2], height, width), fill, dtype=x.dtype, device=x.device)
        if src_r.stop > src_r.start and src_c.stop > src_c.start:
            new[..., dst_r, dst_c] = x[..., src_r, src_c]
        out[key] = new
    if "K" in sample:
        out["K"] = crop_intrinsics(sample["K"], top, left)
    return out


def hflip(sample: Sample) -> Sample:
    """Mirror left-right: every map flipped as its task says, ``cx' = W - 1 - cx``."""
    _, w = sample_size(sample)
    out = dict(sample)
    for key in images(sample):
        out[key] = sample[key].flip(-1)
    for key, task in labels(sample):
        out[key] = task.hflip_label(sample[key])
    if "K" in sample:
        out["K"] = hflip_intrinsics(sample["K"], w)
    if "poses" in sample:
        out["poses"] = mirror_poses(sample["poses"])
    return out


def mirror_poses(poses: Tensor) -> Tensor:
    """Camera transforms [..., 4, 4] of the left-right mirrored scene: ``S T S``."""
    s = poses.new_tensor([-1.0, 1.0, 1.0, 1.0])
    return poses * s[:, None] * s[None, :]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class Resize:
    """Resize to a fixed size (aspect ratio not preserved, as the official loaders do)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = int(height), int(width)

    def __call__(self, sample: Sample) -> Sample:
        return resize(sample, self.height, self.width)

    def __repr__(self) -> str:
        return f"Resize({self.height}, {self.width})"


class RandomScale:
    """Scale jitter: resize by a factor drawn uniformly from [min_scale, max_scale]."""

    def __init__(self, min_scale: float, max_scale: float):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, sample: Sample) -> Sample:
        s = self.min_scale + (self.max_scale - self.min_scale) * float(torch.rand(()))
        h, w = sample_size(sample)
        return resize(sample, max(1, round(h * s)), max(1, round(w * s)))

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """Crop a random ``height x width`` window; a smaller image is padded (random placement)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = int(height), int(width)

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample_size(sample)
        top = _random_offset(h, self.height)
        left = _random_offset(w, self.width)
        return crop(sample, top, left, self.height, self.width)

    def __repr__(self) -> str:
        return f"RandomCrop({self.height}, {self.width})"


def _random_offset(size: int, crop_size: int) -> int:
    if size >= crop_size:
        return int(torch.randint(0, size - crop_size + 1, ()))
    return -int(torch.randint(0, crop_size - size + 1, ()))


class CenterCrop:
    """Crop the central ``height x width`` window (padding if the image is smaller)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = int(height), int(width)

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample_size(sample)
        return crop(sample, (h - self.height) // 2, (w - self.width) // 2, self.height, self.width)

    def __repr__(self) -> str:
        return f"CenterCrop({self.height}, {self.width})"


class RandomHorizontalFlip:
    """Flip with probability ``p`` (see :func:`hflip`)."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, sample: Sample) -> Sample:
        return hflip(sample) if float(torch.rand(())) < self.p else sample

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


class ColorJitter:
    """Photometric jitter of the image only (``torchvision.transforms.v2.ColorJitter``)."""

    def __init__(
        self,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
    ):
        self.jitter = v2.ColorJitter(brightness, contrast, saturation, hue)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        if "frames" not in sample:
            out["image"] = self.jitter(sample["image"]).clamp(0.0, 1.0)
            return out
        # one draw of the jitter for the image and its frames (a batch gets the same parameters)
        both = self.jitter(torch.cat([sample["image"][None], sample["frames"]])).clamp(0.0, 1.0)
        out["image"], out["frames"] = both[0], both[1:]
        return out

    def __repr__(self) -> str:
        return repr(self.jitter)


def build_transforms(
    height: int,
    width: int,
    *,
    train: bool,
    crop: tuple[int, int] | None = None,
    scale_range: tuple[float, float] = (1.0, 1.0),
    hflip_p: float = 0.5,
    color_jitter: float = 0.0,
) -> Compose:
    """The standard pipeline: resize to ``height x width``; when training, optionally scale
    jitter, random crop (to ``crop`` or back to ``height x width`` after jitter), flip and
    colour jitter (``color_jitter`` = brightness/contrast/saturation strength, hue / 4)."""
    steps: list[Any] = [Resize(height, width)]
    if not train:
        return Compose(steps)
    jitter = tuple(scale_range) != (1.0, 1.0)
    if jitter:
        steps.append(RandomScale(*scale_range))
    if crop is not None or jitter:
        ch, cw = crop if crop is not None else (height, width)
        steps.append(RandomCrop(ch, cw))
    if hflip_p > 0:
        steps.append(RandomHorizontalFlip(hflip_p))
    if color_jitter > 0:
        c = float(color_jitter)
        steps.append(ColorJitter(c, c, c, min(0.5, c / 4)))
    return Compose(steps)
