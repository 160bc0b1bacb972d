"""``densemtl export``: a checkpoint to ONNX (raw scale-0 outputs, one named output per task)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from .models import load_model
from .models.densemtl import MultiTaskNet


class FinalOutputs(nn.Module):
    """Wraps a model so that it returns the scale-0 raw outputs as a tuple in task order."""

    def __init__(self, model: MultiTaskNet) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(model.tasks)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.model(image)
        return tuple(out[t][0] for t in self.tasks)


def export_onnx(model: MultiTaskNet, path: str | Path, height: int, width: int,
                opset: int = 17, dynamic: bool = False) -> list[str]:
    """Write ``path``; returns the output names (the task names, raw head parametrisation)."""
    wrapper = FinalOutputs(model.eval()).eval()
    example = torch.rand(1, 3, height, width)
    names = list(wrapper.tasks)
    axes = None
    if dynamic:
        axes = {"image": {0: "batch", 2: "height", 3: "width"},
                **{n: {0: "batch", 2: "height", 3: "width"} for n in names}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=["image"],
                          output_names=names, dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    tmp.replace(path)
    return names


def main(argv: list[str], command: str = "export") -> int:
    parser = argparse.ArgumentParser(
        prog=f"densemtl {command}",
        description="Export a checkpoint to ONNX. Input 'image' [B,3,H,W] in [0,1]; one output "
                    "per task with the raw scale-0 head output (depth: 65536/(100 D + 1)).")
    parser.add_argument("--ckpt", required=True, help="densemtl or Lightning checkpoint")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--height", type=int, default=256, help="example input height")
    parser.add_argument("--width", type=int, default=512, help="example input width")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dynamic", action="store_true",
                        help="dynamic batch and image size (default: fixed to the example)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.ckpt)
        names = export_onnx(model, args.out, args.height, args.width, args.opset, args.dynamic)
    except (FileNotFoundError, ValueError) as exc:
        print(f"densemtl {command}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (input 'image' 1x3x{args.height}x{args.width}, outputs {names})")
    return 0
