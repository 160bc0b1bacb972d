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
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ..io import DataError, read_json, save_jpeg, save_json, save_npy, save_png, write_atomic
from ..tasks import get_task
from ..viz import grid
from .appearance import look_summary, render
from .base import Record, frame_key
from .nyud import NYUDv2Dataset
from .scene import (
    CLASS_NAMES,
    PALETTE,
    SPLIT_CODES,
    STYLES,
    Render,
    intrinsics,
    moved,
    relative_pose,
    sample_motion,
    sample_scene,
)

GENERATOR = "densemtl.synthetic"
GENERATOR_VERSION = "1"
META_FILE = "meta.json"
_OUTPUT_DIRS = ("images", "segmentation", "depth", "normals", "edge", "gt_sets", "sequence",
                "poses")
SEQUENCE_OFFSETS = (-1, 1)


def sample_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def _streams(seed: int, split: str, index: int, style: str, *more: int) -> np.random.Generator:
    """The random stream ``more`` of one sample (0 geometry, 1 looks, 2 motion, 3 frame noise)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], index, *more]))


def render_sample(
    seed: int, split: str, index: int, height: int, width: int, style: str = "a"
) -> Render:
    """Render one sample; a pure function of its arguments."""
    scene = sample_scene(_streams(seed, split, index, style, 0))
    looks = _streams(seed, split, index, style, 1, STYLES.index(style))
    return render(scene, intrinsics(height, width), height, width, style, looks)


def render_sequence(
    seed: int, split: str, index: int, height: int, width: int, style: str = "a",
    offsets: tuple[int, ...] = SEQUENCE_OFFSETS,
) -> tuple[Render, dict[int, Render], dict[int, np.ndarray]]:
    """The sample (frame 0, identical to :func:`render_sample`), its neighbouring frames and
    the exact 4x4 transforms from frame 0's camera to each neighbour's.

    The camera walks with a constant motion drawn per scene; the scene, its materials and the
    light stay put, and every frame uses frame 0's exposure, so a surface point keeps its
    brightness from frame to frame up to sensor noise (drawn per frame) and the slight blur.
    """
    scene = sample_scene(_streams(seed, split, index, style, 0))
    K = intrinsics(height, width)
    looks = (1, STYLES.index(style))
    frame0 = render(scene, K, height, width, style, _streams(seed, split, index, style, *looks))
    motion = sample_motion(_streams(seed, split, index, style, 2))
    frames, poses = {}, {}
    for i, k in enumerate(offsets):
        if k == 0:
            raise ValueError("sequence offsets are the neighbours of frame 0, not 0 itself")
        view = moved(scene, motion, k)
        frames[k] = render(view, K, height, width, style,
                           _streams(seed, split, index, style, *looks), exposure=frame0.exposure,
                           noise=_streams(seed, split, index, style, 3, i))
        poses[k] = relative_pose(scene, view)
    return frame0, frames, poses


def frame_name(sid: str, offset: int) -> str:
    """File stem of a neighbouring frame: ``<id>_-1``, ``<id>_+1``."""
    return f"{sid}_{offset:+d}"


def write_frames(out: Path, sid: str, frames: dict[int, Render], poses: dict[int, np.ndarray],
                 K: np.ndarray, variant: str = "png") -> None:
    """Write the neighbouring frames (``sequence/``) and their poses (``poses/<id>.json``)."""
    for k, r in frames.items():
        if variant == "png":
            save_png(out / "sequence" / f"{frame_name(sid, k)}.png", r.image)
        else:
            save_jpeg(out / "sequence" / f"{frame_name(sid, k)}.jpg", r.image)
    save_json(out / "poses" / f"{sid}.json", {
        "K": K.tolist(),
        "T_0_to": {f"{k:+d}": T.tolist() for k, T in poses.items()},
    })


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
    out, seed, split, index, height, width, style, variant, sequence = args
    sid = sample_id(split, index)
    if sequence:
        r, frames, poses = render_sequence(seed, split, index, height, width, style)
        write_frames(Path(out), sid, frames, poses, intrinsics(height, width), variant)
    else:
        r = render_sample(seed, split, index, height, width, style)
    write_sample(Path(out), sid, r, variant)
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
    sequence: bool = False,
) -> dict[str, Any]:
    """Generate the benchmark into ``out``; returns the metadata written to ``meta.json``.

    ``sequence`` also writes, for every sample, its neighbouring frames -1 and +1
    (``sequence/<id>_-1.png``, ``sequence/<id>_+1.png``) and the exact camera transforms from
    frame 0 to each, with the intrinsics (``poses/<id>.json``); labels stay frame 0's only.
    """
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
        (str(out), seed, split, i, height, width, style, variant, sequence)
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
    meta = metadata(seed, style, variant, height, width, train, val, counts, sequence)
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
    allowed = {"train", "val", "height", "width", "seed", "style", "variant", "workers", "sequence"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"synthesize: unknown option(s) {sorted(unknown)}; use {sorted(allowed)}")
    if not {"train", "val"} <= set(spec):
        raise ValueError("synthesize: give at least 'train' and 'val' (sample counts)")
    root = Path(root)
    meta_path = root / META_FILE
    if meta_path.is_file():
        meta = read_json(meta_path)
        if spec.get("sequence") and "sequence" not in meta:
            raise FileExistsError(
                f"synthesize: the benchmark in {root} has no camera sequences (it was generated "
                "without 'sequence'); delete the folder or choose another root")
        meta = {**meta, **meta.get("splits", {})}
        wanted = {k: v for k, v in spec.items() if k not in ("workers", "sequence")}
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
    sequence: bool = False,
) -> dict[str, Any]:
    """The content of ``meta.json`` (no timestamps or paths: deterministic)."""
    meta = {
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
    if sequence:
        meta["sequence"] = {
            "offsets": list(SEQUENCE_OFFSETS),
            "frames": "sequence/<id>_<offset>.png (.jpg in the npy variant), e.g. "
            "train_000000_-1.png; same camera, scene, light and exposure as frame 0",
            "poses": "poses/<id>.json: K and T_0_to[offset], the 4x4 transform taking a point "
            "from frame 0's camera frame to the neighbour's (X_k = R X_0 + t, metres)",
        }
    return meta


# --- the dataset ----------------------------------------------------------------------------------

class SyntheticDataset(NYUDv2Dataset):
    """The built-in benchmark read through the NYUDv2 loader, with the class names, palette and
    exact intrinsics of its ``meta.json``; with ``frames`` (a benchmark generated with
    ``sequence``), the neighbouring frames and their exact poses too."""

    name = "synthetic"
    splits = ("train", "val")
    has_sequences = True

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
        frames = kwargs.get("frames") or ()
        offsets = meta.get("sequence", {}).get("offsets", [])
        if frames and not set(frames) <= set(offsets):
            raise DataError(
                f"{path}: frames {list(frames)} asked for, but this benchmark has "
                + (f"only the frames {offsets}" if offsets else
                   "no camera sequences (generate it with 'densemtl synth --sequence' or "
                   "'synthesize: {..., sequence: true}')"))
        super().__init__(root, *args, **kwargs)

    def list_records(self, split: str) -> list[Record]:
        records = super().list_records(split)
        ext = ".png" if self.meta.get("variant", "png") == "png" else ".jpg"
        for rec in records:
            for k in self.frames:
                rec.files[frame_key(k)] = self.root / "sequence" / f"{frame_name(rec.id, k)}{ext}"
            if self.frames:
                rec.files["poses"] = self.root / "poses" / f"{rec.id}.json"
        return records

    def poses(self, record: Record) -> Tensor:
        path = record.files["poses"]
        table = read_json(path).get("T_0_to", {})
        try:
            poses = [table[f"{k:+d}"] for k in self.frames]
        except KeyError as e:
            raise DataError(f"{path}: no pose for frame {e.args[0]}") from None
        out = torch.tensor(poses, dtype=torch.float64)
        if out.shape != (len(self.frames), 4, 4):
            raise DataError(f"{path}: poses must be 4x4 matrices, got {tuple(out.shape)}")
        return out.float()

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
    p.add_argument("--sequence", action="store_true",
                   help="also write each sample's neighbouring frames -1 and +1 and their exact "
                   "camera poses (for self-supervised depth)")
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
            args.sequence,
        )
    except (FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"densemtl {command}: error: {e}", file=sys.stderr)
        return 2
    n = meta["splits"]
    print(
        f"wrote {n['train']} train + {n['val']} val samples ({args.height}x{args.width}, "
        f"style {args.style}, seed {args.seed}"
        f"{', with frames -1 and +1 and their poses' if args.sequence else ''}) to {args.out}"
    )
    if args.preview:
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
