"""Adaptation evidence on the built-in benchmark: source only vs adapted (and a BN-only control).

Arms (all from ``configs/uda/``, identical budget, evaluated on the *target* val split, last
iterate -- no model selection on target labels):

* ``source``:  ``synthetic_a2b_sourceonly_sdn.yaml`` (lambda_adv 0: the target is never forwarded)
* ``adapted``: ``synthetic_a2b_densemtl_sdn.yaml`` (the paper's adversarial alignment)
* ``bnonly``:  the adapted config with lambda_adv 1e-9: the target batch still goes through the
  network in train mode (so BatchNorm statistics see both domains) and the discriminators train,
  but the adversarial gradient reaching the network is negligible. It separates the effect of
  the alignment from that of the shared BN statistics.

Resumable (a finished run is skipped, an interrupted one resumes from ``last.ckpt``)::

    python benchmarks/uda_evidence.py --seeds 0 1 2 --arms source adapted bnonly
    python benchmarks/uda_evidence.py --table-only
    python benchmarks/uda_evidence.py --gap --seeds 1 2   # source vs target val of last.ckpt
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

CONFIGS = {
    "source": ("configs/uda/synthetic_a2b_sourceonly_sdn.yaml", []),
    "adapted": ("configs/uda/synthetic_a2b_densemtl_sdn.yaml", []),
    "bnonly": ("configs/uda/synthetic_a2b_densemtl_sdn.yaml",
               ["--model.init_args.lambda_adv", "1e-9"]),
}
# (metric, higher is better, format)
COLUMNS = [("semseg/mIoU", True, "{:.3f}"), ("semseg/pixAcc", True, "{:.3f}"),
           ("depth/rmse", False, "{:.3f}"), ("depth/absRel", False, "{:.3f}"),
           ("depth/delta1", True, "{:.3f}"), ("normals/mean", False, "{:.2f}"),
           ("normals/within30", True, "{:.3f}")]


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}_s{seed}"


def run(out: Path, arm: str, seed: int, threads: int) -> None:
    d = run_dir(out, arm, seed)
    final = d / "metrics" / "val-last.json"
    if final.is_file():
        return
    config, extra = CONFIGS[arm]
    resume = ["--ckpt_path", "last"] if (d / "checkpoints" / "last.ckpt").is_file() else []
    cmd = [sys.executable, "-m", "densemtl", "fit", "--config", config,
           "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
           "--trainer.default_root_dir", str(d), "--trainer.enable_progress_bar", "false",
           *extra, *resume]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    d.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with (d / "fit.log").open("a") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    print(f"{arm} seed {seed}: {time.time() - start:.0f} s", flush=True)
    for best in (d / "checkpoints").glob("best-*.ckpt"):  # 200 MB each, selection is not used
        best.unlink()


def table(out: Path, arms: list[str], seeds: list[int]) -> str:
    head = ["arm", "seeds"] + [f"{m} {'↑' if hi else '↓'}" for m, hi, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        found = [json.loads(p.read_text())["metrics"] for s in seeds
                 if (p := run_dir(out, arm, s) / "metrics" / "val-last.json").is_file()]
        if not found:
            continue
        row = [arm, str(len(found))]
        for metric, _, fmt in COLUMNS:
            values = [m[metric] for m in found]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            row.append(f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def gap(out: Path, arms: list[str], seeds: list[int]) -> str:
    """Each run's ``last.ckpt`` on the source (style a) and the target (style b) val split."""
    import lightning as L

    from densemtl.data import DenseDataModule
    from densemtl.training.uda import AdaptationModule

    keys = ("semseg/mIoU", "depth/rmse", "normals/mean")
    lines = ["| arm | seed | " + " | ".join(f"{k} a -> b" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for arm in arms:
        for seed in seeds:
            ckpt = run_dir(out, arm, seed) / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                continue
            module = AdaptationModule.load_from_checkpoint(ckpt, map_location="cpu")
            module.grid_samples = 0
            data = module.hparams.get("data") or {}
            res = {}
            for dom in ("a", "b"):
                dm = DenseDataModule("synthetic", f"data/synthetic_{dom}", list(module.net.tasks),
                                     data.get("height", 64), data.get("width", 80),
                                     batch_size=25, num_workers=0)
                trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                    enable_model_summary=False, default_root_dir=str(out / "gap"))
                res[dom] = trainer.validate(module, datamodule=dm, verbose=False)[0]
            lines.append(f"| {arm} | {seed} | " + " | ".join(
                f"{res['a'][f'val/{k}']:.3f} -> {res['b'][f'val/{k}']:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/uda/evidence")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["source", "adapted", "bnonly"],
                   choices=sorted(CONFIGS))
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--gap", action="store_true",
                   help="only evaluate each run's last.ckpt on the source and target val splits "
                        "(64x80, data/synthetic_a and data/synthetic_b)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.gap:
        print(gap(out, args.arms, args.seeds))
        return 0
    if not args.table_only:
        for seed in args.seeds:
            for arm in args.arms:
                run(out, arm, seed, args.threads)
    print(table(out, args.arms, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
