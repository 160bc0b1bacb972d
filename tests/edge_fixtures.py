"""Edge-map fixtures for the boundary-evaluation tests and the agreement table.

Ground truth: one-pixel-wide boundaries of random rectangles and lines. Predictions of three
kinds, all seeded: ``thin`` (the boundaries shifted by up to two pixels, with missing pieces,
spurious thin segments and varied strengths), ``thick`` (the boundaries dilated to a band three to
five pixels wide, strength falling off across it) and ``blur`` (the boundaries blurred by a
Gaussian of sigma 2, plus mild noise).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

KINDS = ("thin", "thick", "blur")


def ground_truth(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One-pixel-wide boundaries of a few rectangles and straight lines (bool [H,W])."""
    gt = np.zeros((height, width), dtype=bool)
    for _ in range(3):
        y0, x0 = rng.integers(2, height // 2), rng.integers(2, width // 2)
        y1, x1 = rng.integers(y0 + 8, height - 2), rng.integers(x0 + 8, width - 2)
        gt[y0, x0:x1 + 1] = gt[y1, x0:x1 + 1] = True
        gt[y0:y1 + 1, x0] = gt[y0:y1 + 1, x1] = True
    for _ in range(2):  # a diagonal line
        n = int(rng.integers(15, min(height, width) - 4))
        y, x = rng.integers(0, height - n), rng.integers(0, width - n)
        t = np.arange(n)
        gt[y + t, x + (t * 0.7).astype(int)] = True
    return gt


def prediction(kind: str, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An edge probability map in [0, 1] of the given kind for a ground truth."""
    h, w = gt.shape
    if kind == "thin":
        shifted = np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), (0, 1))
        keep = ndi.zoom(rng.random((h // 8 + 1, w // 8 + 1)), 8, order=0)[:h, :w] > 0.2
        pred = np.where(shifted & keep, ndi.zoom(rng.random((h // 8 + 1, w // 8 + 1)), 8,
                                                 order=0)[:h, :w], 0.0)
        for _ in range(4):  # spurious segments
            y, x, n = rng.integers(0, h), rng.integers(0, w - 10), int(rng.integers(5, 20))
            pred[y, x:x + n] = np.maximum(pred[y, x:x + n], rng.random())
        return np.clip(pred, 0, 1)
    if kind == "thick":
        distance = ndi.distance_transform_edt(~gt)
        width = rng.uniform(1.5, 2.5)
        return np.clip(1.0 - distance / (width + 1), 0, 1) * (distance <= width)
    if kind == "blur":
        pred = ndi.gaussian_filter(gt.astype(np.float64), 2.0)
        pred = pred / pred.max() + 0.05 * rng.random(gt.shape)
        return np.clip(pred, 0, 1)
    raise ValueError(f"unknown fixture kind {kind!r}; use one of {KINDS}")


def fixture(kind: str, images: int = 3, height: int = 60, width: int = 80,
            seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``images`` (prediction, ground truth) pairs of one kind."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    pairs = []
    for _ in range(images):
        gt = ground_truth(rng, height, width)
        pairs.append((prediction(kind, gt, rng), gt))
    return pairs
