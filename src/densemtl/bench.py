"""``densemtl bench``: time full training steps and inference of any model configuration.

A training step is what the paper's recipe runs: forward, the paper's losses (its weights for the
task set), backward, global gradient clipping at 10, Adam with the two parameter groups.
Inputs and labels are random (valid values). Prints a table and, with ``--json``, one JSON
object as the last line (``s_per_iter_median``, ``img_per_s``, ``peak_mem_MiB``, phases, ...).

``--weighting`` times the step of a multi-task weighting method instead of the fixed-weight sum
(a gradient aggregation: one backward per task to the encoder's outputs, the per-task encoder
Jacobian, the aggregation); a comma-separated list runs each method in its own process (so the
peak memory is that method's) and prints a table against ``fixed``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .losses import MultiTaskLoss, paper_weights
from .models import build_model
from .tasks import get_task, parse_tasks
from .weighting import WEIGHTINGS, build_weighting

DECODERS = {"paper": [64, 128, 128, 256, 256], "slim": [16, 32, 32, 64, 64]}
PRECISIONS = ("fp32", "fp32-strict", "tf32", "bf16")


def build_parser(prog: str = "densemtl bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="semseg,depth,normals", help="comma-separated task list")
    p.add_argument("--classes", type=int, default=16,
                   help="output channels of the tasks that need them: classes (default 16)")
    p.add_argument("--arch", default="densemtl", help="registry arch (default densemtl)")
    p.add_argument("--backbone", default="resnet101", help="encoder name (default resnet101)")
    p.add_argument("--no-dilation", action="store_true",
                   help="encoder at stride 32 (the official code cannot dilate ResNet-18/34)")
    p.add_argument("--decoder", choices=sorted(DECODERS), default="paper",
                   help="decoder widths: paper [64..256] or slim [16..64]")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (PyTorch's defaults: TF32 convolutions, fp32 matmuls), "
                        "fp32-strict (no TF32 at all), tf32 (TF32 convolutions and matmuls) "
                        "or bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--attention", choices=("sdpa", "explicit"), default="sdpa")
    p.add_argument("--no-fused-upsample", action="store_true",
                   help="upsample before the decoder convs (the reference path)")
    p.add_argument("--no-batched-pairs", action="store_true",
                   help="loop over the task pairs of the exchange block (the reference path)")
    p.add_argument("--checkpoint-exchange", action="store_true",
                   help="recompute the exchange block in backward (less memory, more compute)")
    p.add_argument("--reference", action="store_true",
                   help="all reference paths: explicit attention, no fused upsampling, "
                        "pair loop (what the official implementation computes)")
    p.add_argument("--mode", choices=("train", "infer", "both"), default="train")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--weighting", default="fixed",
                   help="multi-task weighting method of the training step (default fixed), or "
                        f"a comma-separated list to compare; one of {', '.join(WEIGHTINGS)}")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    spec = {t: ({"channels": args.classes} if get_task(t).default_channels is None else None)
            for t in tasks}
    fused = not (args.no_fused_upsample or args.reference)
    network: dict[str, Any] = {
        "arch": args.arch,
        "encoder": {"name": args.backbone, "pretrained": False,
                    "dilated": not args.no_dilation},
        "decoder": {"num_ch_dec": DECODERS[args.decoder], "fused_upsample": fused},
    }
    if args.arch == "densemtl":
        network["exchange"] = {
            "attention": "explicit" if args.reference else args.attention,
            "batched": not (args.no_batched_pairs or args.reference),
            "checkpoint": bool(args.checkpoint_exchange)}
    return {"tasks": spec, "network": network}


def random_batch(tasks: dict[str, int], b: int, h: int, w: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """A random image and valid random labels of every task (``{task: channels}``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = {"image": torch.rand(b, 3, h, w, generator=g)}
    for name, channels in tasks.items():
        task = get_task(name)
        batch[task.label_key] = task.random_label(b, h, w, channels, g)
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call after ``warmup`` calls; peak memory is counted from the first timed call
    (cuDNN's algorithm search during warm-up can take far more workspace than training does)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision != "fp32-strict"
    torch.manual_seed(0)
    cfg = model_config(args)
    model = build_model(cfg).to(device)
    tasks = parse_tasks(cfg["tasks"])
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    forward = torch.compile(model) if args.compile else model
    batch = random_batch(tasks, args.batch, args.height, args.width, device)
    batch["image"] = batch["image"].contiguous(memory_format=fmt)
    criterion = MultiTaskLoss(list(tasks), weights=paper_weights(tasks), scales=(0, 1)).to(device)
    enc = {id(p) for p in model.shared_module().parameters()}
    optimizer = torch.optim.Adam(
        [{"params": [p for p in model.parameters() if id(p) in enc], "lr": 2e-4},
         {"params": [p for p in model.parameters() if id(p) not in enc], "lr": 3e-4}],
        betas=(0.9, 0.98))
    bf16 = args.precision == "bf16"
    weighting = build_weighting(args.weighting, list(tasks)).to(device)
    if weighting.optimised_parameters():
        optimizer.add_param_group({"params": weighting.optimised_parameters(), "lr": 3e-4})

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else \
            contextlib.nullcontext()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if weighting.uses_gradients:
            with autocast():
                out, features = model.forward_with_features(batch["image"])
            values = criterion.weighted(criterion(out, batch))
            weighting.backward(values, features, model.shared_parameters(),
                               model.task_parameters())
        else:
            with autocast():
                out = forward(batch["image"])
            terms = criterion(out, batch)
            loss = terms["total"] if weighting.linear else \
                weighting.combine(criterion.weighted(terms))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if weighting.needs_values_after_step:  # FAMO: the batch again, without gradients
            with torch.no_grad(), autocast():
                weighting.after_step(criterion.weighted(criterion(forward(batch["image"]),
                                                                  batch)))

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads",
        "torch": torch.__version__, "tasks": list(tasks), "arch": args.arch,
        "backbone": args.backbone, "dilated": not args.no_dilation, "decoder": args.decoder,
        "height": args.height, "width": args.width, "batch": args.batch,
        "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile,
        "attention": cfg["network"].get("exchange", {}).get("attention"),
        "fused_upsample": cfg["network"]["decoder"]["fused_upsample"],
        "batched_pairs": cfg["network"].get("exchange", {}).get("batched"),
        "checkpoint_exchange": cfg["network"].get("exchange", {}).get("checkpoint"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weighting": weighting.name,
        "weighting_kind": "gradient" if weighting.uses_gradients else "loss",
    }
    if args.mode in ("train", "both"):
        model.train()
        times = _timed(train_step, device, args.warmup, args.iters)
        med = statistics.median(times)
        result.update({"s_per_iter_median": med, "s_per_iter_min": min(times),
                       "img_per_s": args.batch / med, "peak_mem_MiB": _peak_mib(device)})
        if weighting.name == "fixed":
            result["phases_s"] = phase_split(forward, criterion, optimizer, model, batch,
                                             autocast, device, max(2, args.iters // 2))
    if args.mode in ("infer", "both"):
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast():
                forward(batch["image"])

        times = _timed(infer, device, args.warmup, args.iters)
        med = statistics.median(times)
        result.update({"infer_s_per_iter_median": med, "infer_img_per_s": args.batch / med,
                       "infer_peak_mem_MiB": _peak_mib(device)})
        if args.mode == "infer":
            result.update({"s_per_iter_median": med, "img_per_s": args.batch / med,
                           "peak_mem_MiB": result["infer_peak_mem_MiB"]})
    return result


def phase_split(forward, criterion, optimizer, model, batch, autocast, device,
                iters: int) -> dict[str, float]:
    """Median seconds of forward / loss / backward / optimizer (clip + step), synchronised."""
    phases: dict[str, list[float]] = {"forward": [], "loss": [], "backward": [], "optimizer": []}
    for _ in range(iters):
        t = [time.perf_counter()]
        with autocast():
            out = forward(batch["image"])
        _sync(device)
        t.append(time.perf_counter())
        loss = criterion(out, batch)["total"]
        _sync(device)
        t.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        _sync(device)
        t.append(time.perf_counter())
        for name, a, b in zip(phases, t, t[1:]):
            phases[name].append(b - a)
    return {k: statistics.median(v) for k, v in phases.items()}


def format_table(r: dict[str, Any]) -> str:
    rows = [("device", r["device"]), ("model", f"{r['arch']} {'/'.join(r['tasks'])}, "
             f"{r['backbone']}, {r['decoder']} decoder, {r['parameters']:,} parameters"),
            ("input", f"{r['batch']} x 3 x {r['height']} x {r['width']}, {r['precision']}"
             f"{', channels_last' if r['channels_last'] else ''}"
             f"{', compiled' if r['compile'] else ''}"),
            ("paths", f"attention {r['attention']}, fused upsample {r['fused_upsample']}, "
             f"batched pairs {r['batched_pairs']}, checkpointed exchange "
             f"{r['checkpoint_exchange']}"),
            ("weighting", f"{r['weighting']} ({r['weighting_kind']})")]
    if "s_per_iter_min" in r:
        rows += [("train s/iter (median)", f"{r['s_per_iter_median']:.4f}"),
                 ("train images/s", f"{r['img_per_s']:.2f}"),
                 ("peak memory (MiB)", f"{r['peak_mem_MiB']:.0f}")]
    if "phases_s" in r:
        rows += [("phases (s)", ", ".join(f"{k} {v:.4f}" for k, v in r["phases_s"].items()))]
    if "infer_s_per_iter_median" in r:
        rows += [("inference s/iter (median)", f"{r['infer_s_per_iter_median']:.4f}"),
                 ("inference images/s", f"{r['infer_img_per_s']:.2f}"),
                 ("inference peak memory (MiB)", f"{r['infer_peak_mem_MiB']:.0f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def compare_weightings(argv: list[str], names: list[str], as_json: bool) -> int:
    """Run one ``bench --weighting <name>`` process per method; print the cost table."""
    base = [a for i, a in enumerate(argv) if a != "--json" and not a.startswith("--weighting")
            and not (i > 0 and argv[i - 1] == "--weighting")]
    if "fixed" not in names:
        names = ["fixed", *names]
    results = []
    for name in names:
        cmd = [sys.executable, "-m", "densemtl", "bench", *base, "--weighting", name, "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        lines = proc.stdout.strip().splitlines()
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or lines or ["failed"])[-1]
            results.append({"weighting": name, "error": err})
            print(f"{name}: {err}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1]))
        print(f"{name}: {results[-1].get('s_per_iter_median', float('nan')):.3f} s/step",
              file=sys.stderr)
    print(weighting_table(results))
    if as_json:
        print(json.dumps(results))
    return 0 if all("error" not in r for r in results) else 1


def weighting_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: seconds and peak memory per training step, against fixed weights."""
    ref = next((r for r in results if r.get("weighting") == "fixed" and "error" not in r), None)
    lines = ["| weighting | kind | s/step (median) | x fixed | peak MiB | x fixed |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['weighting']} | - | {r['error']} | | | |")
            continue
        t, m = r["s_per_iter_median"], r["peak_mem_MiB"]
        rt = f"{t / ref['s_per_iter_median']:.2f}" if ref else "-"
        rm = f"{m / ref['peak_mem_MiB']:.2f}" if ref else "-"
        lines.append(f"| {r['weighting']} | {r['weighting_kind']} | {t:.3f} | {rt} | {m:.0f} "
                     f"| {rm} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, command: str = "bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(f"densemtl {command}").parse_args(argv)
    names = [n.strip() for n in args.weighting.split(",") if n.strip()]
    for name in names:
        if name not in WEIGHTINGS and "." not in name:
            build_parser(f"densemtl {command}").error(
                f"--weighting: unknown method '{name}' (choose from {', '.join(WEIGHTINGS)})")
    if len(names) > 1:
        return compare_weightings(argv, names, args.json)
    try:
        result = run(args)
    except torch.OutOfMemoryError as exc:
        result = {"error": "out of memory", "detail": str(exc).splitlines()[0]}
        print("out of memory")
        if args.json:
            print(json.dumps(result))
        return 3
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
