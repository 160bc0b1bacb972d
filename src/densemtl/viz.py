"""Prediction grids: images, labels and predictions side by side (numpy / Pillow only).

Each task colours its own maps (``Task.colourise``); this module only lays tiles out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .tasks import get_task


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """float [3,H,W] in [0,1] -> uint8 [H,W,3]."""
    return (np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1).clip(0, 1) * 255).round() \
        .astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] = (),
         pad: int = 2) -> np.ndarray:
    """Tile uint8 [H,W,3] tiles (rows of equal-length lists) into one image with a title bar."""
    if not rows:
        raise ValueError("grid needs at least one row")
    h = max(t.shape[0] for row in rows for t in row)
    w = max(t.shape[1] for row in rows for t in row)
    cols = max(len(row) for row in rows)
    top = 14 if titles else 0
    canvas = np.full((top + len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255,
                     dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = top + pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    if titles:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        for c, title in enumerate(titles):
            draw.text((pad + c * (w + pad) + 2, 1), title, fill=(0, 0, 0))
        canvas = np.asarray(img)
    return canvas


def prediction_grid(images: np.ndarray, preds: Mapping[str, np.ndarray],
                    targets: Mapping[str, np.ndarray] | None = None,
                    palette: np.ndarray | None = None, max_rows: int = 4) -> np.ndarray:
    """Rows of [image, (target, prediction) per task] for up to ``max_rows`` samples.

    ``images`` float [B,3,H,W]; ``preds`` / ``targets`` per task in physical units with a
    leading batch dimension (as ``Task.decode`` returns them and batches hold labels). Each task
    colours its maps; a prediction borrows its target's colouring where the task says so (depth:
    the target's range).
    """
    targets = targets or {}
    titles = ["image"]
    for t in preds:
        titles += [f"{t} gt", f"{t} pred"] if t in targets else [f"{t} pred"]
    rows = []
    for b in range(min(len(images), max_rows)):
        row = [image_to_uint8(images[b])]
        for t, p in preds.items():
            task, borrowed = get_task(t), None
            if t in targets:
                row.append(task.colourise(targets[t][b], palette))
                borrowed = task.colour_range(targets[t][b])
            row.append(task.colourise(p[b], palette, borrowed))
        rows.append(row)
    return grid(rows, titles)
