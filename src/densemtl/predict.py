"""``densemtl predict``: colourised PNGs and raw arrays for images of any size and format.

``densemtl predict --ckpt CKPT --input DIR_OR_FILE --output DIR`` writes, for every image
``<rel>/<file>`` under the input, ``<output>/<rel>/<file>.<task>.png`` (colourised) and
``<output>/<rel>/<file>.<task>.npy`` (what each task saves, in physical units: class ids
uint8/int16, depth metres float32 [H,W], unit normals float32 [3,H,W], edge probability float32
[H,W]) at the input's size. The file name keeps the input's extension, so ``a.jpg`` and
``a.png`` never share outputs. Nothing is written over an existing file unless ``--overwrite``,
and an output folder inside the input folder is refused (its files would be read as inputs).

The network runs at the training resolution kept in the checkpoint (same number of pixels,
aspect ratio kept, never enlarged) unless ``--size HxW`` or ``--max-side N`` says otherwise;
working sizes above ``--max-pixels`` are refused. With ``--config`` instead, the LightningCLI
``predict`` subcommand runs. This module does not import Lightning (prediction starts fast).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.folder import IMAGE_EXTENSIONS
from .io import DataError, read_image, save_npy, save_png
from .models import load_model
from .models.densemtl import MultiTaskNet
from .tasks import get_task

OUTPUT_KINDS = (".png", ".npy")


def list_inputs(path: Path) -> list[tuple[Path, Path]]:
    """(file, path relative to the input root) for every image, sorted."""
    if path.is_file():
        return [(path, Path(path.name))]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    files = [(p, p.relative_to(path)) for p in sorted(path.rglob("*"))
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return files


def output_paths(rel: Path, output: Path, tasks: list[str]) -> list[Path]:
    """The files written for the input ``rel``: ``<rel>.<task>.png`` and ``.npy``."""
    return [output / rel.parent / f"{rel.name}.{task}{kind}" for task in tasks
            for kind in OUTPUT_KINDS]


def check_output(input_path: Path, output: Path) -> None:
    """Refuse an output folder inside (or equal to) the input folder."""
    if input_path.is_dir():
        src, dst = input_path.resolve(), output.resolve()
        if dst == src or src in dst.parents:
            raise ValueError(
                f"the output folder {output} is inside the input folder {input_path}: the "
                "predictions would be read as input images next time; choose an output folder "
                "outside it")


def check_existing(targets: list[Path], overwrite: bool) -> None:
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} of the {len(targets)} output files exist already (e.g. "
            f"{existing[0]}); pass --overwrite to replace them or choose another --output")


@dataclass
class Summary:
    """What a prediction run did."""

    images: int = 0
    files: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` -> (H, W), positive."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--size must be HxW, e.g. 480x640, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return h, w


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _batches(files: list[tuple[Path, Path]], batch_size: int, summary: Summary,
             skip_unreadable: bool) -> Iterator[list[tuple[Path, Path, np.ndarray]]]:
    """Consecutive readable images of one size, ``batch_size`` at a time."""
    batch: list[tuple[Path, Path, np.ndarray]] = []
    for path, rel in files:
        try:
            image = read_image(path)
        except (DataError, OSError) as exc:
            # the reader's message names the file already; an OSError's may not
            reason = str(exc) if str(path) in str(exc) else f"cannot read {path}: {exc}"
            if not skip_unreadable:
                raise DataError(f"{reason} (use --skip-unreadable to go on without it)") from exc
            summary.skipped.append((path, str(exc)))
            print(f"skipped: {reason}", file=sys.stderr)
            continue
        if batch and (image.shape != batch[0][2].shape or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append((path, rel, image))
    if batch:
        yield batch


def predict_files(model: MultiTaskNet, files: list[tuple[Path, Path]], output: Path, *,
                  size: tuple[int, int] | None = None, max_side: int | None = None,
                  max_pixels: int = 0, batch_size: int = 4, skip_unreadable: bool = False,
                  progress: bool = True) -> Summary:
    """Predict every file and write its outputs; returns what was written and skipped."""
    summary = Summary()
    device = next(model.parameters()).device
    start, last = time.monotonic(), 0.0
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr)
    for batch in _batches(files, batch_size, summary, skip_unreadable):
        h, w = batch[0][2].shape[:2]
        if max_pixels:
            from .images import working_size

            work = working_size((h, w), exact=size, max_side=max_side, area_of=model.input_size,
                                minimum=model.min_input_side)
            if work[0] * work[1] > max_pixels:
                raise ValueError(
                    f"{batch[0][0]}: the network would run at {work[0]}x{work[1]} "
                    f"({work[0] * work[1] / 1e6:.1f} MP), above --max-pixels {max_pixels}; "
                    "use --max-side or a smaller --size, or raise --max-pixels")
        arrays = [b[2] for b in batch]
        stacked = arrays[0][None] if len(arrays) == 1 else np.stack(arrays)  # no copy for one
        x = torch.from_numpy(stacked).permute(0, 3, 1, 2).to(device)
        pred = model.predict(x, size=size, max_side=max_side)
        for i, (_, rel, _) in enumerate(batch):
            for task, value in pred.items():
                arr = get_task(task).to_array(value[i])
                png, npy = output_paths(rel, output, [task])
                save_png(png, get_task(task).colourise(arr, model.palette))
                save_npy(npy, arr)
                summary.files += 2
            summary.images += 1
        if bar is not None:
            bar.update(len(batch))
        elif progress and time.monotonic() - last > 30:
            last = time.monotonic()
            done = summary.images + len(summary.skipped)
            print(f"predict: {done}/{len(files)} images, "
                  f"{summary.images / max(last - start, 1e-9):.2f} images/s", file=sys.stderr)
    if bar is not None:
        bar.close()
    return summary


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"densemtl {command}",
        description="Predict every task for images (a file or a folder; PNG, JPEG, TIFF, BMP, "
                    "WebP; 8/16/32-bit, grey or colour), at the input's size.")
    parser.add_argument("--ckpt", required=True, help="densemtl or Lightning checkpoint")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="output folder (not inside --input)")
    parser.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                        help="run the network at exactly this size")
    parser.add_argument("--max-side", type=positive, default=None, metavar="N",
                        help="run the network with the longer side at most N pixels")
    parser.add_argument("--max-pixels", type=int, default=4_000_000, metavar="N",
                        help="refuse working sizes above N pixels (default 4000000; 0: no "
                             "limit); the default working size is the training resolution")
    parser.add_argument("--batch-size", type=positive, default=None,
                        help="images of one size predicted together (default: 4 on a GPU, 1 on "
                             "a CPU, where batching saves no time and multiplies the memory)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist already (default: refuse)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="report unreadable inputs and go on (default: stop)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str], command: str = "predict") -> int:
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        from .training.cli import main as lightning_main

        return lightning_main(argv, command)
    args = build_parser(command).parse_args(argv)
    if args.size is not None and args.max_side is not None:
        print(f"densemtl {command}: give --size or --max-side, not both", file=sys.stderr)
        return 2
    try:
        output, source = Path(args.output), Path(args.input)
        check_output(source, output)
        files = list_inputs(source)
        device = _device(args.device)
        model = load_model(args.ckpt).to(device)
        batch_size = args.batch_size or (4 if device.type == "cuda" else 1)
        tasks = list(model.tasks)
        targets = [p for _, rel in files for p in output_paths(rel, output, tasks)]
        check_existing(targets, args.overwrite)
        summary = predict_files(model, files, output, size=args.size, max_side=args.max_side,
                                max_pixels=args.max_pixels, batch_size=batch_size,
                                skip_unreadable=args.skip_unreadable, progress=not args.quiet)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"densemtl {command}: {exc}", file=sys.stderr)
        return 1
    skipped = f"; skipped {len(summary.skipped)} unreadable" if summary.skipped else ""
    print(f"predicted {summary.images} of {len(files)} image(s) ({', '.join(tasks)}): wrote "
          f"{summary.files} files to {output}{skipped}")
    return 0
