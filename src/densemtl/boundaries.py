"""Boundary evaluation by the BSDS protocol: ODS, OIS and AP of edge probability maps.

For each image and each threshold t (99 thresholds k/100 by default):

1. the prediction is binarised (``p >= t``) and thinned to one-pixel-wide curves
   (morphological thinning, ``skimage.morphology.thin``, the algorithm of MATLAB's
   ``bwmorph(E, 'thin', inf)`` that the benchmark uses);
2. predicted and ground-truth boundary pixels are matched **one to one** within a distance of
   ``max_dist`` times the image diagonal (0.0075 for BSDS / PASCAL-Context, 0.011 for NYUDv2):
   a maximum bipartite matching on the graph of pixel pairs within that distance, computed as
   a unit-capacity maximum flow (``scipy.sparse.csgraph.maximum_flow``, Dinic). The benchmark's
   matcher (a min-cost assignment in which leaving a pixel unmatched costs far more than any
   match) finds a maximum matching too; it builds its graph with some randomness, ours is exact
   and deterministic;
3. the counts are kept: matched and total predicted pixels (precision), matched and total
   ground-truth pixels (recall).

ODS: the counts summed over the dataset per threshold, and the best F-measure along the
precision-recall curve interpolated linearly between thresholds (100 steps per interval, as the
benchmark does). OIS: each image's best threshold (not interpolated), its counts summed over the
dataset, then F. AP: the area under the precision-recall curve sampled at recall 0, 0.01, ... 1
(linear interpolation over the distinct recalls, 0 outside them), as the benchmark computes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

DEFAULT_MAX_DIST = 0.0075  # BSDS / PASCAL-Context; NYUDv2 uses 0.011

# columns of the per-image count table [T, 4]
MATCHED_PRED, PRED, MATCHED_GT, GT = range(4)


def bsds_thresholds(n: int = 99) -> np.ndarray:
    """The benchmark's thresholds: 1/(n+1), ..., n/(n+1)."""
    return np.arange(1, n + 1, dtype=np.float64) / (n + 1)


def thin(binary: np.ndarray) -> np.ndarray:
    """One-pixel-wide skeleton of a binary map (MATLAB's ``bwmorph(E, 'thin', inf)``).

    Thinning is local, so only the bounding box of the set pixels (plus a margin) is thinned.
    """
    from skimage.morphology import thin as _thin

    ys, xs = np.nonzero(binary.any(axis=1))[0], np.nonzero(binary.any(axis=0))[0]
    if not len(ys):
        return np.zeros_like(binary, dtype=bool)
    y0, y1 = max(ys[0] - 1, 0), min(ys[-1] + 2, binary.shape[0])
    x0, x1 = max(xs[0] - 1, 0), min(xs[-1] + 2, binary.shape[1])
    out = np.zeros_like(binary, dtype=bool)
    out[y0:y1, x0:x1] = _thin(binary[y0:y1, x0:x1])
    return out


def disk_offsets(radius: float) -> np.ndarray:
    """Integer offsets (dy, dx) with dy^2 + dx^2 <= radius^2, nearest first: [K, 2]."""
    reach = math.floor(radius + 1e-9)
    dy, dx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    d2 = dy * dy + dx * dx
    keep = d2 <= radius * radius + 1e-9
    order = np.argsort(d2[keep], kind="stable")
    return np.stack([dy[keep][order], dx[keep][order]], axis=1)


def match_count(pred: np.ndarray, gt: np.ndarray, radius: float,
                near_gt: np.ndarray | None = None) -> int:
    """The size of a maximum one-to-one matching between the pixels of two binary maps, a pair
    being allowed when the two pixels are at most ``radius`` apart (Euclidean).

    ``near_gt`` (optional, [H,W] bool): the pixels within ``radius`` of a ground-truth pixel;
    predicted pixels elsewhere cannot match and are left out of the graph.
    """
    if near_gt is not None:
        pred = pred & near_gt
    p = np.argwhere(pred)
    n_g = int(gt.sum())
    if not len(p) or not n_g:
        return 0
    h, w = gt.shape
    reach = math.floor(radius + 1e-9)
    wide = w + 2 * reach  # padded so that every offset stays inside
    ids = np.full((h + 2 * reach) * wide, -1, dtype=np.int64)
    gy, gx = np.nonzero(gt)
    ids[(gy + reach) * wide + gx + reach] = np.arange(n_g)
    offsets = disk_offsets(radius)
    flat = (p[:, 0] + reach) * wide + p[:, 1] + reach
    j = ids.take(flat[:, None] + (offsets[:, 0] * wide + offsets[:, 1])[None])  # [n_p, K]
    r, k = np.nonzero(j >= 0)
    if not len(r):
        return 0
    c = j[r, k]
    # a maximum matching is a maximum flow of unit capacities: source -> predicted pixel ->
    # ground-truth pixel -> sink (Dinic's algorithm: much faster than Hopcroft-Karp here)
    n_p = len(p)
    source, sink = n_p + n_g, n_p + n_g + 1
    tails = np.concatenate([np.full(n_p, source), r, n_p + np.arange(n_g)])
    heads = np.concatenate([np.arange(n_p), n_p + c, np.full(n_g, sink)])
    graph = csr_matrix((np.ones(len(tails), dtype=np.int32), (tails, heads)),
                       shape=(sink + 1, sink + 1))
    return int(maximum_flow(graph, source, sink, method="dinic").flow_value)


