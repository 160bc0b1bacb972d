"""Bytes saved for backward by one training forward, per module group: explicit attention, SDPA,
and SDPA with the exchange block checkpointed (recomputed in backward).

Peak RSS on a CPU mixes allocator caching with what training really keeps; the activations
saved for backward are what grows with the input and what the GPU has to hold. This counts them
exactly (``torch.autograd.graph.saved_tensors_hooks``, each storage once) for the encoder, the
decoders and the exchange block, and the number of attention tokens per pair. Machine
independent, so it runs on a CPU::

    python benchmarks/saved_memory.py --height 512 --width 1024 --batch 2 --backbone resnet18
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from densemtl.models import build_model


def saved_bytes(model: nn.Module, image: torch.Tensor) -> tuple[dict[str, int], list[int]]:
    """Saved-for-backward bytes per top-level group, and the token counts seen by attention."""
    seen: set[int] = set()
    groups: dict[str, int] = {}
    stack: list[str] = []
    tokens: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            group = stack[-1] if stack else "other"
            groups[group] = groups.get(group, 0) + t.untyped_storage().nbytes()
        return t

    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        group = name.split(".")[0]
        handles.append(module.register_forward_pre_hook(
            lambda *_, g=group: stack.append(g)))
        handles.append(module.register_forward_hook(lambda *_: stack.pop() and None))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *a, **kw):
        tokens.append(q.shape[-2])
        return sdpa(q, k, v, *a, **kw)

    torch.nn.functional.scaled_dot_product_attention = counting_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(image)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    del out
    return groups, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="semseg,depth,normals")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    image = torch.rand(args.batch, 3, args.height, args.width)
    tasks = {t: ({"channels": 16} if t == "semseg" else None) for t in args.tasks.split(",")}
    rows = []
    variants = {"explicit": {"attention": "explicit"}, "sdpa": {"attention": "sdpa"},
                "sdpa+ckpt": {"attention": "sdpa", "checkpoint": True}}
    for impl, exchange in variants.items():
        model = build_model({"tasks": tasks, "network": {
            "arch": "densemtl", "encoder": {"name": args.backbone, "pretrained": False},
            "exchange": exchange}}, pretrained=False).train()
        groups, tokens = saved_bytes(model, image)
        rows.append((impl, groups, tokens))
        del model
    names = sorted({g for _, groups, _ in rows for g in groups})
    print(f"{args.tasks}, {args.backbone}, {args.batch}x3x{args.height}x{args.width}, "
          f"saved-for-backward MiB by module group")
    print(f"{'variant':<10}" + "".join(f"{n:>14}" for n in names) + f"{'total':>12}")
    for impl, groups, _ in rows:
        cells = "".join(f"{groups.get(n, 0) / 2**20:14.1f}" for n in names)
        print(f"{impl:<10}{cells}{sum(groups.values()) / 2**20:12.1f}")
    explicit_tokens = sorted(set(rows[1][2])) or ["?"]
    print(f"attention tokens per query map: {explicit_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
