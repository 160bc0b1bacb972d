"""``densemtl synth``: generate the built-in procedural benchmark in the NYUDv2 layout.

::

    densemtl synth --out DIR --train N --val M [--height 240 --width 320] [--seed 0]
                   [--style a|b] [--variant png|npy] [--workers 2] [--preview grid.png]

writes ``DIR/{images,segmentation,depth,normals,edge}/<id>.*``, ``DIR/gt_sets/{train,val}.txt``
and ``DIR/meta.json`` (class names, palette, intrinsics, generator version, seed, style, pixel
counts per class), which :class:`densemtl.data.nyud.SyntheticDataset` (the NYUDv2 loader) reads.
Every sample depends only on (seed, split, index, style, size), so the files are byte-identical
for the same arguments whatever the number of workers. A folder that already holds a generated
benchmark is replaced; any other non-empty folder is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..io import DataError, read_json, save_jpeg, save_json, save_npy, save_png, write_atomic
from ..tasks import get_task
from ..viz import grid
from .appearance import look_summary, render
from .nyud import NYUDv2Dataset
from .scene import CLASS_NAMES, PALETTE, SPLIT_CODES, STYLES, Render, intrinsics, sample_scene

GENERATOR = "densemtl.synthetic"
GENERATOR_VERSION = "1"
META_FILE = "meta.json"
_OUTPUT_DIRS = ("images", "segmentation", "depth", "normals", "edge", "gt_sets")


def sample_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def render_sample(
    seed: int, split: str, index: int, height: int, width: int, style: str = "a"
) -> Render:
    """Render one sample; a pure function of its arguments."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    code = SPLIT_CODES[split]
    geometry = np.random.default_rng(np.random.SeedSequence([seed, code, index, 0]))
    looks = np.random.default_rng(
        np.random.SeedSequence([seed, code, index, 1, STYLES.index(style)])
    )
    scene = sample_scene(geometry)
    return render(scene, intrinsics(height, width), height, width, style, looks)