def image_counts(prob: np.ndarray, gt: np.ndarray, max_dist: float = 0.0075,
                 thresholds: np.ndarray | int = 99, apply_thinning: bool = True) -> np.ndarray:
    """Per-threshold counts [T, 4] (matched predicted, predicted, matched ground truth, ground
    truth pixels) of one edge probability map [H,W] against one binary ground truth [H,W]."""
    prob = np.asarray(prob, dtype=np.float64)
    gt = np.asarray(gt) > 0
    if prob.shape != gt.shape or prob.ndim != 2:
        raise ValueError(f"prediction {prob.shape} and ground truth {gt.shape} must be the same "
                         "[H,W] size")
    values = bsds_thresholds(thresholds) if isinstance(thresholds, int) else \
        np.asarray(thresholds, dtype=np.float64)
    radius = max_dist * math.hypot(*gt.shape)
    out = np.zeros((len(values), 4), dtype=np.int64)
    n_gt = int(gt.sum())
    near_gt = distance_transform_edt(~gt) <= radius + 1e-9 if n_gt else None
    previous: tuple[bytes, int] | None = None
    for i, t in enumerate(values):
        binary = prob >= max(t, np.finfo(np.float64).eps)
        key = np.packbits(binary).tobytes()
        if previous is not None and previous[0] == key:  # the same map as at the last threshold
            out[i] = out[i - 1]
            continue
        if apply_thinning:
            binary = thin(binary)
        matched = match_count(binary, gt, radius, near_gt) if n_gt else 0
        previous = (key, matched)
        out[i] = (matched, int(binary.sum()), matched, n_gt)
    return out


def _recall_precision(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = counts.astype(np.float64)
    recall = c[..., MATCHED_GT] / np.where(c[..., GT] == 0, 1, c[..., GT])
    precision = c[..., MATCHED_PRED] / np.where(c[..., PRED] == 0, 1, c[..., PRED])
    return recall, precision


def f_measure(recall: np.ndarray | float, precision: np.ndarray | float) -> np.ndarray:
    """2PR / (P + R), 0 where both are 0."""
    r, p = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    s = p + r
    return 2 * p * r / np.where(s == 0, 1, s)


def best_interpolated(thresholds: np.ndarray, recall: np.ndarray,
                      precision: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, recall, precision, F) of the best F along the curve interpolated linearly
    between consecutive thresholds (100 steps per interval), as the benchmark does."""
    d = np.linspace(0.0, 1.0, 100)[:, None]
    t = thresholds[1:] * d + thresholds[:-1] * (1 - d)  # [100, T-1]
    r = recall[1:] * d + recall[:-1] * (1 - d)
    p = precision[1:] * d + precision[:-1] * (1 - d)
    f = f_measure(r, p)
    start = float(f_measure(recall[0], precision[0]))
    if f.size == 0 or f.max() <= start:
        return float(thresholds[0]), float(recall[0]), float(precision[0]), start
    # the first maximum in the benchmark's scan order (interval by interval, then d)
    k = int(np.argmax(f.T.ravel()))
    i, j = divmod(k, f.shape[0])
    return float(t[j, i]), float(r[j, i]), float(p[j, i]), float(f[j, i])


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision-recall curve sampled at recall 0, 0.01, ..., 1."""
    order = np.argsort(recall, kind="stable")
    r_sorted, p_sorted = recall[order], precision[order]
    unique_r, first = np.unique(r_sorted, return_index=True)
    if len(unique_r) < 2:
        return 0.0
    grid = np.linspace(0.0, 1.0, 101)
    p_at = np.interp(grid, unique_r, p_sorted[first], left=np.nan, right=np.nan)
    return float(np.nan_to_num(p_at, nan=0.0).sum() * 0.01)


def summarise(counts: np.ndarray | Sequence[np.ndarray],
              thresholds: np.ndarray | int = 99) -> dict[str, float]:
    """ODS, OIS and AP from per-image counts [N, T, 4]."""
    table = np.asarray(counts, dtype=np.int64)
    if table.ndim != 3 or table.shape[2] != 4:
        raise ValueError(f"counts must be [images, thresholds, 4], got {table.shape}")
    values = bsds_thresholds(thresholds) if isinstance(thresholds, int) else \
        np.asarray(thresholds, dtype=np.float64)
    if table.shape[0] == 0:
        nan = float("nan")
        return dict.fromkeys(("odsF", "odsP", "odsR", "odsThr", "oisF", "oisP", "oisR", "ap"),
                             nan)
    recall, precision = _recall_precision(table.sum(0))
    t, r, p, f = best_interpolated(values, recall, precision)
    per_r, per_p = _recall_precision(table)
    best = f_measure(per_r, per_p).argmax(axis=1)  # each image's best threshold
    ois = table[np.arange(len(table)), best].sum(0)
    ois_r, ois_p = _recall_precision(ois)
    return {"odsF": f, "odsP": p, "odsR": r, "odsThr": t,
            "oisF": float(f_measure(ois_r, ois_p)), "oisP": float(ois_p), "oisR": float(ois_r),
            "ap": average_precision(recall, precision)}
