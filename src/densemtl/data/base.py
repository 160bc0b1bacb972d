"""The dataset base class: file records, bad-input policies, loading, transforms, validation.

A concrete dataset lists :class:`Record` s (one per sample: an id and the path of every file it
may read) and decodes each task's label; everything else is here:

* ``tasks`` selects what is read. A dataset never opens the files of tasks it was not asked for
  (an unlabelled domain-adaptation target is built with ``tasks=[]``).
* ``on_missing`` (checked once, at construction, for every file the requested tasks need):
  ``"error"`` (default) raises FileNotFoundError naming the first missing paths and their count;
  ``"drop_sample"`` removes samples with any missing file; ``"drop_label"`` keeps the sample without
  that task's label (a missing *image* is still an error). Both drop modes warn with the count.
* ``on_size_mismatch``: a label whose size differs from its image is refused (``"error"``) or
  nearest-resized to the image (``"resize"``, only when the aspect ratios agree within 1%).
* ``unknown_labels``: raw label values that are not ids of the dataset's label definition are
  refused with the file and values named (``"error"``) or mapped to 255 (``"ignore"``). Ids that are
  defined but not part of the chosen class mapping always become 255.
* A registered task the dataset has no files for, but whose ``derived_from`` keys it provides
  (normals from ``depth`` and ``K``), is derived *after* the transforms (``Task.derive``), i.e. at
  the network resolution with the correctly resized/cropped/flipped intrinsics.
* ``validate``: shapes and dtypes are always checked; ``validate=True`` also checks every value.
* ``frames``: offsets of neighbouring video frames to load with each sample (e.g. ``[-1, 1]``),
  for datasets with camera sequences (``has_sequences``): ``frames`` float32 [F,3,H,W] in the
  order of the offsets, ``frame_offsets`` (the list), and ``poses`` float32 [F,4,4] (the exact
  transform from the sample's camera to each neighbour's) where the dataset knows them. A missing
  frame is treated like a missing image (``drop_sample`` drops the sample; otherwise an error).
* A task that scores another task's label (``Task.shares_label``, e.g. self-supervised depth,
  evaluated on the depth label) is read through that task's reader.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from densemtl.tasks import IGNORE_INDEX, Task, get_task, registered_tasks, task_for_label

from ..io import DataError, read_png, read_rgb
from .geometry import resize_intrinsics
from .sample import Sample, validate_sample
from .transforms import resize_image

Reader = Callable[[Any, "Record", tuple[int, int]], np.ndarray]

MISSING_POLICIES = ("error", "drop_sample", "drop_label")
SIZE_POLICIES = ("error", "resize")
LABEL_POLICIES = ("error", "ignore")


@dataclass
class Record:
    """One sample on disk: its id, the files it may read, and tasks whose files are missing."""

    id: str
    files: dict[str, Path]
    missing: set[str] = field(default_factory=set)


class LabelMap:
    """Raw label ids -> train ids through a lookup table, with unknown-id detection."""

    def __init__(self, mapping: dict[int, int], known: Iterable[int], name: str):
        known = list(known)
        size = max([*known, *mapping]) + 1
        self.lut = np.full(size, IGNORE_INDEX, dtype=np.int64)
        for raw, train in mapping.items():
            self.lut[raw] = train
        self.known = np.zeros(size, dtype=bool)
        self.known[known] = True
        self.name = name

    def __call__(self, raw: np.ndarray, path: Path | str, policy: str = "error") -> np.ndarray:
        raw = raw.astype(np.int64)
        inside = (raw >= 0) & (raw < len(self.lut))
        safe = np.where(inside, raw, 0)
        unknown = ~inside | ~self.known[safe]
        if unknown.any() and policy == "error":
            values = np.unique(raw[unknown])[:10].tolist()
            raise DataError(
                f"{path}: label values {values} are not {self.name} ids "
                "(pass unknown_labels='ignore' to map them to 255)"
            )
        out = self.lut[safe]
        out[unknown] = IGNORE_INDEX
        return out

    def read(self, path: Path, policy: str = "error") -> np.ndarray:
        """Train ids from a single-channel PNG of raw ids."""
        raw = read_png(path)
        if raw.ndim != 2:
            raise DataError(f"{path}: {self.name} must be a single-channel PNG, got {raw.shape}")
        return self(raw, path, policy)


class DenseDataset(Dataset):
    """Base class of every dataset (see the module docstring for the shared behaviour)."""

    name: ClassVar[str] = ""
    readers: ClassVar[Mapping[str, Reader]] = {}  # task -> method reading its label from files
    provides: ClassVar[tuple[str, ...]] = ()  # the tasks of ``readers`` (set automatically)
    has_intrinsics: ClassVar[bool] = True  # samples carry K (labels may be derived from it)
    has_sequences: ClassVar[bool] = False  # neighbouring frames can be loaded (``frames``)
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    # edge matching distance of the BSDS protocol, as a fraction of the image diagonal: the
    # dataset's standard (0.0075 as BSDS / PASCAL-Context; NYUDv2 0.011)
    edge_max_dist: ClassVar[float] = 0.0075

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.provides = tuple(cls.readers)

    class_names: tuple[str, ...] = ()
    palette: np.ndarray = np.zeros((0, 3), dtype=np.uint8)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        *,
        validate: bool = False,
        on_missing: str = "error",
        on_size_mismatch: str = "error",
        unknown_labels: str = "error",
        frames: Sequence[int] | None = None,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(2, f"dataset root is not a folder: {self.root}", str(self.root))
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; choose one of {self.splits}")
        for value, allowed, what in (
            (on_missing, MISSING_POLICIES, "on_missing"),
            (on_size_mismatch, SIZE_POLICIES, "on_size_mismatch"),
            (unknown_labels, LABEL_POLICIES, "unknown_labels"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a list of task names, got the string {tasks!r}")
        self.split = split
        self.frames = tuple(int(k) for k in (frames or ()))
        if self.frames and not self.has_sequences:
            raise ValueError(f"{self.name} has no video sequences to load frames {list(frames)} "
                             "from")
        if 0 in self.frames or len(set(self.frames)) != len(self.frames):
            raise ValueError(f"frames must be distinct non-zero offsets, got {list(self.frames)}")
        self.tasks = tuple(dict.fromkeys(self.provides if tasks is None else tasks))
        unknown = [t for t in self.tasks if t not in self.available_tasks]
        if unknown:
            raise ValueError(
                f"{self.name} does not provide {unknown}; it provides {list(self.available_tasks)}"
            )
        self.transform = transform
        self.validate = validate
        self.on_missing = on_missing
        self.on_size_mismatch = on_size_mismatch
        self.unknown_labels = unknown_labels
        self.records = self._check_files(self.list_records(split))

    # --- to implement --------------------------------------------------------------------------
    # ``readers``: ``{task: method}``; each method returns the decoded label of a record as a
    # numpy array in the task's units ([H,W] or [H,W,C], its own size); the base class turns it
    # into the sample's tensor.
    def list_records(self, split: str) -> list[Record]:
        """All samples of ``split``, sorted, with the paths of every file they may read."""
        raise NotImplementedError

    def intrinsics(self, record: Record, image_hw: tuple[int, int]) -> Tensor | None:
        """K [3,3] of the image as loaded (``image_hw``), or None if unknown."""
        return None

    def poses(self, record: Record) -> Tensor | None:
        """float32 [F,4,4]: the transform from the sample's camera to the camera of each frame
        in ``self.frames`` (X_frame = R X_0 + t, metres), or None if unknown."""
        return None

    def task_files(self, task: str) -> tuple[str, ...]:
        """Keys of :attr:`Record.files` that ``task`` reads (a derived task: its sources')."""
        if task in self.provides:
            return (task,)
        return tuple(dict.fromkeys(f for dep in self.derivation_sources(task)
                                   for f in self.task_files(dep)))

    # --- shared ---------------------------------------------------------------------------------
    def label_source(self, task: str) -> str:
        """The task whose reader gives ``task``'s label: ``task`` itself, or the provided task
        that owns its label key (for a task that scores another task's label)."""
        if task in self.provides:
            return task
        owner = task_for_label(get_task(task).label_key)
        if owner is not None and owner.name in self.provides:
            return owner.name
        return task

    def derivation_sources(self, task: str) -> list[str]:
        """The provided tasks whose labels ``task`` is derived from."""
        deps = [task_for_label(k) for k in get_task(task).derived_from if k != "K"]
        return [t.name for t in deps if t is not None]

    def _derivable(self, task: Task) -> bool:
        if task.name in self.provides or not task.derived_from:
            return False
        for key in task.derived_from:
            source = task_for_label(key)
            if key == "K" and not self.has_intrinsics:
                return False
            if key != "K" and (source is None or source.name not in self.provides):
                return False
        return True

    @property
    def available_tasks(self) -> tuple[str, ...]:
        derived = [t.name for t in registered_tasks().values() if t.name not in self.provides
                   and (self._derivable(t) or self.label_source(t.name) in self.provides)]
        return self.provides + tuple(derived)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def _check_files(self, records: list[Record]) -> list[Record]:
        needed = dict.fromkeys([*(self.label_source(t) for t in self.tasks), *self._load_tasks()])
        # frames travel with the image: a sample without them is no sample for this dataset
        poses = ("poses",) if self.frames and records and "poses" in records[0].files else ()
        keys = {"image": ("image", *map(frame_key, self.frames), *poses)}
        keys |= {t: self.task_files(t) for t in needed}
        missing: list[Path] = []
        kept: list[Record] = []
        for rec in records:
            absent = {k for ks in keys.values() for k in ks if not rec.files[k].is_file()}
            if not absent:
                kept.append(rec)
                continue
            missing.extend(sorted(rec.files[k] for k in absent))
            if self.on_missing == "drop_sample":
                continue
            lost = [rec.files[k] for k in keys["image"] if k in absent]
            if self.on_missing == "drop_label" and not lost:
                rec.missing = {t for t, ks in keys.items() if t != "image" and set(ks) & absent}
                kept.append(rec)
                continue
            if self.on_missing == "drop_label":
                what = "image" if lost[0] == rec.files["image"] else "frame"
                raise FileNotFoundError(2, f"{self.name}: missing {what} {lost[0]}", str(lost[0]))
        if missing and self.on_missing == "error":
            shown = "\n  ".join(str(p) for p in missing[:5])
            raise FileNotFoundError(
                2,
                f"{self.name} ({self.split}): {len(missing)} missing file(s), e.g.\n  {shown}\n"
                "(on_missing='drop_sample' or 'drop_label' keeps going without them)",
                str(missing[0]),
            )
        if missing:
            what = (
                f"{len(records) - len(kept)} sample(s) dropped"
                if self.on_missing == "drop_sample"
                else "only their labels dropped"
            )
            warnings.warn(
                f"{self.name} ({self.split}): {len(missing)} missing file(s), {what}; "
                f"first: {missing[0]}",
                stacklevel=3,
            )
        return kept

    def load(self, index: int) -> Sample:
        """The sample at its native size, before transforms (no derived normals)."""
        rec = self.records[index]
        image = read_rgb(rec.files["image"])
        hw = image.shape[:2]
        sample: Sample = {
            "image": torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255),
            "id": rec.id,
        }
        K = self.intrinsics(rec, hw)
        if K is not None:
            sample["K"] = K
        if self.frames:
            sample.update(self._load_frames(rec, hw))
        for task in self._load_tasks():
            if task in rec.missing:
                continue
            label = get_task(task).label_from_numpy(self.readers[task](self, rec, hw))
            if tuple(label.shape[-2:]) != hw:
                label = self._fit_size(rec, task, label, hw)
            sample[task] = label
        return sample

    def _load_frames(self, rec: Record, hw: tuple[int, int]) -> Sample:
        frames = []
        for k in self.frames:
            path = rec.files[frame_key(k)]
            frame = torch.from_numpy(read_rgb(path).copy()).permute(2, 0, 1).float().div_(255)
            fh, fw = frame.shape[-2:]
            if (fh, fw) != hw:  # e.g. full-size sequence frames next to pre-resized images
                if abs((fh / fw) / (hw[0] / hw[1]) - 1) >= 0.01:
                    raise DataError(f"{path}: frame {k:+d} is {fh}x{fw} but its sample's image "
                                    f"{rec.files['image']} is {hw[0]}x{hw[1]}")
                frame = resize_image(frame, hw)
            frames.append(frame)
        out: Sample = {"frames": torch.stack(frames), "frame_offsets": list(self.frames)}
        poses = self.poses(rec)
        if poses is not None:
            out["poses"] = poses
        return out

    def _derived(self) -> list[str]:
        """The requested tasks computed from other labels after the transforms."""
        return [t for t in self.tasks if self.label_source(t) not in self.provides]

    def _load_tasks(self) -> list[str]:
        """Labels read from files: the provided tasks asked for (or owning the label of a task
        asked for) and the derived ones' sources."""
        tasks = list(dict.fromkeys(self.label_source(t) for t in self.tasks
                                   if self.label_source(t) in self.provides))
        for t in self._derived():
            tasks += [d for d in self.derivation_sources(t) if d not in tasks]
        return tasks

    def drop_labels(self, task: str, keep: Callable[[int], bool]) -> None:
        """Never read ``task``'s label for the samples whose index ``keep`` rejects (they go
        without it, as a missing label); for training on a labelled fraction."""
        source = self.label_source(task)
        for i, rec in enumerate(self.records):
            if not keep(i):
                rec.missing.add(source)

    def _fit_size(self, rec: Record, task: str, label: Tensor, hw: tuple[int, int]) -> Tensor:
        lh, lw = label.shape[-2:]
        path = rec.files[self.task_files(task)[0]]
        same_aspect = abs((lh / lw) / (hw[0] / hw[1]) - 1) < 0.01
        if self.on_size_mismatch == "resize" and same_aspect:
            return get_task(task).resize_label(label, hw)
        why = "" if same_aspect else " (different aspect ratio: not resizable)"
        raise DataError(
            f"{path}: {task} label is {lh}x{lw} but its image "
            f"{rec.files['image']} is {hw[0]}x{hw[1]}{why}"
        )

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        if self.validate:
            validate_sample(
                sample,
                num_classes=self.num_classes or None,
                full=True,
                where=f"{self.name} {sample['id']} (as loaded)",
            )
        if self.transform is not None:
            sample = self.transform(sample)
        sample = self._derive(sample)
        validate_sample(
            sample,
            num_classes=self.num_classes or None,
            full=self.validate,
            where=f"{self.name} {sample['id']}",
        )
        return sample

    def _derive(self, sample: Sample) -> Sample:
        """Compute the derived labels, then drop the sources that were not asked for."""
        derived = self._derived()
        if not derived:
            return sample
        for name in derived:
            task = get_task(name)
            if all(k in sample for k in task.derived_from):  # else: a dropped source label
                sample[task.label_key] = task.derive(sample)
        asked = {get_task(t).label_key for t in self.tasks}
        for source in {d for t in derived for d in self.derivation_sources(t)}:
            key = get_task(source).label_key
            if key not in asked:
                sample.pop(key, None)
        return sample

    @staticmethod
    def scaled_intrinsics(
        K: Tensor, native_hw: tuple[int, int], image_hw: tuple[int, int]
    ) -> Tensor:
        """Intrinsics given for ``native_hw`` images, adapted to a (pre-resized) image."""
        if tuple(native_hw) == tuple(image_hw):
            return K
        return resize_intrinsics(K, native_hw, image_hw)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"tasks={list(self.tasks)}, n={len(self)})"
        )


def frame_key(offset: int) -> str:
    """The :attr:`Record.files` key of a neighbouring frame: ``frame-1``, ``frame+1``."""
    return f"frame{offset:+d}"


def clean_depth(depth: np.ndarray) -> np.ndarray:
    """Metres with every NaN, inf or negative value set to 0 (invalid)."""
    depth = depth.astype(np.float32, copy=True)
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth


def unit_normals(raw: np.ndarray, min_norm: float = 0.5) -> np.ndarray:
    """[H,W,3] vectors -> unit vectors; non-finite or shorter than ``min_norm`` -> 0 (invalid)."""
    raw = raw.astype(np.float32, copy=True)
    raw[~np.isfinite(raw)] = 0.0
    norm = np.linalg.norm(raw, axis=-1, keepdims=True)
    ok = norm >= min_norm
    return np.where(ok, raw / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
