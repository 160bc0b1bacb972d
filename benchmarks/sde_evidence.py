"""Semi-supervised depth (SDE) evidence on the built-in camera sequences.

Arms (same data, images, budget, backbone and schedule; evaluated on the val split, last
iterate, depth median-scaled per image in every arm):

* ``sde_densemtl`` / ``sde_mtl``: ``configs/synthetic/sde_{densemtl,mtl}_sd.yaml``: segmentation
  supervised, depth learned from frames -1 and +1 with the pose network; no depth label read;
* ``sde_densemtl_given_pose``: the same with the exact camera motion instead of the pose network
  (a control: what the photometric loss teaches the depth when the motion is right);
* ``sup_densemtl`` / ``sup_mtl``: ``configs/synthetic/{densemtl,mtl}_sd.yaml`` on the same
  images (``data/synthetic_seq``: frame 0 of the sequences is the plain benchmark), depth
  supervised, scored with the same median scaling;
* the constant predictor of each test report (per-image median of the ground truth after
  median scaling).

For the SDE arms it also scores the pose network against the exact poses (rotation error,
translation direction error, and the translation error after one global scale) next to the
"no motion" guess, and draws a row per sample: image, ground-truth depth, predicted depth
(median-scaled), photometric error of the warped neighbours. Resumable::

    python benchmarks/sde_evidence.py --seeds 0 1 2
    python benchmarks/sde_evidence.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densemtl.data.synthetic import SyntheticDataset
from densemtl.io import save_json, save_png, save_text
from densemtl.tasks import get_task
from densemtl.tasks.disp import DispMetric
from densemtl.training import SelfSupervisedDepthModule
from densemtl.training.selfsup import photometric_error, warp
from densemtl.viz import grid

ROOT = Path(__file__).resolve().parents[1]
DATA = "data/synthetic_seq"
SCALED = '{"max_depth": 20.0, "median_scaling": true}'
# the supervised twins get the SDE configs' budget (steps and batch size)
SAME_BUDGET = ["--trainer.max_steps", "1000", "--trainer.val_check_interval", "500",
               "--data.init_args.batch_size", "4"]
ARMS: dict[str, tuple[str, list[str]]] = {
    "sde_densemtl": ("configs/synthetic/sde_densemtl_sd.yaml", []),
    "sde_mtl": ("configs/synthetic/sde_mtl_sd.yaml", []),
    "sde_densemtl_given_pose": ("configs/synthetic/sde_densemtl_sd.yaml",
                                ["--model.init_args.pose", "given"]),
    "sup_densemtl": ("configs/synthetic/densemtl_sd.yaml",
                     ["--data.init_args.root", DATA, "--model.init_args.metrics",
                      f'{{"depth": {SCALED}}}', *SAME_BUDGET]),
    "sup_mtl": ("configs/synthetic/mtl_sd.yaml",
                ["--data.init_args.root", DATA, "--model.init_args.metrics",
                 f'{{"depth": {SCALED}}}', *SAME_BUDGET]),
}
STEPS = 1000  # every arm's budget
DEPTH = {"absRel": False, "sqRel": False, "rmse": False, "delta1": True}


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}_s{seed}"


def finished(d: Path, steps: int) -> bool:
    """Whether the run's last validation is at its final step (an interrupted run is not)."""
    last = d / "metrics" / "val-last.json"
    return last.is_file() and json.loads(last.read_text()).get("step", 0) >= steps


def run(out: Path, arm: str, seed: int, threads: int, steps: int | None) -> None:
    """Fit (resuming if interrupted), then test the last checkpoint."""
    d = run_dir(out, arm, seed)
    config, extra = ARMS[arm]
    common = ["--config", config, "--seed_everything", str(seed), "--data.init_args.seed",
              str(seed), "--trainer.default_root_dir", str(d),
              "--trainer.enable_progress_bar", "false", *extra]
    if steps:
        common += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval",
                   str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    d.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with (d / "fit.log").open("a") as log:
        if not finished(d, steps or STEPS):
            resume = ["--ckpt_path", "last"] if (d / "checkpoints" / "last.ckpt").is_file() else []
            subprocess.run([sys.executable, "-m", "densemtl", "fit", *common, *resume],
                           stdout=log, stderr=subprocess.STDOUT, env=env, check=True, cwd=ROOT)
        tested = d / "metrics.json"
        if not tested.is_file() or json.loads(tested.read_text()).get("step", 0) < (steps or STEPS):
            subprocess.run([sys.executable, "-m", "densemtl", "test", *common, "--ckpt_path",
                            str(d / "checkpoints" / "last.ckpt")], stdout=log,
                           stderr=subprocess.STDOUT, env=env, check=True, cwd=ROOT)
    for best in (d / "checkpoints").glob("best-*.ckpt"):  # selection is not used
        best.unlink()
    print(f"{arm} seed {seed}: {time.time() - start:.0f} s", flush=True)


