"""``densemtl export``: a checkpoint to ONNX, one named output per task.

By default the outputs are the decoded scale-0 predictions of ``MultiTaskNet.predict``
(semseg class ids [B,H,W] int64, depth metres, unit normals, edge probabilities [B,C,H,W]),
named after the tasks; with ``raw`` the raw scale-0 head outputs, named ``<task>_raw`` (depth:
65536 / (100 D + 1)). The graph is traced with the TorchScript exporter.

With dynamic height/width the traced decoder keeps the upsampling path (same size, fused x2 or
interpolation) that each level took at the export size, so other sizes must give the same
feature-size ratios: use multiples of the encoder's largest stride (checked for the export
size).
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .io import write_atomic
from .models import load_model
from .models.densemtl import MultiTaskNet
from .tasks import get_task


class FinalOutputs(nn.Module):
    """Wraps a model so that it returns the scale-0 outputs as a tuple in task order.

    ``raw=False`` decodes each task to physical units (``get_task(name).decode``), as
    ``MultiTaskNet.predict`` does.
    """

    def __init__(self, model: MultiTaskNet, raw: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(model.tasks)
        self.raw = raw

    @property
    def output_names(self) -> list[str]:
        return [f"{t}_raw" for t in self.tasks] if self.raw else list(self.tasks)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.model(image)
        if self.raw:
            return tuple(out[t][0] for t in self.tasks)
        return tuple(get_task(t).decode(out[t][0].float()) for t in self.tasks)


def export_onnx(model: MultiTaskNet, path: str | Path, height: int, width: int,
                opset: int = 17, dynamic: bool = False, raw: bool = False) -> list[str]:
    """Write ``path`` (atomically); returns the output names, in task order.

    ``dynamic``: batch, height and width are dynamic axes (height and width: multiples of the
    encoder's largest stride, like the export size).
    """
    stride = model.max_stride
    if height % stride or width % stride:
        raise ValueError(f"export size {height}x{width} must be a multiple of the encoder's "
                         f"largest stride ({stride})")
    wrapper = FinalOutputs(model.eval(), raw=raw).eval()
    example = torch.rand(1, 3, height, width)
    names = wrapper.output_names
    axes = None
    if dynamic:  # batch and the last two axes of every output (class ids have no channel axis)
        with torch.no_grad():
            ranks = [out.dim() for out in wrapper(example)]
        axes = {name: {0: "batch", rank - 2: "height", rank - 1: "width"}
                for name, rank in zip(["image", *names], [4, *ranks])}
    graph = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every shape comparison of the decoder (fixed per level:
        # see the module docstring) and the TorchScript exporter about its deprecation.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(wrapper, (example,), graph, input_names=["image"],
                          output_names=names, dynamic_axes=axes, opset_version=opset,
                          dynamo=False, verbose=False)
    write_atomic(path, lambda f: f.write(graph.getbuffer()))
    return names


def main(argv: list[str], command: str = "export") -> int:
    parser = argparse.ArgumentParser(
        prog=f"densemtl {command}",
        description="Export a checkpoint to ONNX. Input 'image' [B,3,H,W] in [0,1]; one output "
                    "per task: the decoded scale-0 prediction (semseg class ids, depth metres, "
                    "unit normals, edge probabilities), or with --raw the raw head output "
                    "('<task>_raw'; depth: 65536/(100 D + 1)).")
    parser.add_argument("--ckpt", required=True, help="densemtl or Lightning checkpoint")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--height", type=int, default=None,
                        help="example input height (default: the training resolution kept in "
                             "the checkpoint, rounded up to the encoder's stride; else 256)")
    parser.add_argument("--width", type=int, default=None, help="example input width (as "
                                                                "--height; else 512)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dynamic", action="store_true",
                        help="dynamic batch and image size (multiples of the encoder's largest "
                             "stride; default: fixed to the example)")
    parser.add_argument("--raw", action="store_true",
                        help="raw head outputs instead of decoded predictions")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (default: refuse)")
    args = parser.parse_args(argv)
    try:
        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} exists already; pass --overwrite to replace it")
        model = load_model(args.ckpt)
        stride = model.max_stride
        trained = model.input_size or (256, 512)
        height = args.height or -(-trained[0] // stride) * stride
        width = args.width or -(-trained[1] // stride) * stride
        names = export_onnx(model, args.out, height, width, args.opset, args.dynamic, args.raw)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"densemtl {command}: {exc}", file=sys.stderr)
        return 1
    size = "dynamic Bx3xHxW" if args.dynamic else f"1x3x{height}x{width}"
    print(f"wrote {args.out} (input 'image' {size}, outputs {names})")
    return 0
