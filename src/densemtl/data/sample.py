"""The sample-dict contract, its validator and the batch collate.

One sample is a plain ``dict``::

    image    float32 [3,H,W]  RGB in [0, 1]
    semseg   int64   [H,W]    class ids 0..C-1, IGNORE_INDEX (255) = not labelled
    depth    float32 [1,H,W]  z-depth in metres (distance along the optical axis), 0 = invalid
    normals  float32 [3,H,W]  unit vectors in the camera frame (x right, y down, z forward),
                              oriented towards the camera (n . P <= 0 for the surface point P),
                              the 0-vector = invalid
    edges    float32 [1,H,W]  {0, 1}
    K        float32 [3,3]    pinhole intrinsics of *this* H x W image (pixel centres at integer
                              coordinates: pixel (u, v) = column u, row v covers [u-.5, u+.5])
    id       str

Every task key is optional (partially labelled data). ``K`` is optional only for image folders
without known intrinsics. The label keys, dtypes, shapes, "no label" values and value checks come
from the registered tasks (``densemtl.tasks``), so a registered new task's label is validated and
collated like the built-in ones. The batch produced by :func:`collate` holds, for every label key
present in at least one sample, the stacked labels (absent samples filled with the task's "no
label" value) and a bool ``has_<key>`` [B] flag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from densemtl.tasks import Task, registered_tasks

Sample = dict[str, Any]

NON_LABEL_KEYS: frozenset[str] = frozenset({"image", "K", "id"})
"""Keys of a sample that are not task labels."""


def label_tasks() -> list[Task]:
    """The registered tasks, in registry order (the canonical order of label keys)."""
    return list(registered_tasks().values())


class SampleError(ValueError):
    """A sample breaks the contract; the message names the sample (and file where known)."""


def _fail(where: str, msg: str) -> None:
    raise SampleError(f"{where}: {msg}" if where else msg)


def sample_size(sample: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of a sample, taken from its image."""
    image = sample["image"]
    return int(image.shape[-2]), int(image.shape[-1])


def validate_sample(
    sample: Mapping[str, Any],
    *,
    num_classes: int | None = None,
    full: bool = True,
    where: str = "",
) -> None:
    """Check ``sample`` against the contract; raise :class:`SampleError` naming ``where``.

    ``full=False`` checks only keys, dtypes and shapes (constant time, cheap enough for every
    sample); ``full=True`` also checks values (ranges, finiteness, unit normals, binary edges,
    class ids below ``num_classes``), which costs a few passes over the pixels.
    """
    where = where or str(sample.get("id", ""))
    if "image" not in sample:
        _fail(where, "sample has no 'image'")
    if "id" in sample and not isinstance(sample["id"], str):
        _fail(where, f"'id' must be str, got {type(sample['id']).__name__}")
    image = sample["image"]
    if not isinstance(image, Tensor) or image.ndim != 3:
        _fail(where, "'image' must be a [3,H,W] tensor")
    h, w = image.shape[-2:]
    if image.dtype != torch.float32 or image.shape[0] != 3:
        _fail(where, f"'image' must be float32 [3,H,W], got {image.dtype} {tuple(image.shape)}")
    for task in label_tasks():
        value = sample.get(task.label_key)
        if value is None:
            continue
        key, expected = task.label_key, task.label_shape(h, w)
        if not isinstance(value, Tensor):
            _fail(where, f"'{key}' must be a tensor, got {type(value).__name__}")
        if value.dtype != task.label_dtype:
            _fail(where, f"'{key}' must be {task.label_dtype}, got {value.dtype}")
        if tuple(value.shape) != expected:
            _fail(where, f"'{key}' has shape {tuple(value.shape)}, expected {expected}")
    if "K" in sample:
        K = sample["K"]
        if not isinstance(K, Tensor) or K.dtype != torch.float32 or tuple(K.shape) != (3, 3):
            _fail(where, "'K' must be a float32 [3,3] tensor")
        if full and (
            K[0, 0] <= 0 or K[1, 1] <= 0 or not torch.equal(K[2], K.new_tensor([0, 0, 1]))
        ):
            _fail(where, f"'K' is not a pinhole intrinsics matrix: {K.tolist()}")
    if full:
        _check_values(sample, num_classes, where)


def _check_values(sample: Mapping[str, Any], num_classes: int | None, where: str) -> None:
    image = sample["image"]
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        _fail(where, "'image' must be finite and within [0, 1]")
    for task in label_tasks():
        if task.label_key in sample:
            problem = task.check_label(sample[task.label_key], num_classes)
            if problem:
                _fail(where, problem)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch, filling absent labels and adding ``has_<key>`` flags.

    Every sample must have the same image size. ``K`` is stacked when every sample has it
    (a mix of samples with and without ``K`` is refused). Other tensor keys of equal shape are
    stacked; any other value is kept as a list.
    """
    if not samples:
        raise ValueError("collate() needs at least one sample")
    ids = [str(s.get("id", i)) for i, s in enumerate(samples)]
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) != 1:
        raise SampleError(f"samples of different sizes {sorted(sizes)} in one batch: {ids}")
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]), "id": ids}
    h, w = samples[0]["image"].shape[-2:]
    labels = set()
    for task in label_tasks():
        key = task.label_key
        has = [key in s for s in samples]
        if not any(has):
            continue
        labels.add(key)
        fill = task.empty_label(h, w)
        batch[key] = torch.stack([s.get(key, fill) for s in samples])
        batch[f"has_{key}"] = torch.tensor(has, dtype=torch.bool)
    with_k = ["K" in s for s in samples]
    if all(with_k):
        batch["K"] = torch.stack([s["K"] for s in samples])
    elif any(with_k):
        missing = [i for i, k in zip(ids, with_k) if not k]
        raise SampleError(f"some samples of a batch have no intrinsics 'K': {missing}")
    extra = {k for s in samples for k in s} - NON_LABEL_KEYS - labels
    for key in sorted(extra):
        values = [s.get(key) for s in samples]
        if all(isinstance(v, Tensor) for v in values) and len({v.shape for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
