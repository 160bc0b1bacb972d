"""The BSDS boundary benchmark: agreement with pyEdgeEval on fixtures, and its speed.

Agreement: ODS / OIS / AP of ``densemtl.boundaries`` and of pyEdgeEval (an independent Python /
Cython port of the BSDS benchmark: its own thinning, BSDS's min-cost matcher, its own summary)
on the fixtures of ``tests/edge_fixtures.py`` (thin, thick and blurred maps; three images of
60x80 each) at three matching distances. Speed: ``densemtl eval-edges``' per-image work on
NYUDv2-sized maps (480x640, the "blur" kind: a soft network-like output), one process::

    python benchmarks/edge_benchmark.py agreement
    python benchmarks/edge_benchmark.py speed --images 654
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from densemtl import boundaries as B

from edge_fixtures import KINDS, fixture, ground_truth, prediction


def agreement() -> None:
    from pyEdgeEval.common.binary_label import calculate_metrics, evaluate_boundaries_threshold

    thresholds = B.bsds_thresholds(99)
    print("| maps | max_dist | ODS ours | ODS pyEdgeEval | OIS ours | OIS pyEdgeEval | "
          "AP ours | area PR pyEdgeEval | s ours | s pyEdgeEval |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        pairs = fixture(kind)
        for max_dist in (0.0075, 0.011, 0.03):
            start = time.perf_counter()
            ours = B.summarise([B.image_counts(p, g, max_dist) for p, g in pairs])
            t_ours = time.perf_counter() - start

            def one(sample, max_dist=max_dist, pairs=pairs):
                p, g = pairs[sample["index"]]
                return evaluate_boundaries_threshold(thresholds, p, g, max_dist=max_dist)

            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                _, _, ref = calculate_metrics(
                    one, 99, [{"name": str(i), "index": i} for i in range(len(pairs))], nproc=1)
            t_ref = time.perf_counter() - start
            print(f"| {kind} | {max_dist} | {ours['odsF']:.4f} | {ref['ODS_f1']:.4f} | "
                  f"{ours['oisF']:.4f} | {ref['OIS_f1']:.4f} | {ours['ap']:.4f} | "
                  f"{ref['AUC']:.4f} | {t_ours:.2f} | {t_ref:.2f} |", flush=True)


def speed(images: int, height: int, width: int, max_dist: float) -> None:
    rng = np.random.default_rng(0)
    start, last = time.perf_counter(), time.perf_counter()
    rows = []
    for i in range(images):
        gt = ground_truth(rng, height, width)
        rows.append(B.image_counts(prediction("blur", gt, rng), gt, max_dist))
        if time.perf_counter() - last > 60:
            last = time.perf_counter()
            print(f"  {i + 1}/{images}: {(last - start) / (i + 1):.2f} s per map", flush=True)
    total = time.perf_counter() - start
    out = B.summarise(np.stack(rows))
    print(f"{images} maps of {height}x{width}, max_dist {max_dist}: {total:.1f} s "
          f"({total / images:.2f} s per map), ODS {out['odsF']:.4f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["agreement", "speed"])
    p.add_argument("--images", type=int, default=654)
    p.add_argument("--size", type=int, nargs=2, default=[480, 640])
    p.add_argument("--max-dist", type=float, default=0.011)
    args = p.parse_args()
    if args.what == "agreement":
        agreement()
    else:
        speed(args.images, *args.size, args.max_dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
