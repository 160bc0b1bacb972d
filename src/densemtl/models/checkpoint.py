"""Saving and loading models (our own checkpoints and Lightning checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import save_torch
from .densemtl import MultiTaskNet
from .registry import build_model

FORMAT = "densemtl-model"
LIGHTNING_PREFIX = "net."  # attribute name of the network inside the LightningModule


def save_model(model: MultiTaskNet, path: str | Path, **extra: Any) -> None:
    """Write the model's config and weights (atomically)."""
    if not model.config:
        raise ValueError("model has no config; build it with densemtl.models.build_model")
    palette = getattr(model, "palette", None)
    size = getattr(model, "input_size", None)
    meta = {"class_names": getattr(model, "class_names", None),
            "palette": None if palette is None else np.asarray(palette).tolist(),
            "input_size": None if size is None else [int(v) for v in size]}
    save_torch(path, {"format": FORMAT, "config": model.config, "state_dict": model.state_dict(),
                 "densemtl": meta, **extra})


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> MultiTaskNet:
    """Load a model from a densemtl checkpoint or a Lightning checkpoint of our training module.

    The model is returned in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # memory-mapped: the weights are not held twice while the model is built
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a densemtl checkpoint")
    if ckpt.get("format") == FORMAT:
        config, state = ckpt["config"], ckpt["state_dict"]
    elif "hyper_parameters" in ckpt and "state_dict" in ckpt:
        hp = ckpt["hyper_parameters"]
        config = {"tasks": hp["tasks"], "network": hp["network"]}
        n = len(LIGHTNING_PREFIX)
        state = {k[n:]: v for k, v in ckpt["state_dict"].items() if k.startswith(LIGHTNING_PREFIX)}
    else:
        raise ValueError(f"{path}: not a densemtl checkpoint (no model config inside)")
    model = build_model(config, pretrained=False)
    model.load_state_dict(state)
    meta = ckpt.get("densemtl") or {}
    model.class_names = meta.get("class_names")
    model.palette = None if meta.get("palette") is None else np.asarray(meta["palette"], np.uint8)
    size = meta.get("input_size")
    if size is None:  # older Lightning checkpoints: the data module's resolution
        data = ckpt.get("datamodule_hyper_parameters") or {}
        if data.get("height") and data.get("width"):
            size = (data["height"], data["width"])
    model.input_size = None if size is None else (int(size[0]), int(size[1]))
    return model.eval()
