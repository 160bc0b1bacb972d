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

A sample of a video sequence (``DenseDataset(frames=[-1, 1])``) also carries::

    frames         float32 [F,3,H,W]  the neighbouring frames, in [0, 1], transformed with the image
    frame_offsets  list[int]          their offsets from the sample's frame (e.g. [-1, 1])
    poses          float32 [F,4,4]    optional: the exact transform from the sample's camera
                                      frame to each neighbour's (X_k = R X_0 + t, metres)

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

NON_LABEL_KEYS: frozenset[str] = frozenset({"image", "K", "id", "frames", "frame_offsets",
                                             "poses"})
"""Keys of a sample that are not task labels."""


def label_tasks() -> list[Task]:
    """The registered tasks that own a label key, in registry order (the canonical order of
    label keys); a task scoring another task's label (``shares_label``) is not listed."""
    return [t for t in registered_tasks().values() if not t.shares_label]


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
    if "frames" in sample:
        _check_frames(sample, h, w, where)
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


def _check_frames(sample: Mapping[str, Any], h: int, w: int, where: str) -> None:
    frames, offsets = sample["frames"], sample.get("frame_offsets")
    if not isinstance(frames, Tensor) or frames.dtype != torch.float32 or frames.ndim != 4 or \
            tuple(frames.shape[1:]) != (3, h, w):
        _fail(where, f"'frames' must be float32 [F,3,{h},{w}], got "
              f"{getattr(frames, 'dtype', type(frames).__name__)} "
              f"{tuple(getattr(frames, 'shape', ()))}")
    if not isinstance(offsets, list) or len(offsets) != frames.shape[0]:
        _fail(where, f"'frame_offsets' must list the offsets of the {frames.shape[0]} frames, "
              f"got {offsets!r}")
    poses = sample.get("poses")
    if poses is not None and (not isinstance(poses, Tensor) or poses.dtype != torch.float32
                              or tuple(poses.shape) != (frames.shape[0], 4, 4)):
        _fail(where, f"'poses' must be float32 [{frames.shape[0]},4,4]")


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
    (a mix of samples with and without ``K`` is refused); so are a sequence's ``frames`` and
    ``poses``, and ``frame_offsets`` (the same in every sample) is kept as a list per sample.
    Other tensor keys of equal shape are stacked; any other value is kept as a list.
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
    for key in ("frames", "poses"):
        present = [key in s for s in samples]
        if all(present):
            batch[key] = torch.stack([s[key] for s in samples])
        elif any(present):
            raise SampleError(f"some samples of a batch have no '{key}': "
                              f"{[i for i, p in zip(ids, present) if not p]}")
    if "frames" in batch:
        offsets = [s["frame_offsets"] for s in samples]
        if any(o != offsets[0] for o in offsets):
            raise SampleError(f"samples of one batch have different frame offsets: {offsets}")
        batch["frame_offsets"] = offsets
    extra = {k for s in samples for k in s} - NON_LABEL_KEYS - labels
    for key in sorted(extra):
        values = [s.get(key) for s in samples]
        if all(isinstance(v, Tensor) for v in values) and len({v.shape for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
