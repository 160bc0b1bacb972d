"""Helpers shared by the model tests (tiny, fast models on the CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from densemtl.models import build_model

SLIM = [8, 16, 16, 32, 32]
TASKS_SD = {"semseg": {"channels": 5}, "depth": None}
TASKS_SDN = {**TASKS_SD, "normals": None}
TASKS_SDNE = {**TASKS_SDN, "edges": None}


def tiny(tasks: dict | None = None, arch: str = "densemtl", **network: Any) -> nn.Module:
    """ResNet-18, slim decoders, no pretrained weights."""
    network.setdefault("encoder", {"name": "resnet18", "pretrained": False})
    if arch in ("densemtl", "mtl", "padnet_plus"):
        network.setdefault("decoder", {"num_ch_dec": SLIM})
    return build_model({"tasks": tasks or TASKS_SDN, "network": {"arch": arch, **network}})


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial alphas/betas and BatchNorm statistics, so no branch is an exact identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def scalar_loss(out: dict[str, dict[int, torch.Tensor]]) -> torch.Tensor:
    """A loss that depends on every output element (fixed random weights)."""
    g = torch.Generator().manual_seed(123)
    total = torch.zeros(())
    for task in out.values():
        for y in task.values():
            total = total.to(y.device) + (y * torch.randn(y.shape, generator=g).to(y.device)).mean()
    return total


def same_outputs(fast: nn.Module, ref: nn.Module, x: torch.Tensor, atol: float = 1e-5,
                 rtol: float = 1e-5) -> tuple[dict, dict]:
    """Run both models with the same dropout masks, assert equal outputs, return them."""
    torch.manual_seed(1)
    out_fast = fast(x)
    torch.manual_seed(1)
    out_ref = ref(x)
    for t in out_ref:
        for s in out_ref[t]:
            assert torch.allclose(out_fast[t][s], out_ref[t][s], atol=atol, rtol=rtol), (t, s)
    return out_fast, out_ref


def synth_tree(root: Path, train: int, val: int, seed: int) -> Path:
    """A built-in benchmark tree of 48x64 scenes in ``root`` (via ``densemtl synth``)."""
    from densemtl.cli import main as cli

    assert cli(["synth", "--out", str(root), "--train", str(train), "--val", str(val),
                "--height", "48", "--width", "64", "--seed", str(seed), "--quiet",
                "--workers", "1"]) == 0
    return root
