"""Before/after timing of each fast path, interleaved in one process.

Timing on a shared or throttled CPU drifts by tens of percent between runs, which hides
10-20% effects. This script builds one model per variant (same weights), then runs their
training steps round-robin, so every variant sees the same machine conditions, and prints the
median step time and speed-up of each variant against the reference paths.

    python benchmarks/compare_paths.py --backbone resnet18 --height 128 --width 256 --rounds 12

``--exchange-only`` times the exchange block alone (forward + backward of the first mTEB on
random decoder features of its size), where the exchange paths differ; the decoder-only
variants are then the same as the preceding row and are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from densemtl.bench import random_batch
from densemtl.losses import MultiTaskLoss, paper_weights
from densemtl.models import build_model
from densemtl.tasks import get_task, parse_tasks

VARIANTS: dict[str, dict[str, Any]] = {
    "reference (official computation)": {
        "decoder": {"fused_upsample": False},
        "exchange": {"attention": "explicit", "batched": False}},
    "+ SDPA attention": {
        "decoder": {"fused_upsample": False}, "exchange": {"attention": "sdpa", "batched": False}},
    "+ fused upsample+conv": {
        "decoder": {"fused_upsample": True}, "exchange": {"attention": "sdpa", "batched": False}},
    "+ batched pairs (default)": {
        "decoder": {"fused_upsample": True}, "exchange": {"attention": "sdpa", "batched": True}},
    "default + checkpointed exchange": {
        "decoder": {"fused_upsample": True},
        "exchange": {"attention": "sdpa", "batched": True, "checkpoint": True}},
    "default + channels_last": {
        "decoder": {"fused_upsample": True}, "exchange": {"attention": "sdpa", "batched": True},
        "channels_last": True},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="semseg,depth,normals")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--no-dilation", action="store_true")
    p.add_argument("--num-ch-dec", type=int, nargs=5, default=[64, 128, 128, 256, 256])
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--exchange-only", action="store_true",
                   help="time only the exchange block (forward + backward)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    spec = {t: ({"channels": 16} if get_task(t).default_channels is None else None)
            for t in args.tasks.split(",")}
    tasks = parse_tasks(spec)
    batch = random_batch(tasks, args.batch, args.height, args.width, device)
    criterion = MultiTaskLoss(list(tasks), weights=paper_weights(tasks))
    steps, state, seen = {}, None, []
    for name, v in VARIANTS.items():
        if args.exchange_only and (v["exchange"], v.get("channels_last")) in seen:
            continue
        seen.append((v["exchange"], v.get("channels_last")))
        torch.manual_seed(0)
        model = build_model({"tasks": spec, "network": {
            "arch": "densemtl",
            "encoder": {"name": args.backbone, "pretrained": False,
                        "dilated": not args.no_dilation},
            "decoder": {"num_ch_dec": args.num_ch_dec, **v["decoder"]},
            "exchange": v["exchange"]}})
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        fmt = torch.channels_last if v.get("channels_last") else torch.contiguous_format
        model = model.to(memory_format=fmt).train()
        image = batch["image"].contiguous(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), 1e-4, betas=(0.9, 0.98))

        def step(model=model, image=image, opt=opt) -> None:
            loss = criterion(model(image), batch)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()

        steps[name] = exchange_step(model, args, fmt) if args.exchange_only else step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.warmup + args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(next(iter(times.values())))
    print(f"{args.tasks}, {args.backbone}{'' if not args.no_dilation else ' (not dilated)'}, "
          f"decoder {args.num_ch_dec}, {args.batch}x3x{args.height}x{args.width}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds"
          f"{', exchange block only' if args.exchange_only else ''}")
    print(f"{'variant':<36} {'median s/step':>14} {'min':>8} {'speed-up':>9}")
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_s": med, "min_s": min(ts), "speedup": ref / med}
        print(f"{name:<36} {med:14.3f} {min(ts):8.3f} {ref / med:8.2f}x")
    if args.json:
        print(json.dumps(result))
    return 0


def exchange_step(model: torch.nn.Module, args: argparse.Namespace,
                  fmt: torch.memory_format) -> Callable[[], None]:
    """Forward + backward of the model's first exchange block on random features of its size."""
    stage = max(model.exchange, key=int)
    block = model.exchange[stage]
    scale = 2 ** int(stage)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.num_ch_dec[int(stage)], -(-args.height // scale),
             -(-args.width // scale))
    feats = {t: torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_()
             for t in model.tasks}
    weights = {t: torch.randn(shape, generator=g) for t in model.tasks}

    def step() -> None:
        block.zero_grad(set_to_none=True)
        for f in feats.values():
            f.grad = None
        out = block(feats)
        sum((out[t] * weights[t]).mean() for t in out).backward()

    return step


if __name__ == "__main__":
    sys.exit(main())
