"""``densemtl predict``: colourised PNGs and raw arrays for images of any size.

``densemtl predict --ckpt CKPT --input DIR_OR_FILE --output DIR`` writes, for every image
``<rel>/<name>.<ext>`` under the input, ``<output>/<rel>/<name>_<task>.png`` (colourised) and
``<output>/<rel>/<name>_<task>.npy`` (what each task saves, in physical units: class ids
uint8/int16, depth metres float32 [H,W], unit normals float32 [3,H,W], edge probability float32
[H,W]).
With ``--config`` instead, the LightningCLI ``predict`` subcommand runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..data.folder import IMAGE_EXTENSIONS
from ..io import DataError, read_rgb, save_npy, save_png
from ..models import load_model
from ..models.densemtl import MultiTaskNet
from ..tasks import get_task


def list_inputs(path: Path, exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """(file, path relative to the input root) for every image, sorted; skips ``exclude``."""
    if path.is_file():
        return [(path, Path(path.name))]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    files = []
    for p in sorted(path.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if exclude is not None and exclude.resolve() in p.resolve().parents:
            continue  # earlier predictions written inside the input folder
        files.append((p, p.relative_to(path)))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return files


def predict_files(model: MultiTaskNet, files: list[tuple[Path, Path]], output: Path,
                  device: torch.device, skip_unreadable: bool = False,
                  palette: np.ndarray | None = None) -> Iterator[tuple[Path, list[Path]]]:
    """Predict each file; yields (input, written files). Raises on unreadable input unless told."""
    inputs = {f.resolve() for f, _ in files}
    for path, rel in files:
        try:
            rgb = read_rgb(path)
        except (DataError, OSError) as exc:
            if not skip_unreadable:
                raise DataError(f"cannot read input image {path}: {exc} "
                                "(use --skip-unreadable to go on without it)") from exc
            print(f"skipped unreadable input: {path} ({exc})", file=sys.stderr)
            continue
        image = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float() / 255.0
        pred = model.predict(image.to(device))
        written = []
        stem = output / rel.parent / rel.stem
        for name, value in pred.items():
            task = get_task(name)
            arr = task.to_array(value)
            for suffix, write in (
                    (".npy", lambda p, a=arr: save_npy(p, a)),
                    (".png", lambda p, t=task, a=arr: save_png(p, t.colourise(a, palette)))):
                target = stem.parent / f"{stem.name}_{name}{suffix}"
                if target.resolve() in inputs:
                    raise FileExistsError(f"refusing to overwrite the input {target}")
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target)
                written.append(target)
        yield path, written


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str], command: str = "predict") -> int:
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        from .cli import main as lightning_main

        return lightning_main(argv, command)
    parser = argparse.ArgumentParser(
        prog=f"densemtl {command}",
        description="Predict every task for images (a file or a folder, any size).")
    parser.add_argument("--ckpt", required=True, help="densemtl or Lightning checkpoint")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="report unreadable inputs and go on (default: stop)")
    args = parser.parse_args(argv)
    try:
        device = _device(args.device)
        model = load_model(args.ckpt).to(device)
        output = Path(args.output)
        files = list_inputs(Path(args.input), exclude=output)
        palette = getattr(model, "palette", None)
        count = 0
        for _, written in predict_files(model, files, output, device, args.skip_unreadable,
                                        palette):
            count += 1
            del written
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"densemtl {command}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote predictions for {count} of {len(files)} image(s) "
          f"({', '.join(model.tasks)}) to {output}")
    return 0
