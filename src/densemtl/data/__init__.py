"""Data: the sample contract, joint transforms, dataset loaders, the synthetic benchmark and
the LightningDataModules. Names are imported lazily, so ``densemtl synth`` stays light."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "sample",
    "SampleError": "sample",
    "collate": "sample",
    "validate_sample": "sample",

    "DenseDataset": "base",
    "Record": "base",
    "DATASETS": "registry",
    "build_dataset": "registry",
    "register_dataset": "registry",
    "dataset_class": "registry",
    "NYUDv2Dataset": "nyud",
    "SyntheticDataset": "synthetic",
    "CityscapesDataset": "cityscapes",
    "SynthiaDataset": "synthia",
    "VKITTI2Dataset": "vkitti2",
    "ImageFolderDataset": "folder",
    "DenseDataModule": "datamodule",
    "AdaptationDataModule": "datamodule",
    "build_transforms": "transforms",
    "normals_from_depth": "geometry",
    "generate": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
