"""LightningDataModules: one domain (:class:`DenseDataModule`) and labelled source + unlabelled
target for domain adaptation (:class:`AdaptationDataModule`).

Both take only plain arguments so that they can be the ``data:`` section of a LightningCLI
config. Training batches follow :func:`densemtl.data.sample.collate` (stacked labels plus
``has_<task>`` flags). In adaptation the training batch is ``{"source": batch, "target": batch}``;
the target training set is built with no tasks at all, so its label files are never opened
(delete them and training still runs); validation and test use the *target*'s labelled split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Subset

from densemtl.tasks import get_task

from .base import DenseDataset
from .registry import build_dataset, dataset_class
from .sample import collate
from .sampling import EpochSampler
from .synthetic import ensure_generated
from .transforms import build_transforms


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random from torch's per-worker seed (torch itself is seeded already)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, num_workers: int,
                pin_memory: bool, drop_last: bool, seed: int) -> DataLoader:
    """A DataLoader with the densemtl collate and an :class:`EpochSampler`.

    The sample order depends only on ``seed`` and the epoch and is sharded across processes
    (training padded, evaluation not), so resumed and distributed runs see the right samples;
    the trainer must not replace the sampler (``use_distributed_sampler: false``, the CLI's
    default).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), shuffle, seed),
        num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory and torch.cuda.is_available(), drop_last=drop_last,
        persistent_workers=num_workers > 0, worker_init_fn=_seed_worker, generator=generator,
    )


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = list(tasks)
    for t in tasks:
        get_task(t)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks listed twice: {tasks}")
    return tasks


def _check_synthesize(
    option: str, dataset: str, spec: dict[str, Any] | None
) -> dict[str, Any] | None:
    if spec is not None and dataset != "synthetic":
        raise ValueError(f"{option} only applies to the 'synthetic' dataset, not {dataset!r}")
    return None if spec is None else dict(spec)


class _Common(L.LightningDataModule):
    """Transforms and loader settings shared by both data modules (see their docstrings)."""

    def __init__(
        self,
        tasks: Sequence[str],
        height: int,
        width: int,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        crop_height: int | None = None,
        crop_width: int | None = None,
        scale_min: float = 1.0,
        scale_max: float = 1.0,
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        drop_last: bool = True,
        seed: int = 0,
        validate: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        self.height, self.width = int(height), int(width)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        if (crop_height is None) != (crop_width is None):
            raise ValueError("give both crop_height and crop_width, or neither")
        self.crop = None if crop_height is None else (int(crop_height), int(crop_width))
        self.scale_range = (float(scale_min), float(scale_max))
        self.hflip, self.color_jitter = float(hflip), float(color_jitter)
        self.drop_last, self.seed, self.validate = bool(drop_last), int(seed), bool(validate)
        self._datasets: dict[tuple[str, str], DenseDataset] = {}

    def train_transform(self, height: int | None = None, width: int | None = None):
        return build_transforms(
            height or self.height,
            width or self.width,
            train=True,
            crop=self.crop,
            scale_range=self.scale_range,
            hflip_p=self.hflip,
            color_jitter=self.color_jitter,
        )

    def eval_transform(self, height: int | None = None, width: int | None = None):
        return build_transforms(height or self.height, width or self.width, train=False)

    def __repr__(self) -> str:
        # Lightning's own __str__ builds every dataloader to describe them; keep printing cheap
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items() if v is not None)
        return f"{type(self).__name__}({args})"

    __str__ = __repr__

    def _loader(self, dataset: Dataset, train: bool, batch_size: int | None = None) -> DataLoader:
        return make_loader(
            dataset,
            batch_size or (self.batch_size if train else self.val_batch_size),
            shuffle=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last and train,
            seed=self.seed,
        )


