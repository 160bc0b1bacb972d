"""Built-in benchmark study: STL vs MTL vs PAD-Net+ vs DenseMTL and its ablations.

Every run gets the same budget (data, steps, batch, backbone, optimiser, schedule); only the
method differs. Runs are resumable: a run whose ``metrics.json`` exists is skipped. At the end a
table (mean +- std over seeds), ``results.json`` and a delta_m bar chart are written.

    python benchmarks/study.py --quick               # smoke version (< 10 minutes on 2 cores)
    python benchmarks/study.py --out runs/study      # the full grid (see docs/results-synthetic.md)
    python benchmarks/study.py --weightings          # weighting methods at 5x the budget, with
                                                     # the gradient-conflict measurement

``--weightings`` trains STL, MTL and DenseMTL (S, D, N, E) with several multi-task weighting
methods (``--methods``) for ``--steps`` (default 1000 there), logging the cosine similarity of
the task gradients on the shared encoder every 25 steps (``densemtl.training.GradientConflict``),
and draws it (``conflict.png``). Runs go in ``--priority`` order, so a cut-short grid has
finished the most informative runs first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from densemtl.losses import paper_weights
from densemtl.tasks import get_task

TASKS_ALL = ["semseg", "depth", "normals", "edges"]
WEIGHTS = paper_weights(TASKS_ALL)  # the paper's SDNE weights, for every task set of the grid
MAIN = {t: (get_task(t).main_metric, get_task(t).higher_is_better(get_task(t).main_metric))
        for t in TASKS_ALL}  # (metric, higher is better), as the tasks declare them

# name -> (network options without encoder/decoder, description)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "stl": ({"arch": "mtl"}, "single task, same encoder and padnet+ decoder"),
    "mtl": ({"arch": "mtl"}, "hard sharing, padnet+ decoders, no exchange"),
    "padnet_plus": ({"arch": "padnet_plus"}, "PAD-Net+ (SA distillation at H/4)"),
    "densemtl_sa": ({"arch": "densemtl", "exchange": {"sa": True, "sxtam": False}},
                    "DenseMTL, self-attention only"),
    "densemtl_sxtam": ({"arch": "densemtl", "exchange": {"sa": False, "sxtam": True}},
                       "DenseMTL, SxTAM only"),
    "densemtl": ({"arch": "densemtl", "exchange": {"sa": True, "sxtam": True}},
                 "DenseMTL, SA + SxTAM (the paper)"),
}


def grid(quick: bool) -> list[tuple[str, list[str]]]:
    """(method, tasks) pairs of the study."""
    runs = [("stl", [t]) for t in TASKS_ALL]
    runs += [(m, TASKS_ALL) for m in ("mtl", "padnet_plus", "densemtl_sa", "densemtl_sxtam",
                                      "densemtl")]
    if not quick:
        runs += [(m, ["semseg", "depth"]) for m in ("mtl", "densemtl")]
    return runs


def run_name(method: str, tasks: list[str], weighting: str = "fixed") -> str:
    suffix = tasks[0] if method == "stl" else "".join(get_task(t).short for t in tasks).lower()
    return f"{method}_{suffix}" + ("" if weighting == "fixed" else f"_{weighting}")


def weighting_jobs(args: argparse.Namespace) -> list[tuple[str, list[str], int, str]]:
    """(method, tasks, seed, weighting) of the weighting study, most informative first: the
    MTL-vs-STL question with fixed weights and the first gradient method, seed by seed, then
    DenseMTL, then the other methods."""
    seeds = range(args.seeds)
    first, others = args.methods[:2], args.methods[2:]
    jobs: list[tuple[str, list[str], int, str]] = []
    for seed in seeds:
        jobs += [("stl", [t], seed, "fixed") for t in TASKS_ALL]
        jobs += [("mtl", TASKS_ALL, seed, w) for w in first]
        if seed == 0:
            jobs += [("densemtl", TASKS_ALL, 0, w) for w in first]
    for seed in seeds:
        jobs += [("mtl", TASKS_ALL, seed, w) for w in others]
        jobs += [("densemtl", TASKS_ALL, seed, w) for w in (first if seed else []) + others]
    return jobs


def make_config(args: argparse.Namespace, method: str, tasks: list[str], seed: int,
                run_dir: Path, weighting: str = "fixed") -> dict[str, Any]:
    network = json.loads(json.dumps(METHODS[method][0]))
    network["encoder"] = {"name": args.backbone, "pretrained": False}
    network["decoder"] = {"num_ch_dec": args.decoder}
    callbacks = [] if method == "stl" or not args.conflict_every else [
        {"class_path": "densemtl.training.GradientConflict",
         "init_args": {"every_n_steps": args.conflict_every}}]
    spec = {t: {"channels": 10} if t == "semseg" else ({"channels": 2} if t == "edges" else {})
            for t in tasks}
    return {
        "seed_everything": seed,
        "trainer": {"default_root_dir": str(run_dir), "accelerator": "cpu", "devices": 1,
                    "max_steps": args.steps, "val_check_interval": args.steps,
                    "check_val_every_n_epoch": None, "log_every_n_steps": 25,
                    "num_sanity_val_steps": 0, "gradient_clip_val": 10.0,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    **({"callbacks": callbacks} if callbacks else {})},
        "model": {"class_path": "densemtl.training.MultiTaskModule", "init_args": {
            "tasks": spec, "network": network,
            "loss": {"weights": {t: (1 if method == "stl" else WEIGHTS[t]) for t in tasks},
                     "scales": [0, 1]},
            "metrics": {k: v for k, v in {
                "depth": {"max_depth": 20.0},
                "edges": {"tolerance": 1.0, "tolerance_unit": "pixels"}}.items() if k in tasks},
            "optimizer": {"name": "adam", "lr": args.lr, "backbone_lr": args.lr,
                          "betas": [0.9, 0.98]},
            "weighting": {"name": weighting},
            "scheduler": {"name": "poly", "power": 0.9},
            "grid_samples": 0, "constant_fit_batches": 0}},
        "data": {"class_path": "densemtl.data.DenseDataModule", "init_args": {
            "dataset": "synthetic", "root": str(args.data), "height": args.height,
            "width": args.width, "batch_size": args.batch, "num_workers": 1, "hflip": 0.5,
            "seed": seed}},
    }


def ensure_data(args: argparse.Namespace) -> None:
    if (Path(args.data) / "meta.json").is_file():
        return
    cmd = [sys.executable, "-m", "densemtl", "synth", "--out", str(args.data), "--train",
           str(args.train), "--val", str(args.val), "--height", str(args.height), "--width",
           str(args.width), "--seed", "0", "--quiet"]
    subprocess.run(cmd, check=True)


def run_one(args: argparse.Namespace, method: str, tasks: list[str], seed: int,
            weighting: str = "fixed") -> Path:
    run_dir = Path(args.out) / run_name(method, tasks, weighting) / f"seed{seed}"
    if (run_dir / "metrics.json").is_file() and (run_dir / "run_info.json").is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "study_config.yaml"
    final = run_dir / "metrics" / "val-last.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.jobs > 1:  # parallel runs: split the cores between them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    if not (final.is_file() and json.loads(final.read_text())["step"] >= args.steps):
        config.write_text(yaml.safe_dump(make_config(args, method, tasks, seed, run_dir,
                                                     weighting), sort_keys=False))
        with (run_dir / "fit.log").open("w") as log:
            proc = subprocess.run([sys.executable, "-m", "densemtl", "fit", "--config",
                                   str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode:
            raise RuntimeError(f"{run_dir}: 'fit' failed, see {run_dir / 'fit.log'}")
    # The single validation runs after the last step on the val split: exactly what `densemtl
    # test --ckpt_path last.ckpt` would compute, without a second process.
    payload = json.loads(final.read_text())
    (run_dir / "metrics.json").write_text(json.dumps(
        {"metrics": payload["metrics"], "step": payload["step"]}, indent=2))
    train_s = final.stat().st_mtime - config.stat().st_mtime  # config written -> last validation
    (run_dir / "run_info.json").write_text(json.dumps(
        {"method": method, "tasks": tasks, "seed": seed, "weighting": weighting,
         "train_seconds": train_s,
         "threads": env.get("OMP_NUM_THREADS", "default"), "jobs": args.jobs,
         "parameters": sum_parameters(config)}, indent=2))
    return run_dir


def sum_parameters(config: Path) -> int:
    from densemtl.models import build_model, read_model_config

    model = build_model(read_model_config(config), pretrained=False)
    return sum(p.numel() for p in model.parameters())


def summarise(args: argparse.Namespace,
              runs: list[tuple[str, list[str]]] | list[tuple[str, list[str], str]]
              ) -> dict[str, Any]:
    """Mean / std per method; delta_m of each seed against the mean STL results."""
    results: dict[str, Any] = {}
    for method, tasks, *rest in runs:
        name = run_name(method, tasks, *rest)
        seeds = []
        for seed in range(args.seeds):
            d = Path(args.out) / name / f"seed{seed}"
            if not (d / "metrics.json").is_file():
                continue
            metrics = json.loads((d / "metrics.json").read_text())["metrics"]
            info = json.loads((d / "run_info.json").read_text())
            seeds.append({"metrics": metrics, **info})
        if seeds:
            results[name] = {"method": method, "tasks": tasks, "seeds": seeds,
                             "weighting": rest[0] if rest else "fixed",
                             "conflict": conflict_curve(Path(args.out) / name, args.seeds)}
    stl = {t: statistics.mean(s["metrics"][f"{t}/{MAIN[t][0]}"]
                              for s in results[f"stl_{t}"]["seeds"])
           for t in TASKS_ALL if f"stl_{t}" in results}
    for entry in results.values():
        if entry["method"] == "stl":
            continue
        for s in entry["seeds"]:
            terms = []
            for t in entry["tasks"]:
                if t not in stl:
                    continue
                metric, higher = MAIN[t]
                value = s["metrics"][f"{t}/{metric}"]
                sign = 1 if higher else -1
                terms.append(sign * (value - stl[t]) / stl[t])
            s["delta_m"] = 100 * sum(terms) / len(terms) if terms else math.nan
    return {"stl_reference": stl, "runs": results}


def conflict_curve(run: Path, seeds: int) -> dict[str, list[float]]:
    """Mean over the finished seeds of the logged gradient cosines, per step:
    ``{"step": [...], "cos_mean": [...], "cos_min": [...]}`` (empty without measurements)."""
    import csv

    by_step: dict[int, list[tuple[float, float]]] = {}
    pairs: dict[str, list[float]] = {}
    for seed in range(seeds):
        path = run / f"seed{seed}" / "metrics.csv"
        if not (run / f"seed{seed}" / "metrics.json").is_file() or not path.is_file():
            continue
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("conflict/cos_mean"):
                    by_step.setdefault(int(row["step"]), []).append(
                        (float(row["conflict/cos_mean"]), float(row["conflict/cos_min"])))
                    for key, value in row.items():
                        if key.startswith("conflict/cos/") and value:
                            pairs.setdefault(key[len("conflict/cos/"):], []).append(float(value))
    steps = sorted(by_step)
    return {"step": steps,
            "cos_mean": [statistics.mean(v[0] for v in by_step[s]) for s in steps],
            "cos_min": [statistics.mean(v[1] for v in by_step[s]) for s in steps],
            "pairs": {k: statistics.mean(v) for k, v in sorted(pairs.items())}}


def conflict_table(summary: dict[str, Any]) -> str:
    """Per run: the task-gradient cosines averaged over training, and how often the most
    conflicting pair was negative (measurements averaged over seeds first)."""
    lines = ["| run | seeds | measurements | mean cos (all pairs) | mean cos (worst pair) "
             "| worst pair < 0 |", "|---|---|---|---|---|---|"]
    for name, e in summary["runs"].items():
        c = e.get("conflict", {})
        if not c.get("step"):
            continue
        negative = sum(v < 0 for v in c["cos_min"]) / len(c["cos_min"])
        lines.append(f"| {name} | {len(e['seeds'])} | {len(c['step'])} | "
                     f"{statistics.mean(c['cos_mean']):+.3f} | "
                     f"{statistics.mean(c['cos_min']):+.3f} | {100 * negative:.0f} % |")
    if len(lines) == 2:
        return ""
    names = sorted({p for e in summary["runs"].values()
                    for p in e.get("conflict", {}).get("pairs", {})})
    lines += ["", "Mean cosine per task pair over training:", "",
              "| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, e in summary["runs"].items():
        p = e.get("conflict", {}).get("pairs")
        if p:
            lines.append(f"| {name} | " + " | ".join(f"{p[k]:+.2f}" if k in p else ""
                                                     for k in names) + " |")
    return "\n".join(lines)


def conflict_chart(summary: dict[str, Any], path: Path) -> bool:
    """Mean and minimum pairwise cosine of the task gradients over training, per run."""
    curves = {n: e["conflict"] for n, e in summary["runs"].items()
              if e.get("conflict", {}).get("step")}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rolling(values: list[float], k: int = 5) -> list[float]:
        return [statistics.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    for name, c in curves.items():
        seeds = len(summary["runs"][name]["seeds"])
        for ax, key in zip(axes, ("cos_mean", "cos_min")):
            ax.plot(c["step"], rolling(c[key]),
                    label=f"{name} ({seeds} seed{'s' * (seeds > 1)})")
    for ax, title in zip(axes, ("mean over task pairs", "most conflicting pair")):
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel("cosine of task gradients (encoder)")
        ax.set_title(f"{title}, rolling mean of 5 measurements", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}" if abs(m) < 10 else f"{m:.2f} ± {sd:.2f}"


def table(summary: dict[str, Any]) -> str:
    head = ["run", "seeds"] + [f"{t} {MAIN[t][0]}" for t in TASKS_ALL] + \
        ["delta_m (%)", "parameters", "train s"]
    conflict = any(e.get("conflict", {}).get("step") for e in summary["runs"].values())
    if conflict:
        head += ["grad cos, mean (first / last tenth)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in summary["runs"].items():
        seeds = entry["seeds"]
        row = [name, str(len(seeds))]
        for t in TASKS_ALL:
            key = f"{t}/{MAIN[t][0]}"
            row.append(mean_std([s["metrics"][key] for s in seeds if key in s["metrics"]])
                       if t in entry["tasks"] else "")
        row.append(mean_std([s["delta_m"] for s in seeds]) if "delta_m" in seeds[0] else "0")
        row.append(f"{seeds[0]['parameters']:,}")
        row.append(f"{statistics.mean(s['train_seconds'] for s in seeds):.0f}")
        if conflict:
            c = entry.get("conflict", {})
            if c.get("step"):
                k = max(1, len(c["step"]) // 10)
                row.append(f"{statistics.mean(c['cos_mean'][:k]):+.3f} / "
                           f"{statistics.mean(c['cos_mean'][-k:]):+.3f}")
            else:
                row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def chart(summary: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names, means, stds = [], [], []
    for name, entry in summary["runs"].items():
        if entry["method"] == "stl" or not all("delta_m" in s for s in entry["seeds"]):
            continue
        values = [s["delta_m"] for s in entry["seeds"]]
        names.append(name)
        means.append(statistics.mean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(names)), means, yerr=stds, capsize=4,
           color=["#4a7ab8" if "densemtl" in n else "#999999" for n in names])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("delta_m vs STL (%)")
    ax.set_title("Built-in benchmark: delta_m (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="study folder (default runs/study[_quick])")
    p.add_argument("--data", default=None, help="data folder (generated if missing)")
    p.add_argument("--quick", action="store_true", help="smoke version: 1 seed, tiny budget")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--decoder", type=int, nargs=5, default=[16, 32, 32, 64, 64])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weightings", action="store_true",
                   help="the weighting study (STL / MTL / DenseMTL x --methods, 1000 steps)")
    p.add_argument("--methods", default="fixed,upgrad,uncertainty,mgda",
                   help="weighting methods of --weightings, most important first (default "
                        "fixed,upgrad,uncertainty,mgda)")
    p.add_argument("--conflict-every", type=int, default=25,
                   help="measure the task-gradient cosines every N steps (0: never)")
    p.add_argument("--report", action="store_true",
                   help="only summarise the runs that finished (train nothing)")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time (each gets cores/jobs threads); the results do not "
                        "depend on it, the train-time column does")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.weightings and args.steps == 200:
        args.steps = 1000
    if args.quick:
        args.seeds, args.steps, args.train, args.val = 1, 15, 64, 16
        args.height, args.width = 48, 64
    args.out = args.out or ("runs/study_quick" if args.quick else
                            "runs/study_weighting" if args.weightings else "runs/study")
    args.data = args.data or f"data/study_{args.height}x{args.width}_{args.train}"
    ensure_data(args)
    runs: list[Any] = grid(args.quick)
    start = time.time()

    def one(job: tuple[Any, ...]) -> None:
        t0 = time.time()
        run_dir = run_one(args, *job)
        print(f"[{time.time() - start:7.0f}s] {run_dir} ({time.time() - t0:.0f}s)", flush=True)

    jobs: list[Any] = [(method, tasks, seed) for seed in range(args.seeds)
                       for method, tasks in runs]
    if args.weightings:
        jobs = weighting_jobs(args)
        runs = list(dict.fromkeys((m, tuple(t), w) for m, t, _, w in jobs))
        runs = [(m, list(t), w) for m, t, w in runs]
    if not args.report:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(one, jobs))
    summary = summarise(args, runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    text = table(summary)
    conflicts = conflict_table(summary)
    if conflicts:
        text += "\n\nTask-gradient cosines on the shared encoder:\n\n" + conflicts
    (out / "results.md").write_text(text + "\n")
    drawn = chart(summary, out / "delta_m.png")
    drawn_conflict = conflict_chart(summary, out / "conflict.png")
    print(text)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}"
          + (f", {out / 'delta_m.png'}" if drawn else "")
          + (f", {out / 'conflict.png'}" if drawn_conflict else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
