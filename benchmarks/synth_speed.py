"""Speed of the synthetic benchmark generator (``densemtl synth``), end to end.

    python benchmarks/synth_speed.py [--height 240 --width 320 --images 400 --workers 2]

Times the full generation (ray casting, shading, PNG/NPY writing, split lists, metadata) into a
temporary folder for both styles, plus the single-process render-only time per image, and
prints a table. The goal (issue 3) is at least 40 images/s at 240x320 on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from densemtl.data.synthetic import generate, render_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--images", type=int, default=400, help="images per style")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--render-only", type=int, default=40, help="images for the 1-process timing")
    args = p.parse_args()

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} logical "
        f"cores, python {platform.python_version()}, numpy {np.__version__}"
    )
    print(
        f"size {args.height}x{args.width}, {args.images} images per style, "
        f"{args.workers} worker processes\n"
    )
    print(
        f"| style | render only, 1 process (ms/img) | full generation ({args.workers} workers) "
        "| images/s |"
    )
    print("|---|---|---|---|")
    for style in ("a", "b"):
        render_sample(0, "train", 0, args.height, args.width, style)  # warm caches
        t0 = time.perf_counter()
        for i in range(args.render_only):
            render_sample(1, "train", i, args.height, args.width, style)
        per_image = (time.perf_counter() - t0) / args.render_only * 1000
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate(
                tmp,
                args.images,
                0,
                args.height,
                args.width,
                seed=0,
                style=style,
                workers=args.workers,
                progress=False,
            )
            seconds = time.perf_counter() - t0
        print(f"| {style} | {per_image:.1f} | {seconds:.2f} s | {args.images / seconds:.1f} |")


if __name__ == "__main__":
    main()