class DenseDataModule(_Common):
    """One dataset: train / val / test splits and prediction on a folder of images.

    ``dataset`` is a key of :data:`densemtl.data.registry.DATASETS`; ``dataset_options`` go to its
    constructor (e.g. ``{"num_classes": 16}`` for Cityscapes). Training: resize to
    ``height x width``, optional scale jitter in ``[scale_min, scale_max]``, random crop to
    ``crop_height x crop_width`` (default: back to ``height x width`` after jitter), flip with
    probability ``hflip``, colour jitter of strength ``color_jitter``. Evaluation: resize only.
    ``limit_train`` keeps the first N training samples (after the split), for quick runs.
    ``synthesize`` (built-in benchmark only): arguments of
    :func:`densemtl.data.synthetic.generate` (``train``, ``val``, ``height``, ``width``, ``seed``,
    ``style``, ``sequence``); ``root`` is generated with them in ``prepare_data`` when it holds no
    benchmark yet.

    ``frames`` (e.g. ``[-1, 1]``): training samples also carry these neighbouring video frames
    (and their poses where known), for self-supervised depth; evaluation reads single images.
    ``label_fraction``: for each task named, the fraction of training samples whose label is
    read (a fixed subset drawn with ``seed``); 0 means the training split never opens that
    task's label files, while validation and test still score it.
    """

    def __init__(
        self,
        dataset: str,
        root: str,
        tasks: list[str],
        height: int,
        width: int,
        *,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        predict_root: str | None = None,
        limit_train: int | None = None,
        dataset_options: dict[str, Any] | None = None,
        synthesize: dict[str, Any] | None = None,
        frames: list[int] | None = None,
        label_fraction: dict[str, float] | None = None,
        **loading: Any,
    ):
        super().__init__(tasks, height, width, **loading)
        self.save_hyperparameters(logger=False)
        dataset_class(dataset)  # an unknown name fails here, before any run folder exists
        self.dataset_name, self.root = dataset, root
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.predict_root, self.limit_train = predict_root, limit_train
        self.dataset_options = dict(dataset_options or {})
        self.synthesize = _check_synthesize("synthesize", dataset, synthesize)
        self.frames = [int(k) for k in frames or []]
        self.label_fraction = {t: float(f) for t, f in (label_fraction or {}).items()}
        for t, f in self.label_fraction.items():
            if t not in self.tasks:
                raise ValueError(f"label_fraction names '{t}', which is not one of the tasks "
                                 f"{self.tasks}")
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"label_fraction of '{t}' must be in [0, 1], got {f}")

    def prepare_data(self) -> None:
        """Generate the built-in benchmark into ``root`` if ``synthesize`` asks and it is absent."""
        if self.synthesize is not None:
            ensure_generated(self.root, self.synthesize)

    def dataset(self, stage: str) -> DenseDataset:
        """The (memoised) dataset for ``train``, ``val``, ``test`` or ``predict``."""
        split = self.splits.get(stage, self.splits["test"])
        key = (stage, split)
        if key not in self._datasets:
            if stage == "predict" and self.predict_root:
                self._datasets[key] = build_dataset(
                    "folder",
                    self.predict_root,
                    "all",
                    [],
                    self.eval_transform(),
                    validate=self.validate,
                )
            else:
                self._datasets[key] = self._build(stage, split)
        return self._datasets[key]

    def _build(self, stage: str, split: str) -> DenseDataset:
        train = stage == "train"
        transform = self.train_transform() if train else self.eval_transform()
        tasks = self.tasks if stage != "predict" else []
        options = dict(self.dataset_options)
        if train:
            tasks = [t for t in tasks if self.label_fraction.get(t, 1.0) > 0]
            if self.frames:
                options["frames"] = self.frames
        ds = build_dataset(self.dataset_name, self.root, split, tasks, transform,
                           validate=self.validate, **options)
        if train:
            order = np.random.default_rng(self.seed).permutation(len(ds))
            for t, f in self.label_fraction.items():
                if 0 < f < 1:
                    kept = set(order[: round(f * len(ds))].tolist())
                    ds.drop_labels(t, kept.__contains__)
        return ds

    @property
    def info_dataset(self) -> DenseDataset:
        return self.dataset("val")

    @property
    def evaluation_dataset_class(self) -> type[DenseDataset]:
        """The class of the evaluated dataset (its conventions, e.g. ``edge_max_dist``)."""
        return dataset_class(self.dataset_name)

    @property
    def num_classes(self) -> int:
        return self.info_dataset.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.info_dataset.class_names)

    @property
    def palette(self) -> np.ndarray:
        return self.info_dataset.palette

    def setup(self, stage: str | None = None) -> None:
        stages = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: ("train", "val", "test"),
        }[stage]
        for s in stages:
            self.dataset(s)

    def train_dataloader(self) -> DataLoader:
        ds: Dataset = self.dataset("train")
        if self.limit_train is not None:
            ds = Subset(ds, range(min(self.limit_train, len(ds))))
        return self._loader(ds, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("predict"), train=False)


