"""``make demo``: the built-in benchmark -> train DenseMTL (S, D, N, E) on the CPU -> test ->
predict, printing where everything is. Re-running resumes or reuses what is already there.

    python -m densemtl.demo [--out outputs/demo] [--steps N] [--fresh]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "synthetic" / "densemtl_sdne.yaml"


def _run(*argv: str) -> None:
    from .cli import main

    code = main(list(argv))
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densemtl.demo", description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="demo folder (default outputs/demo)")
    parser.add_argument("--config", default=str(CONFIG), help="training config")
    parser.add_argument("--steps", type=int, default=None, help="training steps (config default)")
    parser.add_argument("--train", type=int, default=600, help="training images to generate")
    parser.add_argument("--val", type=int, default=100, help="validation images to generate")
    parser.add_argument("--fresh", action="store_true", help="delete the demo folder first")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    data, run = out / "data", out / "run"
    start = time.time()
    if not (data / "meta.json").is_file():
        print(f"[1/4] generating the built-in benchmark in {data}")
        _run("synth", "--out", str(data), "--train", str(args.train), "--val", str(args.val),
             "--height", "96", "--width", "128", "--seed", "0", "--preview",
             str(out / "data_preview.png"))
    else:
        print(f"[1/4] reusing the benchmark in {data}")

    common = ["--config", args.config, "--data.init_args.root", str(data),
              "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false"]
    steps = ["--trainer.max_steps", str(args.steps)] if args.steps else []
    last = run / "checkpoints" / "last.ckpt"
    print("[2/4] training DenseMTL (S, D, N, E) on the CPU"
          + (" (resuming)" if last.is_file() else ""))
    _run("fit", *common, *steps, *(["--ckpt_path", str(last)] if last.is_file() else []))

    print("[3/4] evaluating the last checkpoint on the validation split")
    _run("test", *common, "--ckpt_path", str(last))

    print("[4/4] predicting on a few validation images")
    sample = out / "predict_inputs"
    sample.mkdir(parents=True, exist_ok=True)
    for image in sorted((data / "images").glob("val_*"))[:4]:
        shutil.copy2(image, sample / image.name)
    _run("predict", "--ckpt", str(last), "--input", str(sample), "--output",
         str(out / "predictions"), "--device", "cpu", "--overwrite")

    grids = sorted((run / "grids").glob("val-*.png"))
    print(f"\ndone in {(time.time() - start) / 60:.1f} min")
    print(f"  report:            {run / 'report.md'}")
    print(f"  metrics:           {run / 'metrics.json'}")
    if grids:
        print(f"  prediction grid:   {grids[-1]}")
    print(f"  predictions:       {out / 'predictions'}")
    print(f"  checkpoints:       {run / 'checkpoints'}")
    print(f"  TensorBoard:       tensorboard --logdir {run}")
    report = run / "report.md"
    if report.is_file():
        print("\n" + report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
