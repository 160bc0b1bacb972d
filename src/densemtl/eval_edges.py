"""``densemtl eval-edges``: the BSDS boundary benchmark on folders of edge maps.

Predictions: grey PNG / TIFF (8 or 16 bit, scaled to [0, 1]) or ``.npy`` float arrays in
[0, 1]; ``densemtl predict``'s ``<image>.edges.npy`` / ``.edges.png`` names are understood.
Ground truth: binary maps (PNG / TIFF / ``.npy``; any value > 0 is an edge), one per image,
matched to the predictions by name (the file name without its extension).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from .boundaries import DEFAULT_MAX_DIST, bsds_thresholds, image_counts, summarise
from .errors import UsageError
from .io import read_image, read_npy, save_json

ARRAYS = (".npy",)
IMAGES = (".png", ".tif", ".tiff", ".pgm", ".bmp", ".jpg", ".jpeg")


def _key(path: Path) -> str:
    """``0001.png.edges.npy`` / ``0001.edges.png`` / ``0001.png`` -> ``0001``."""
    name = path.name[: -len(path.suffix)] if path.suffix else path.name
    if name.endswith(".edges"):
        name = name[: -len(".edges")]
    stem = Path(name)
    return stem.stem if stem.suffix.lower() in IMAGES else name


def _files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UsageError(f"--{what}: not a folder: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in ARRAYS + IMAGES or path.name.startswith("."):
            continue
        key = _key(path)
        if key in found:  # e.g. predict's .edges.png and .edges.npy: the array is exact
            if path.suffix.lower() in ARRAYS:
                found[key] = path
            continue
        found[key] = path
    if not found:
        raise UsageError(f"--{what}: no edge maps (.png, .tif, .npy) in {folder}")
    return found


def read_map(path: Path, binary: bool) -> np.ndarray:
    """A [H,W] map: probabilities in [0, 1], or a bool ground truth."""
    array = read_npy(path) if path.suffix.lower() in ARRAYS else read_image(path)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):  # a grey map stored as RGB(A)
        array = array[..., :3].max(axis=-1) if binary else array[..., 0]
    if array.ndim != 2:
        raise UsageError(f"{path}: expected one [H,W] edge map, got shape {array.shape}")
    if binary:
        return array > 0
    array = array.astype(np.float64)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise UsageError(f"{path}: edge probabilities must lie in [0, 1] (found "
                         f"{np.nanmin(array):.3g} .. {np.nanmax(array):.3g})")
    return array


def _counts(pair: tuple[Path, Path], max_dist: float, thresholds: int) -> np.ndarray:
    pred_path, gt_path = pair
    pred, gt = read_map(pred_path, False), read_map(gt_path, True)
    if pred.shape != gt.shape:
        raise UsageError(f"{pred_path.name} is {pred.shape[1]}x{pred.shape[0]} but its ground "
                         f"truth {gt_path} is {gt.shape[1]}x{gt.shape[0]} (W x H): resize the "
                         "prediction to the label size")
    return image_counts(pred, gt, max_dist, thresholds)


def evaluate_folders(pred: Path, gt: Path, max_dist: float = DEFAULT_MAX_DIST,
                     thresholds: int = 99, workers: int = 1, allow_missing: bool = False,
                     progress: bool = False) -> dict[str, float]:
    """ODS / OIS / AP of the prediction folder against the ground-truth folder."""
    preds, gts = _files(pred, "pred"), _files(gt, "gt")
    missing = sorted(set(gts) - set(preds))
    if missing and not allow_missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise UsageError(f"no prediction in {pred} for {len(missing)} ground-truth map(s): "
                         f"{shown} (--allow-missing scores only the images that have one)")
    pairs = [(preds[k], gts[k]) for k in sorted(gts) if k in preds]
    if not pairs:
        raise UsageError(f"no prediction in {pred} has the name of a ground-truth map in {gt}")
    work = partial(_counts, max_dist=max_dist, thresholds=thresholds)
    start, last, rows = time.monotonic(), time.monotonic(), []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for i, row in enumerate((pool.map if pool else map)(work, pairs), 1):
            rows.append(row)
            if progress and (time.monotonic() - last > 10 or i == len(pairs)):
                last = time.monotonic()
                print(f"  {i}/{len(pairs)} images, {last - start:.0f} s", flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    out = summarise(np.stack(rows), bsds_thresholds(thresholds))
    out.update(images=len(pairs), unmatched_gt=len(missing), seconds=time.monotonic() - start,
               max_dist=max_dist, thresholds=thresholds)
    return out


def main(argv: list[str], command: str = "eval-edges") -> int:
    parser = argparse.ArgumentParser(
        prog=f"densemtl {command}",
        description="Boundary ODS / OIS / AP by the BSDS protocol (thinned predictions, "
                    "one-to-one matching within max-dist x the image diagonal).")
    parser.add_argument("--pred", required=True, help="folder of edge probability maps")
    parser.add_argument("--gt", required=True, help="folder of binary ground-truth maps")
    parser.add_argument("--max-dist", type=float, default=None,
                        help="matching distance as a fraction of the image diagonal (0.0075: "
                             "BSDS, PASCAL-Context; 0.011: NYUDv2); default 0.0075")
    parser.add_argument("--thresholds", type=int, default=99,
                        help="number of thresholds k/(n+1) (default 99)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score only the ground-truth maps that have a prediction")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    max_dist = DEFAULT_MAX_DIST if args.max_dist is None else args.max_dist
    if not 0 < max_dist < 1:
        raise UsageError(f"--max-dist must be a fraction of the diagonal in (0, 1), got "
                         f"{max_dist}")
    if args.thresholds < 1 or args.workers < 1:
        raise UsageError("--thresholds and --workers must be at least 1")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists already; pass --overwrite to replace it")
    out = evaluate_folders(Path(args.pred), Path(args.gt), max_dist, args.thresholds,
                           args.workers, args.allow_missing, progress=not args.quiet)
    print(f"BSDS boundary benchmark, {out['images']} image(s), max_dist {max_dist:g} of the "
          f"diagonal, {args.thresholds} thresholds, {out['seconds']:.1f} s")
    print(f"  ODS F {out['odsF']:.4f}  (P {out['odsP']:.4f}, R {out['odsR']:.4f}, "
          f"threshold {out['odsThr']:.3f})")
    print(f"  OIS F {out['oisF']:.4f}  (P {out['oisP']:.4f}, R {out['oisR']:.4f})")
    print(f"  AP    {out['ap']:.4f}")
    if out["unmatched_gt"]:
        print(f"  ({out['unmatched_gt']} ground-truth map(s) without a prediction were skipped)")
    if args.out:
        save_json(args.out, {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in out.items()})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