def rotation_deg(R: torch.Tensor) -> torch.Tensor:
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))


@torch.no_grad()
def pose_and_figure(ckpt: Path, root: Path, figure: Path | None, rows: int = 4,
                    given: bool = False) -> dict[str, float]:
    """Pose errors of a checkpoint's pose network on the val sequences (and the figure, whose
    photometric errors warp with the exact motion when ``given``)."""
    module = SelfSupervisedDepthModule.load_from_checkpoint(str(ckpt), map_location="cpu")
    module.eval()
    ds = SyntheticDataset(root, "val", ["depth"], frames=[-1, 1])
    task = get_task(module.depth_task)
    rot, rot0, direction, t_pred, t_gt, pictures = [], [], [], [], [], []
    for i in range(len(ds)):
        s = ds[i]
        image, frames = s["image"][None], s["frames"][None]
        gt = s["poses"].double()
        pred = (gt.float() if module.pose_net is None  # pose: given (no pose network)
                else module.pose_net(image, frames, s["frame_offsets"])[0])
        pred = pred.double()
        rot.append(rotation_deg(pred[:, :3, :3].transpose(1, 2) @ gt[:, :3, :3]))
        rot0.append(rotation_deg(gt[:, :3, :3]))
        tp, tg = pred[:, :3, 3], gt[:, :3, 3]
        cos = (tp * tg).sum(-1) / (tp.norm(dim=-1) * tg.norm(dim=-1)).clamp_min(1e-12)
        direction.append(torch.rad2deg(torch.acos(cos.clamp(-1, 1))))
        t_pred.append(tp)
        t_gt.append(tg)
        if figure is not None and len(pictures) < rows:
            raw = task.decode(module(image)[module.depth_task][0])
            gt_depth = s["depth"][None]
            valid = gt_depth > 0
            depth = raw * gt_depth[valid].median() / raw[valid].median()  # shown median-scaled
            # warped with the depth at the network's own scale, which its motion matches
            errors = [photometric_error(warp(frames[:, k], raw, s["K"][None],
                                             (gt if given else pred)[None, k].float()),
                                        image)
                      for k in range(frames.shape[1])]
            err = torch.cat(errors, 1).amin(1)[0].numpy()
            colour = get_task("depth").colourise
            lo, hi = np.percentile(gt_depth[valid].numpy(), [2, 98])
            heat = np.clip(err / 0.3, 0, 1)
            pictures.append([
                (s["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                colour(gt_depth[0, 0].numpy(), None, (lo, hi)),
                colour(depth[0, 0].numpy(), None, (lo, hi)),
                (np.stack([heat, heat * 0.6, 1 - heat], -1) * 255).astype(np.uint8)])
    rot, rot0, direction = torch.cat(rot), torch.cat(rot0), torch.cat(direction)
    tp, tg = torch.cat(t_pred), torch.cat(t_gt)
    scale = float((tp * tg).sum() / (tp * tp).sum().clamp_min(1e-12))  # one least-squares scale
    if figure is not None and pictures:
        save_png(figure, grid(pictures, ("image", "depth (truth)", "depth (predicted, scaled)",
                                         "photometric error (0-0.3)")))
    return {"rotation_deg": float(rot.mean()), "rotation_deg_no_motion": float(rot0.mean()),
            "direction_deg": float(direction.mean()),
            "translation_cm": float((scale * tp - tg).norm(dim=-1).mean() * 100),
            "translation_cm_no_motion": float(tg.norm(dim=-1).mean() * 100),
            "scale": scale}


@torch.no_grad()
def constant_depth(root: Path) -> dict[str, float]:
    """The val scores of a constant depth: after per-image median scaling, every pixel of an
    image predicts the median of its ground truth (no training label is needed)."""
    metric = DispMetric(decoded=True, max_depth=20.0, median_scaling=True)
    ds = SyntheticDataset(root, "val", ["depth"])
    for i in range(len(ds)):
        gt = ds[i]["depth"][None]
        metric.update(torch.ones_like(gt), gt)
    return {k: float(v) for k, v in metric.compute().items()}


def load(out: Path, arm: str, seeds: list[int]) -> list[dict[str, Any]]:
    found = []
    for s in seeds:
        path = run_dir(out, arm, s) / "metrics.json"
        if path.is_file() and json.loads(path.read_text()).get("step", 0) >= STEPS:
            found.append(json.loads(path.read_text()))
    return found


def mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def table(out: Path, seeds: list[int], root: Path) -> str:
    head = ["arm", "seeds", "mIoU ↑", *(f"{m} {'↑' if hi else '↓'}" for m, hi in DEPTH.items())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    constant: list[float] = []
    for arm in ARMS:
        runs = load(out, arm, seeds)
        if not runs:
            continue
        depth = "disp" if arm.startswith("sde") else "depth"
        row = [arm, str(len(runs)), mean_sd([r["metrics"]["semseg/mIoU"] for r in runs],
                                           "{:.3f}")]
        row += [mean_sd([r["metrics"][f"{depth}/{m}"] for r in runs], "{:.3f}") for m in DEPTH]
        lines.append("| " + " | ".join(row) + " |")
        constant += [r["constant_predictor"]["semseg/mIoU"] for r in runs
                     if r.get("constant_predictor")]
    if constant and root.is_dir():
        depth = constant_depth(root)
        row = ["constant predictor", "-", f"{statistics.mean(constant):.3f}"]
        row += [f"{depth[m]:.3f}" for m in DEPTH]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pose_table(out: Path, seeds: list[int], root: Path) -> str:
    lines = ["| arm | seeds | rotation error (deg) | translation direction error (deg) | "
             "translation error after one scale (cm) | scale |", "|---|---|---|---|---|---|"]
    no_motion = None
    for arm in ("sde_densemtl", "sde_mtl"):  # the given-pose arm's pose network is unused
        results = []
        for s in seeds:
            d = run_dir(out, arm, s)
            cache, ckpt = d / "pose.json", d / "checkpoints" / "last.ckpt"
            if not cache.is_file() and ckpt.is_file() and finished(d, STEPS):
                figure = out / f"{arm}_s{s}_depth.png"
                save_json(cache, pose_and_figure(ckpt, root, figure))
            if cache.is_file():
                results.append(json.loads(cache.read_text()))
        if not results:
            continue
        no_motion = results[0]
        lines.append(f"| {arm} | {len(results)} | "
                     f"{mean_sd([r['rotation_deg'] for r in results], '{:.2f}')} | "
                     f"{mean_sd([r['direction_deg'] for r in results], '{:.1f}')} | "
                     f"{mean_sd([r['translation_cm'] for r in results], '{:.2f}')} | "
                     f"{mean_sd([r['scale'] for r in results], '{:.2f}')} |")
    if no_motion is not None:
        lines.append(f"| no motion (identity) | - | {no_motion['rotation_deg_no_motion']:.2f} | "
                     f"- | {no_motion['translation_cm_no_motion']:.2f} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sde_evidence")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="override every arm's max_steps")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    out = (ROOT / args.out).resolve()
    if not args.table_only:
        for seed in args.seeds:
            for arm in args.arms:
                run(out, arm, seed, args.threads, args.steps)
    root = ROOT / DATA
    text = (f"{table(out, args.seeds, root)}\n\nPose network on the val sequences (mean over "
            f"pairs and seeds):\n\n{pose_table(out, args.seeds, root)}\n")
    for s in args.seeds:  # the control's figure, warped with the exact motion
        d = run_dir(out, "sde_densemtl_given_pose", s)
        figure = out / f"sde_densemtl_given_pose_s{s}_depth.png"
        if not figure.is_file() and finished(d, STEPS):
            pose_and_figure(d / "checkpoints" / "last.ckpt", root, figure, given=True)
    save_text(out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
