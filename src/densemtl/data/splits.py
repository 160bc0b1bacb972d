"""Train/val splits for datasets without official ones.

A split is made *once* from the sorted list of sample ids and a seed: one permutation, whose
first ``round((1 - val_fraction) N)`` entries are ``train`` and the rest ``val``. Train and val
are therefore disjoint by construction and together are the whole set (``all``). The official
code's leak (val drawn from a second, different shuffle) cannot happen. A JSON split file
``{"train": [...], "val": [...]}`` can pin the lists instead (e.g. to keep a split stable when files
are added); its lists are checked for overlap and for ids that do not exist.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..io import DataError, read_json, require_file

RANDOM_SPLITS = ("train", "val", "all")


def random_split(
    ids: Sequence[str], split: str, val_fraction: float = 0.2, seed: int = 0
) -> list[str]:
    """The ``split`` part of ``ids`` (``train``, ``val`` or ``all``), in sorted order."""
    if split not in RANDOM_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {RANDOM_SPLITS}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError("sample ids are not unique")
    if split == "all":
        return ordered
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_train = len(ordered) - round(val_fraction * len(ordered))
    chosen = perm[:n_train] if split == "train" else perm[n_train:]
    return [ordered[i] for i in sorted(chosen)]


def split_from_file(path: str | os.PathLike[str], ids: Sequence[str], split: str) -> list[str]:
    """The ``split`` list of a JSON split file, checked against the available ``ids``."""
    spec = read_json(path)
    if not isinstance(spec, dict) or not all(isinstance(v, list) for v in spec.values()):
        raise DataError(f"{path}: a split file maps split names to lists of ids")
    if split == "all":
        return sorted(ids)
    if split not in spec:
        raise DataError(f"{path}: no split {split!r} (has {sorted(spec)})")
    names = sorted(spec)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = set(spec[a]) & set(spec[b])
            if common:
                raise DataError(
                    f"{path}: splits {a!r} and {b!r} share {len(common)} ids, "
                    f"e.g. {sorted(common)[:3]}"
                )
    chosen = [str(x) for x in spec[split]]
    unknown = sorted(set(chosen) - set(ids))
    if unknown:
        raise DataError(
            f"{path}: split {split!r} names {len(unknown)} ids with no files, e.g. {unknown[:3]}"
        )
    return chosen


def read_id_list(path: str | os.PathLike[str]) -> list[str]:
    """One id per line (blank lines skipped), as in NYUDv2's ``gt_sets/<split>.txt``."""
    text = require_file(path).read_text(encoding="utf-8")
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate ids")
    return ids
