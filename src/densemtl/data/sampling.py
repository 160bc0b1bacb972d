"""Samplers whose order depends only on (seed, epoch) and that shard across processes.

Training order: a permutation drawn from ``seed + epoch`` (Lightning calls ``set_epoch``), so a
run resumed at an epoch boundary sees exactly the batches of an uninterrupted run. Under
distributed training each process takes every ``world``-th index of the (padded) permutation,
like ``DistributedSampler``. Evaluation order is sequential and *not* padded: every sample is
scored exactly once, so metrics summed over processes equal a single-process evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Seeded, epoch-dependent, process-sharded sampler (see the module docstring).

    ``shuffle=False`` with ``pad=False`` is the evaluation sampler; training uses
    ``shuffle=True, pad=True`` so that every process runs the same number of steps.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, pad: bool | None = None) -> None:
        self.size = int(size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.pad = shuffle if pad is None else pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        rank, world = _rank_world()
        if self.pad and world > 1 and order and len(order) % world:
            extra = world - len(order) % world
            order += (order * (extra // len(order) + 1))[:extra]
        return order[rank::world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        rank, world = _rank_world()
        if self.pad:
            return -(-self.size // world)
        return len(range(rank, self.size, world))
