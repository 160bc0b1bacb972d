"""Optimiser parameter groups (encoder vs the rest, as the paper) and per-step schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


def build_optimizer(net: nn.Module, extra: nn.Module | Iterable[nn.Parameter] | None,
                    cfg: Mapping[str, Any],
                    groups: Sequence[dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """Two groups: ``encoder`` (the network's shared trunk, ``MultiTaskNet.shared_module``) at
    ``backbone_lr`` and everything else (``extra`` too) at ``lr``,
    followed by ``groups`` (parameter groups with their own ``lr``, e.g. a pose network's).

    ``cfg``: ``name``, ``lr``, optional ``backbone_lr`` and the optimiser's keyword options
    (``betas``, ``weight_decay``, ``momentum``, ...).
    """
    cfg = dict(cfg)
    name = cfg.pop("name", "adam")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name '{name}' is not one of {sorted(OPTIMIZERS)}")
    if "lr" not in cfg:
        raise ValueError("optimizer config needs 'lr'")
    lr = float(cfg.pop("lr"))
    backbone_lr = float(cfg.pop("backbone_lr", lr))
    shared = getattr(net, "shared_module", None)
    encoder = shared() if callable(shared) else getattr(net, "encoder", None)
    enc_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    rest = [p for p in net.parameters() if id(p) not in enc_ids]
    if extra is not None:
        rest += list(extra.parameters() if isinstance(extra, nn.Module) else extra)
    groups = [{"params": [p for p in net.parameters() if id(p) in enc_ids], "lr": backbone_lr,
               "name": "encoder"},
              {"params": rest, "lr": lr, "name": "rest"}, *groups]
    groups = [g for g in groups if g["params"]]
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    try:
        return OPTIMIZERS[name](groups, **cfg)
    except TypeError as exc:
        raise ValueError(f"optimizer '{name}': {exc}") from exc


def _step(cfg: Mapping[str, Any], total: int) -> Callable[[int], float]:
    size, gamma = int(cfg.get("step_size", 30000)), float(cfg.get("gamma", 0.1))
    return lambda step: gamma ** (step // size)


def _poly(cfg: Mapping[str, Any], total: int) -> Callable[[int], float]:
    power = float(cfg.get("power", 0.9))
    return lambda step: max(0.0, 1.0 - step / max(total, 1)) ** power


def _cosine(cfg: Mapping[str, Any], total: int) -> Callable[[int], float]:
    floor = float(cfg.get("min_factor", 0.0))
    return lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total)
                                                                   / max(total, 1)))


SCHEDULES: dict[str, Callable[[Mapping[str, Any], int], Callable[[int], float]]] = {
    "step": _step,
    "poly": _poly,
    "cosine": _cosine,
}
_OPTIONS = {"step": {"step_size", "gamma"}, "poly": {"power"}, "cosine": {"min_factor"}}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any],
                    total_steps: int | float) -> LRScheduler | None:
    """A per-iteration ``LambdaLR``: ``step`` (x ``gamma`` every ``step_size`` iterations, the
    paper: 0.1 at 30k), ``poly`` ((1 - t/T)^power) or ``cosine``; ``none`` for constant.

    ``warmup`` iterations of linear warm-up may precede any schedule. ``total_steps`` (T) comes
    from the trainer unless the config sets it.
    """
    cfg = dict(cfg)
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name not in SCHEDULES:
        raise ValueError(f"scheduler name '{name}' is not one of {sorted(SCHEDULES)} or 'none'")
    unknown = set(cfg) - _OPTIONS[name] - {"name", "total_steps", "warmup"}
    if unknown:
        raise ValueError(f"scheduler '{name}': unknown option(s) {sorted(unknown)}")
    total = cfg.get("total_steps") or total_steps
    if not math.isfinite(float(total)):
        raise ValueError(f"scheduler '{name}' needs total_steps (the trainer has no max_steps)")
    factor = SCHEDULES[name](cfg, int(total))
    warmup = int(cfg.get("warmup", 0))

    def schedule(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        return ramp * factor(step)

    return LambdaLR(optimizer, schedule)