class AdaptationDataModule(_Common):
    """Labelled source + unlabelled target (unsupervised domain adaptation).

    Training yields ``{"source": batch, "target": batch}`` through a Lightning
    ``CombinedLoader`` (``mode``: ``max_size_cycle`` or ``min_size``, the official code's zip).
    The target training set has no tasks: only its images are read. Validation/test run on the
    target's ``val_split`` / ``test_split`` with labels. Source and target must have the same
    number of classes (choose the class sets, e.g. Synthia -> Cityscapes ``num_classes: 16``).
    The target may use its own size (``target_height`` / ``target_width``).
    ``source_synthesize`` / ``target_synthesize``: as ``synthesize`` of :class:`DenseDataModule`.
    """

    def __init__(
        self,
        source: str,
        source_root: str,
        target: str,
        target_root: str,
        tasks: list[str],
        height: int,
        width: int,
        *,
        target_height: int | None = None,
        target_width: int | None = None,
        target_batch_size: int | None = None,
        source_split: str = "train",
        target_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        mode: str = "max_size_cycle",
        source_options: dict[str, Any] | None = None,
        target_options: dict[str, Any] | None = None,
        source_synthesize: dict[str, Any] | None = None,
        target_synthesize: dict[str, Any] | None = None,
        **loading: Any,
    ):
        super().__init__(tasks, height, width, **loading)
        self.save_hyperparameters(logger=False)
        if mode not in ("max_size_cycle", "min_size", "max_size"):
            raise ValueError(f"unknown CombinedLoader mode {mode!r}")
        dataset_class(source), dataset_class(target)
        self.source, self.source_root = source, source_root
        self.target, self.target_root = target, target_root
        self.target_size = (target_height or self.height, target_width or self.width)
        self.target_batch_size = int(target_batch_size or self.batch_size)
        self.source_split, self.target_split = source_split, target_split
        self.val_split, self.test_split, self.mode = val_split, test_split, mode
        self.source_options = dict(source_options or {})
        self.target_options = dict(target_options or {})
        self.synthesize = {
            "source": _check_synthesize("source_synthesize", source, source_synthesize),
            "target": _check_synthesize("target_synthesize", target, target_synthesize),
        }

    def prepare_data(self) -> None:
        """Generate built-in benchmark domains whose ``*_synthesize`` is set and that are absent."""
        roots = {"source": self.source_root, "target": self.target_root}
        for role, spec in self.synthesize.items():
            if spec is not None:
                ensure_generated(roots[role], spec)

    def dataset(self, role: str) -> DenseDataset:
        """``source`` (train, labelled), ``target`` (train, no labels), ``val`` or ``test``."""
        if role not in self._datasets:
            th, tw = self.target_size
            specs = {
                "source": (
                    self.source,
                    self.source_root,
                    self.source_split,
                    self.tasks,
                    self.train_transform(),
                    self.source_options,
                ),
                "target": (
                    self.target,
                    self.target_root,
                    self.target_split,
                    [],
                    self.train_transform(th, tw),
                    self.target_options,
                ),
                "val": (
                    self.target,
                    self.target_root,
                    self.val_split,
                    self.tasks,
                    self.eval_transform(th, tw),
                    self.target_options,
                ),
                "test": (
                    self.target,
                    self.target_root,
                    self.test_split,
                    self.tasks,
                    self.eval_transform(th, tw),
                    self.target_options,
                ),
            }
            name, root, split, tasks, transform, options = specs[role]
            self._datasets[role] = build_dataset(
                name, root, split, tasks, transform, validate=self.validate, **options
            )
            self._check_classes()
        return self._datasets[role]

    @property
    def evaluation_dataset_class(self) -> type[DenseDataset]:
        """The class of the evaluated (target) dataset."""
        return dataset_class(self.target)

    def _check_classes(self) -> None:
        counts = {r: d.num_classes for r, d in self._datasets.items() if r != "target"}
        uses_classes = any(get_task(t).uses_classes for t in self.tasks)
        if uses_classes and len(set(counts.values())) > 1:
            raise ValueError(
                f"source and target class counts differ: {counts}; choose matching "
                "class sets in source_options / target_options"
            )

    @property
    def num_classes(self) -> int:
        return self.dataset("source").num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.dataset("source").class_names)

    @property
    def palette(self) -> np.ndarray:
        return self.dataset("source").palette

    def setup(self, stage: str | None = None) -> None:
        roles = {
            "fit": ("source", "target", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
            None: ("source", "target", "val", "test"),
        }[stage]
        for r in roles:
            self.dataset(r)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {
            "source": self._loader(self.dataset("source"), train=True),
            "target": self._loader(
                self.dataset("target"), train=True, batch_size=self.target_batch_size
            ),
        }
        return CombinedLoader(loaders, mode=self.mode)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), train=False)
