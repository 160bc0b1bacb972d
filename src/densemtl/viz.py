"""Colour maps and prediction grids (numpy / Pillow only; no matplotlib)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .tasks import IGNORE_INDEX

# Anchors of a perceptually ordered dark-blue -> teal -> yellow map (our own, viridis-like).
_DEPTH_ANCHORS = np.array([
    [48, 18, 59], [65, 69, 171], [70, 117, 237], [57, 162, 252], [27, 207, 212],
    [36, 236, 166], [97, 252, 108], [164, 252, 59], [209, 232, 52], [243, 198, 58],
    [254, 155, 45], [243, 99, 21], [217, 56, 6], [177, 25, 1], [122, 4, 3],
], dtype=np.float32)


def default_palette(num_classes: int) -> np.ndarray:
    """A deterministic, well-spread uint8 [C,3] palette (bit-interleaved like VOC's)."""
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        r = g = b = 0
        cid = c + 1
        for bit in range(8):
            r |= ((cid >> 0) & 1) << (7 - bit)
            g |= ((cid >> 1) & 1) << (7 - bit)
            b |= ((cid >> 2) & 1) << (7 - bit)
            cid >>= 3
        out[c] = (r, g, b)
    return out


def colourise_semseg(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """int [H,W] class ids -> uint8 [H,W,3]; ignored / out-of-range pixels are black."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels != IGNORE_INDEX)
    n = int(labels[valid].max()) + 1 if valid.any() else 1
    if palette is None or len(palette) < n:
        palette = default_palette(max(n, 0 if palette is None else len(palette)))
    palette = np.asarray(palette, dtype=np.uint8)
    valid &= labels < len(palette)
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[valid] = palette[labels[valid]]
    return out


def colourise_depth(depth: np.ndarray, vmin: float | None = None,
                    vmax: float | None = None) -> np.ndarray:
    """Metres [H,W] (or [1,H,W]) -> uint8 [H,W,3]; near is dark, invalid (<= 0) is black.

    The range defaults to the 2nd..98th percentile of the valid pixels.
    """
    depth = np.asarray(depth, dtype=np.float32).squeeze()
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        return np.zeros((*depth.shape, 3), dtype=np.uint8)
    lo = float(np.percentile(depth[valid], 2)) if vmin is None else vmin
    hi = float(np.percentile(depth[valid], 98)) if vmax is None else vmax
    t = np.clip((depth - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * (len(_DEPTH_ANCHORS) - 1)
    i = np.minimum(t.astype(np.int64), len(_DEPTH_ANCHORS) - 2)
    frac = (t - i)[..., None]
    rgb = _DEPTH_ANCHORS[i] * (1 - frac) + _DEPTH_ANCHORS[i + 1] * frac
    rgb[~valid] = 0
    return rgb.round().astype(np.uint8)


def colourise_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals [3,H,W] -> uint8 [H,W,3] as (n + 1) / 2; zero vectors are black."""
    n = np.asarray(normals, dtype=np.float32)
    valid = np.abs(n).sum(0) > 0
    rgb = ((np.moveaxis(n, 0, -1) + 1.0) * 127.5).clip(0, 255)
    rgb[~valid] = 0
    return rgb.round().astype(np.uint8)


def colourise_edges(edges: np.ndarray) -> np.ndarray:
    """Edge probability / label [H,W] (or [1,H,W]) in [0,1] -> uint8 grey [H,W,3]."""
    e = np.clip(np.asarray(edges, dtype=np.float32).squeeze(), 0, 1)
    return np.repeat((e * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """float [3,H,W] in [0,1] -> uint8 [H,W,3]."""
    return (np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1).clip(0, 1) * 255).round() \
        .astype(np.uint8)


COLOURISERS = {
    "semseg": lambda v, palette, rng: colourise_semseg(v, palette),
    "depth": lambda v, palette, rng: colourise_depth(v, *(rng or (None, None))),
    "normals": lambda v, palette, rng: colourise_normals(v),
    "edges": lambda v, palette, rng: colourise_edges(v),
}


def colourise(task: str, value: np.ndarray, palette: np.ndarray | None = None,
              depth_range: tuple[float, float] | None = None) -> np.ndarray:
    """Colourise one task map in physical units (see the per-task functions)."""
    if task not in COLOURISERS:
        raise ValueError(f"no colour map for task '{task}'")
    return COLOURISERS[task](value, palette, depth_range)


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
    leading batch dimension (semseg [B,H,W], depth [B,1,H,W], normals [B,3,H,W], edges
    [B,1,H,W]). A depth prediction uses its target's colour range when a target is given.
    """
    targets = targets or {}
    titles = ["image"]
    for t in preds:
        titles += [f"{t} gt", f"{t} pred"] if t in targets else [f"{t} pred"]
    rows = []
    for b in range(min(len(images), max_rows)):
        row = [image_to_uint8(images[b])]
        for t, p in preds.items():
            rng = None
            if t in targets:
                row.append(colourise(t, targets[t][b], palette))
                if t == "depth":
                    valid = targets[t][b][targets[t][b] > 0]
                    if valid.size:
                        rng = (float(np.percentile(valid, 2)), float(np.percentile(valid, 98)))
            row.append(colourise(t, p[b], palette, rng))
        rows.append(row)
    return grid(rows, titles)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write a PNG atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(rgb).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
