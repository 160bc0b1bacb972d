"""Dataset names -> classes (one entry per dataset; no if/elif factories)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .base import DenseDataset
from .cityscapes import CityscapesDataset
from .folder import ImageFolderDataset
from .nyud import NYUDv2Dataset, SyntheticDataset
from .sample import Sample
from .synthia import SynthiaDataset
from .vkitti2 import VKITTI2Dataset

DATASETS: dict[str, type[DenseDataset]] = {
    "synthetic": SyntheticDataset,
    "nyudv2": NYUDv2Dataset,
    "cityscapes": CityscapesDataset,
    "synthia": SynthiaDataset,
    "vkitti2": VKITTI2Dataset,
    "folder": ImageFolderDataset,
}


def dataset_class(name: str) -> type[DenseDataset]:
    """The class registered as ``name``."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def build_dataset(
    name: str,
    root: str,
    split: str,
    tasks: Sequence[str],
    transform: Callable[[Sample], Sample] | None = None,
    **options: Any,
) -> DenseDataset:
    """Instantiate the dataset registered as ``name`` (``options`` go to its constructor)."""
    return dataset_class(name)(root, split, tasks, transform, **options)
