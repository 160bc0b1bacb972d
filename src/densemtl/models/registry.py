"""Build any model from its config through one name -> constructor table."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import did_you_mean
from ..tasks import parse_tasks
from .baselines import DeepLabMTL, PADNet, PADNetPlus, single_task
from .densemtl import DenseMTL, HardSharing, MultiTaskNet

ARCHS: dict[str, Callable[..., MultiTaskNet]] = {
    "densemtl": DenseMTL,
    "mtl": HardSharing,
    "deeplab": DeepLabMTL,
    "stl": single_task,
    "padnet": PADNet,
    "padnet_plus": PADNetPlus,
}


def register_arch(name: str, builder: Callable[..., MultiTaskNet], *,
                  replace: bool = False) -> None:
    """Make ``builder(tasks, **network options)`` available as ``network.arch: name``."""
    if not callable(builder):
        raise TypeError(f"register_arch expects a class or function, got {builder!r}")
    if name in ARCHS and ARCHS[name] is not builder and not replace:
        raise ValueError(f"an arch named '{name}' is already registered "
                         "(pass replace=True to replace it)")
    ARCHS[name] = builder


def build_model(config: Mapping[str, Any], pretrained: bool | None = None) -> MultiTaskNet:
    """Build a model from ``{"tasks": {...}, "network": {"arch": name, ...options}}``.

    ``pretrained`` overrides ``network.encoder.pretrained`` (False when weights come from a
    checkpoint). The returned model carries the (resolved) config in ``model.config``.
    """
    if "tasks" not in config or "network" not in config:
        raise ValueError("a model config needs 'tasks' and 'network' sections")
    network = copy.deepcopy(dict(config["network"]))
    arch = network.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"network.arch '{arch}' is not one of {sorted(ARCHS)}"
                         f"{did_you_mean(str(arch), ARCHS)}")
    if pretrained is not None:
        network["encoder"] = {**network.get("encoder", {}), "pretrained": pretrained}
    tasks = parse_tasks(config["tasks"])
    try:
        model = ARCHS[arch](tasks, **network)
    except TypeError as exc:
        raise ValueError(f"network options for arch '{arch}': {exc}") from exc
    model.config = {"tasks": {t: {"channels": c} for t, c in tasks.items()},
                    "network": {"arch": arch, **network}}
    return model


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The ``model`` section (tasks + network) of a YAML config file (plain or LightningCLI)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as f:
        cfg = yaml.safe_load(f) or {}
    section = cfg.get("model", cfg)
    if isinstance(section, Mapping) and "init_args" in section:  # LightningCLI config
        section = section["init_args"]
    if not isinstance(section, Mapping) or "network" not in section or "tasks" not in section:
        raise ValueError(f"{path}: expected a 'model' section with 'tasks' and 'network'")
    return {"tasks": section["tasks"], "network": section["network"]}
