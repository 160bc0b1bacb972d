"""Dataset names -> classes (one entry per dataset; no if/elif factories).

A new dataset is one :class:`~densemtl.data.base.DenseDataset` subclass plus one
``register_dataset("name", MyDataset)`` call; configs then use ``dataset: name``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import did_you_mean
from .base import DenseDataset
from .cityscapes import CityscapesDataset
from .folder import ImageFolderDataset
from .nyud import NYUDv2Dataset
from .sample import Sample
from .synthetic import SyntheticDataset
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


def register_dataset(name: str, cls: type[DenseDataset], *, replace: bool = False) -> None:
    """Make ``cls`` available as ``dataset: name`` (``replace=True`` swaps out an existing one)."""
    if not (isinstance(cls, type) and issubclass(cls, DenseDataset)):
        raise TypeError(f"register_dataset expects a DenseDataset subclass, got {cls!r}")
    if name in DATASETS and DATASETS[name] is not cls and not replace:
        raise ValueError(f"a dataset named '{name}' is already registered "
                         "(pass replace=True to replace it)")
    DATASETS[name] = cls


def unregister_dataset(name: str) -> None:
    """Forget the dataset ``name``."""
    del DATASETS[name]


def dataset_class(name: str) -> type[DenseDataset]:
    """The class registered as ``name``."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; known: "
                         f"{', '.join(DATASETS)}") from None


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