def write_sample(out: Path, sid: str, r: Render, variant: str = "png") -> None:
    """Write one rendered sample in the NYUDv2 layout (atomic writes)."""
    if variant == "png":
        save_png(out / "images" / f"{sid}.png", r.image)
        normals = np.rint((r.normals + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        save_png(out / "normals" / f"{sid}.png", normals)
        save_png(out / "edge" / f"{sid}.png", r.edges.astype(np.uint8) * 255)
    else:
        save_jpeg(out / "images" / f"{sid}.jpg", r.image)
        save_npy(out / "normals" / f"{sid}.npy", r.normals)
        save_npy(out / "edge" / f"{sid}.npy", r.edges.astype(np.float32))
    save_png(out / "segmentation" / f"{sid}.png", r.semseg + np.uint8(1))
    save_npy(out / "depth" / f"{sid}.npy", r.depth)


def _job(args: tuple) -> np.ndarray:
    out, seed, split, index, height, width, style, variant = args
    r = render_sample(seed, split, index, height, width, style)
    write_sample(Path(out), sample_id(split, index), r, variant)
    return np.bincount(r.semseg.ravel(), minlength=len(CLASS_NAMES))


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        meta = out / META_FILE
        ours = meta.is_file() and read_json(meta).get("generator") == GENERATOR
        if ours:
            for name in _OUTPUT_DIRS:
                shutil.rmtree(out / name, ignore_errors=True)
            meta.unlink()
        elif not force:
            raise FileExistsError(
                f"--out {out} is not empty and holds no generated benchmark; "
                "choose another folder or pass --force to write into it"
            )
    out.mkdir(parents=True, exist_ok=True)


def _run(jobs: list[tuple], workers: int) -> Iterator[np.ndarray]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_job, jobs)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        yield from pool.imap(_job, jobs, chunksize=max(1, min(8, len(jobs) // (4 * workers))))


def generate(
    out: str | os.PathLike[str],
    train: int,
    val: int,
    height: int = 240,
    width: int = 320,
    seed: int = 0,
    style: str = "a",
    variant: str = "png",
    workers: int | None = None,
    progress: bool = True,
    preview: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Generate the benchmark into ``out``; returns the metadata written to ``meta.json``."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if variant not in ("png", "npy"):
        raise ValueError(f"variant must be 'png' or 'npy', got {variant!r}")
    if train < 0 or val < 0 or height < 8 or width < 8:
        raise ValueError("need train, val >= 0 and height, width >= 8")
    out = Path(out)
    _prepare(out, force)
    workers = (os.cpu_count() or 1) if workers is None else workers
    jobs = [
        (str(out), seed, split, i, height, width, style, variant)
        for split, n in (("train", train), ("val", val))
        for i in range(n)
    ]
    counts = {
        "train": np.zeros(len(CLASS_NAMES), np.int64),
        "val": np.zeros(len(CLASS_NAMES), np.int64),
    }
    results = _run(jobs, workers)
    if progress:
        from tqdm import tqdm

        results = tqdm(
            results, total=len(jobs), desc=f"synth {out.name}", unit="img", file=sys.stderr
        )
    for job, c in zip(jobs, results):
        counts[job[2]] += c
    for split, n in (("train", train), ("val", val)):
        ids = "".join(f"{sample_id(split, i)}\n" for i in range(n)).encode()
        write_atomic(out / "gt_sets" / f"{split}.txt", lambda f, data=ids: f.write(data))
    meta = metadata(seed, style, variant, height, width, train, val, counts)
    save_json(out / META_FILE, meta)
    if preview is not None and (train or val):
        split = "train" if train else "val"
        count = min(4, train or val)
        write_preview(
            preview, [render_sample(seed, split, i, height, width, style) for i in range(count)]
        )
    return meta


def ensure_generated(root: str | os.PathLike[str], spec: dict[str, Any]) -> bool:
    """Generate the benchmark into ``root`` with ``generate(**spec)`` unless it is there already.

    Used by the data modules' ``synthesize`` option so that a config on the built-in benchmark runs
    on a fresh checkout. Returns whether it generated. An existing benchmark is kept as it is (a
    warning names the settings that differ from ``spec``); a folder holding other files is refused.
    """
    allowed = {"train", "val", "height", "width", "seed", "style", "variant", "workers"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"synthesize: unknown option(s) {sorted(unknown)}; use {sorted(allowed)}")
    if not {"train", "val"} <= set(spec):
        raise ValueError("synthesize: give at least 'train' and 'val' (sample counts)")
    root = Path(root)
    meta_path = root / META_FILE
    if meta_path.is_file():
        meta = read_json(meta_path)
        meta = {**meta, **meta.get("splits", {})}
        wanted = {k: v for k, v in spec.items() if k != "workers"}
        differ = {k: (meta.get(k), v) for k, v in wanted.items()
                  if k in meta and meta.get(k) != v}
        if differ:
            warnings.warn(
                f"{root}: the benchmark there was generated with other settings "
                f"(found, asked) {differ}; using it as it is (delete the folder to regenerate)",
                stacklevel=2,
            )
        return False
    if root.is_dir():
        extra = sorted(p.name for p in root.iterdir() if p.name not in _OUTPUT_DIRS)
        if extra:
            raise FileExistsError(
                f"synthesize: {root} has no {META_FILE} but holds other files {extra[:5]}; "
                "choose an empty or missing folder"
            )
    generate(root, force=True, **spec)
    return True


def metadata(
    seed: int,
    style: str,
    variant: str,
    height: int,
    width: int,
    train: int,
    val: int,
    counts: dict[str, np.ndarray],
) -> dict[str, Any]:
    """The content of ``meta.json`` (no timestamps or paths: deterministic)."""
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "style": style,
        "variant": variant,
        "height": height,
        "width": width,
        "splits": {"train": train, "val": val},
        "class_names": list(CLASS_NAMES),
        "palette": PALETTE.tolist(),
        "K": intrinsics(height, width).tolist(),
        "class_pixels": {k: v.tolist() for k, v in counts.items()},
        "encoding": {
            "images": "8-bit RGB (PNG; JPEG in the npy variant)",
            "segmentation": "8-bit PNG, value = class id + 1 (0 = void, unused)",
            "depth": "float32 .npy [H,W], z-depth in metres",
            "normals": "camera frame (x right, y down, z forward), pointing towards the camera; "
            "PNG: v = round((n + 1) * 127.5); npy: float32 [H,W,3]",
            "edge": "instance boundaries, 2 px wide; PNG 0/255, npy 0/1",
        },
        "look": look_summary(style),
    }


# --- the dataset ----------------------------------------------------------------------------------

class SyntheticDataset(NYUDv2Dataset):
    """The built-in benchmark read through the NYUDv2 loader, with the class names, palette and
    exact intrinsics of its ``meta.json``."""

    name = "synthetic"
    splits = ("train", "val")

    def __init__(
        self,
        root: str | Path,
        *args: Any,
        **kwargs: Any,
    ):
        path = Path(root).expanduser() / META_FILE
        if not path.is_file():
            raise FileNotFoundError(
                2, f"missing file: {path} (generate the data with 'densemtl synth --out {root}')",
                str(path))
        meta = read_json(path)
        if not isinstance(meta, dict) or meta.get("generator") != GENERATOR:
            raise DataError(f"{path}: not written by densemtl synth")
        for key in ("class_names", "palette", "K", "height", "width"):
            if key not in meta:
                raise DataError(f"{path}: missing key {key!r}")
        self.meta = meta
        self.class_names = tuple(meta["class_names"])
        self.palette = np.asarray(meta["palette"], dtype=np.uint8).reshape(-1, 3)
        super().__init__(root, *args, **kwargs)

    def camera(self) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
        K = self.meta["K"]
        return (K[0][0], K[1][1], K[0][2], K[1][2]), (int(self.meta["height"]),
                                                       int(self.meta["width"]))

    @property
    def style(self) -> str:
        return str(self.meta["style"])


# --- preview -------------------------------------------------------------------------------------

def preview_row(r: Render) -> list[np.ndarray]:
    """image | classes | depth | normals | edges, each uint8 [H,W,3], coloured by the tasks."""
    maps = {"semseg": r.semseg, "depth": r.depth, "normals": np.moveaxis(r.normals, -1, 0),
            "edges": r.edges.astype(np.float32)}
    return [r.image, *(get_task(t).colourise(v, PALETTE) for t, v in maps.items())]


def write_preview(path: str | os.PathLike[str], renders: list[Render]) -> None:
    """A grid (one row per sample, titled columns, class legend) saved as PNG."""
    full = grid([preview_row(r) for r in renders],
                ("image", "classes", "depth (near-far)", "normals", "edges"), pad=0)
    save_png(path, np.concatenate([full, _legend(full.shape[1])], axis=0), compress_level=6)


def _legend(width: int) -> np.ndarray:
    img = Image.new("RGB", (width, 16), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x = 4
    for name, colour in zip(CLASS_NAMES, PALETTE.tolist()):
        draw.rectangle((x, 3, x + 10, 13), fill=tuple(colour))
        draw.text((x + 13, 2), name, fill=(0, 0, 0))
        x += 16 + 6 * len(name) + 8
    return np.asarray(img)


# --- command line --------------------------------------------------------------------------------
def build_parser(prog: str = "densemtl synth") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Generate the procedural indoor benchmark "
        "(NYUDv2 layout: images, segmentation, depth, normals, edges).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=STYLES, default="a", help="appearance style (default a)")
    p.add_argument(
        "--variant",
        choices=("png", "npy"),
        default="png",
        help="png: PNG images/normals/edges (default); npy: the ATRC variant "
        "(JPEG images, float normals and edges in .npy)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--preview", default=None, help="also write a PNG grid of 4 samples")
    p.add_argument("--force", action="store_true", help="write into a non-empty foreign folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, command: str = "synth") -> int:
    args = build_parser(f"densemtl {command}").parse_args(argv)
    try:
        meta = generate(
            args.out,
            args.train,
            args.val,
            args.height,
            args.width,
            args.seed,
            args.style,
            args.variant,
            args.workers,
            not args.quiet,
            args.preview,
            args.force,
        )
    except (FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"densemtl {command}: error: {e}", file=sys.stderr)
        return 2
    n = meta["splits"]
    print(
        f"wrote {n['train']} train + {n['val']} val samples ({args.height}x{args.width}, "
        f"style {args.style}, seed {args.seed}) to {args.out}"
    )
    if args.preview:
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
