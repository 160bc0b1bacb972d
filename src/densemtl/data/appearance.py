"""Appearance of the synthetic scenes: per-class materials for two styles, procedural textures,
Lambertian shading with cast shadows, exposure, blur and sensor noise.

Style ``a``: warm light, wooden floors and furniture, painted walls, striped balls, mild noise.
Style ``b``: cool light, tiled floors, striped wallpaper, laminate furniture, two-tone balls,
circle posters, a desaturated colour response, vignetting and stronger noise. Class colours
overlap on purpose (cabinets and tables share materials, walls and ceilings are both pale), so
appearance alone does not give the class away either.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from .scene import (
    BALL,
    BIN,
    CABINET,
    CEILING,
    FLOOR,
    POSTER,
    RUG,
    TABLE,
    WALL,
    WINDOW,
    Render,
    Scene,
    apply_decals,
    cast,
    instance_edges,
    shadow,
    surface,
)


def _rgb(*cs: tuple[int, int, int]) -> np.ndarray:
    return np.array(cs, dtype=np.float32) / 255.0


# class -> (texture kind, base colours) per style
STYLE_MATERIALS: dict[str, dict[int, tuple[str, np.ndarray]]] = {
    "a": {
        FLOOR: ("planks", _rgb((150, 105, 70), (180, 140, 95), (120, 85, 60), (165, 150, 130))),
        WALL: ("paint", _rgb((220, 210, 190), (200, 215, 220), (225, 200, 190), (210, 220, 200))),
        CEILING: ("paint", _rgb((235, 235, 228), (225, 225, 220))),
        CABINET: ("wood", _rgb((140, 95, 60), (170, 130, 90), (90, 70, 55), (205, 200, 190))),
        TABLE: ("wood", _rgb((150, 110, 70), (110, 80, 50), (190, 160, 120), (205, 200, 190))),
        BALL: ("bands", _rgb((200, 50, 50), (50, 90, 200), (230, 190, 40), (60, 160, 80))),
        BIN: ("ribs", _rgb((90, 90, 95), (160, 160, 165), (40, 110, 150), (150, 60, 50))),
        POSTER: ("poster", _rgb((240, 235, 220), (30, 30, 35), (200, 180, 150))),
        RUG: ("checker", _rgb((150, 40, 40), (40, 60, 120), (170, 140, 90), (60, 110, 70))),
        WINDOW: ("window", _rgb((150, 200, 245), (230, 240, 250), (245, 245, 240))),
    },
    "b": {
        FLOOR: ("tiles", _rgb((170, 170, 175), (90, 100, 110), (200, 195, 185), (150, 120, 100))),
        WALL: ("stripes", _rgb((180, 200, 170), (150, 170, 200), (200, 180, 200), (215, 215, 205))),
        CEILING: ("paint", _rgb((200, 210, 220), (215, 215, 215))),
        CABINET: ("laminate", _rgb((80, 120, 140), (200, 90, 60), (230, 230, 235), (60, 60, 65))),
        TABLE: ("laminate", _rgb((60, 60, 65), (220, 220, 225), (120, 160, 120), (200, 90, 60))),
        BALL: ("halves", _rgb((240, 120, 30), (120, 40, 160), (30, 170, 170), (230, 230, 230))),
        BIN: ("bands", _rgb((200, 40, 80), (60, 60, 60), (220, 220, 60), (120, 160, 120))),
        POSTER: ("circles", _rgb((30, 30, 40), (235, 235, 235), (90, 90, 100))),
        RUG: ("frames", _rgb((60, 120, 90), (180, 90, 40), (80, 80, 140), (200, 190, 160))),
        WINDOW: ("window", _rgb((250, 170, 110), (110, 140, 200), (60, 60, 70))),
    },
}
LIGHT = {"a": (1.0, 0.9, 0.75), "b": (0.75, 0.85, 1.0)}
AMBIENT = {"a": (0.36, 0.37, 0.42), "b": (0.42, 0.40, 0.37)}
NOISE = {"a": 0.01, "b": 0.03}
EMISSIVE = {WINDOW}


@dataclass
class Material:
    kind: str
    colours: np.ndarray  # [k,3] sRGB in [0,1]; the first is the main colour
    scale: float = 1.0
    shapes: list = field(default_factory=list)  # poster shapes


def sample_materials(scene: Scene, style: str, rng: np.random.Generator) -> list[Material]:
    """One material per instance (class look of ``style`` with per-instance variation)."""
    spec = STYLE_MATERIALS[style]
    out = []
    for cls in scene.inst_class:
        kind, base = spec[cls]
        order = rng.permutation(len(base))
        cols = base[order] * rng.uniform(0.85, 1.15, size=(1, 3)).astype(np.float32)
        cols = np.clip(cols * rng.uniform(0.8, 1.15), 0, 1)
        mat = Material(kind, cols, float(rng.uniform(0.7, 1.4)))
        if kind in ("poster", "circles"):
            for _ in range(int(rng.integers(2, 7))):
                colour = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
                if kind == "poster":
                    x0, y0 = rng.uniform(0.05, 0.8, size=2)
                    mat.shapes.append(
                        (x0, x0 + rng.uniform(0.1, 0.5), y0, y0 + rng.uniform(0.1, 0.5), colour)
                    )
                else:
                    mat.shapes.append(
                        (*rng.uniform(0.15, 0.85, size=2), rng.uniform(0.08, 0.3), colour)
                    )
        out.append(mat)
    return out


# --- textures ----------------------------------------------------------------------------------
def value_noise(x: np.ndarray, y: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Smooth noise in [0, 1] on a periodic lattice of random values (table side: power of 2)."""
    n = table.shape[0]
    flat = table.ravel()
    xf, yf = np.floor(x), np.floor(y)
    fx, fy = x - xf, y - yf
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    xi, yi = xf.astype(np.int32) & (n - 1), yf.astype(np.int32) & (n - 1)
    x1, y1 = (xi + 1) & (n - 1), ((yi + 1) & (n - 1)) * n
    yi = yi * n
    top = flat[yi + xi] * (1 - fx) + flat[yi + x1] * fx
    bottom = flat[y1 + xi] * (1 - fx) + flat[y1 + x1] * fx
    return top * (1 - fy) + bottom * fy


def _hash(k: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) for integer lattice indices."""
    k = (k.astype(np.int64) * 2654435761) % 4294967296
    return ((k ^ (k >> 13)) % 1000) / 1000.0


def texture(mat: Material, s, t, a, b, table) -> np.ndarray:
    """sRGB albedo [n,3] of ``mat`` at surface coordinates (s, t) / decal coordinates (a, b)."""
    c = mat.colours
    k = mat.kind
    sc = mat.scale
    one = np.ones_like(s)[:, None]
    if k == "paint":
        return c[0] * (0.92 + 0.08 * value_noise(s / 0.5, t / 0.5, table))[:, None]
    if k == "stripes":
        on = np.sin(2 * np.pi * s / (0.25 * sc)) > 0.2
        return np.where(on[:, None], c[0], c[0] * 0.8 + c[3] * 0.2) * one
    if k == "planks":
        w = 0.18 * sc
        plank = np.floor(s / w)
        shade = 0.75 + 0.4 * _hash(plank)
        grain = 0.9 + 0.1 * np.sin(2 * np.pi * (t * 2.0 + 2.5 * value_noise(s * 5, t * 0.8, table)))
        gap = np.where((s / w - plank) < 0.05, 0.5, 1.0)
        return c[0] * (shade * grain * gap)[:, None]
    if k == "tiles":
        size = 0.4 * sc
        i, j = np.floor(s / size), np.floor(t / size)
        grout = ((s / size - i) < 0.05) | ((t / size - j) < 0.05)
        odd = ((i + j) % 2 == 1)[:, None]
        col = np.where(odd, c[0], c[1] * 0.6 + c[0] * 0.4)
        return np.where(grout[:, None], c[2] * 0.9, col)
    if k == "wood":
        ring = 0.5 + 0.5 * np.sin(2 * np.pi * (t * 5.0 + 3.0 * value_noise(s * 3, t * 1.5, table)))
        return c[0] * (0.78 + 0.22 * ring)[:, None]
    if k == "laminate":
        speck = value_noise(s * 40, t * 40, table)
        return c[0] * (0.94 + 0.1 * speck)[:, None]
    if k == "bands":
        on = (np.floor(t / (0.12 * sc)) % 2 == 0)[:, None]
        return np.where(on, c[0], c[1])
    if k == "halves":
        on = (s > 0)[:, None]
        return np.where(on, c[0], c[3])
    if k == "ribs":
        return c[0] * (0.7 + 0.3 * (0.5 + 0.5 * np.cos(2 * np.pi * s / (0.05 * sc))))[:, None]
    if k in ("poster", "circles"):
        col = np.broadcast_to(c[0], (len(s), 3)).copy()
        for shape in mat.shapes:
            if k == "poster":
                x0, x1, y0, y1, colour = shape
                inside = (a >= x0) & (a <= x1) & (b >= y0) & (b <= y1)
            else:
                cx, cy, r, colour = shape
                inside = (a - cx) ** 2 + (b - cy) ** 2 <= r * r
            col[inside] = colour
        frame = (a < 0.04) | (a > 0.96) | (b < 0.04) | (b > 0.96)
        col[frame] = c[1]
        return col
    if k == "checker":
        n = max(2, round(4 * sc))
        odd = ((np.floor(a * n) + np.floor(b * n)) % 2 == 1)[:, None]
        border = (np.minimum(np.minimum(a, 1 - a), np.minimum(b, 1 - b)) < 0.08)[:, None]
        return np.where(border, c[2], np.where(odd, c[0], c[1]))
    if k == "frames":
        band = np.floor(np.minimum(np.minimum(a, 1 - a), np.minimum(b, 1 - b)) * 10)
        return np.stack([c[0], c[1], c[3]])[(band % 3).astype(np.int64)]
    if k == "window":
        sky = c[0] * (1 - b[:, None]) + c[1] * b[:, None]
        frame = (
            (a < 0.05)
            | (a > 0.95)
            | (b < 0.06)
            | (b > 0.94)
            | (np.abs(a - 0.5) < 0.02)
            | (np.abs(b - 0.45) < 0.02)
        )
        return np.where(frame[:, None], c[2], sky)
    raise KeyError(k)


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication, [H,W,3]."""
    out = 0.5 * img
    out[1:] += 0.25 * img[:-1]
    out[:-1] += 0.25 * img[1:]
    out[0] += 0.25 * img[0]
    out[-1] += 0.25 * img[-1]
    res = 0.5 * out
    res[:, 1:] += 0.25 * out[:, :-1]
    res[:, :-1] += 0.25 * out[:, 1:]
    res[:, 0] += 0.25 * out[:, 0]
    res[:, -1] += 0.25 * out[:, -1]
    return res


@functools.lru_cache(maxsize=8)
def _vignette(h: int, w: int) -> np.ndarray:
    """Radial brightness fall-off [H,W,1] of style b (read-only, cached per size)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2
    out = (1 - 0.25 * r2)[..., None]
    out.flags.writeable = False
    return out


def render(
    scene: Scene, K: np.ndarray, h: int, w: int, style: str, rng: np.random.Generator,
    *, exposure: float | None = None, noise: np.random.Generator | None = None,
) -> Render:
    """Ray-cast, texture, shade and post-process one view; ``rng`` is the appearance stream.

    ``exposure`` fixes the gain instead of deriving it from this view's brightness, and
    ``noise`` draws the sensor noise from another stream: the neighbouring frames of a camera
    sequence use the labelled frame's gain (so a surface keeps its brightness from view to
    view) and their own noise. Without them the result is the single-view render.
    """
    materials = sample_materials(scene, style, rng)
    table = rng.random((64, 64), dtype=np.float32)
    t, prim, (dx, dy, dz) = cast(scene, K, h, w)
    o = scene.cam_pos.astype(np.float32)
    P = (o[0] + t * dx, o[1] + t * dy, o[2] + t * dz)
    n_w, s, tt = surface(scene, prim, P)
    prim_inst = np.array([p.inst for p in scene.prims] + [0], dtype=np.int32)
    inst = np.where(prim >= 0, prim_inst[np.maximum(prim, 0)], -1 - prim).astype(np.int32)
    a, b = apply_decals(scene, inst, s, tt)

    # group pixels by instance once; each instance's texture then works on contiguous slices
    flat = inst.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=len(scene.inst_class)))])
    sf, tf, af, bf = (x.ravel()[order] for x in (s, tt, a, b))
    grouped = np.empty((flat.size, 3), dtype=np.float32)
    emissive_sorted = np.zeros(flat.size, dtype=bool)
    for i in range(len(scene.inst_class)):
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            grouped[lo:hi] = texture(
                materials[i], sf[lo:hi], tf[lo:hi], af[lo:hi], bf[lo:hi], table
            )
            emissive_sorted[lo:hi] = scene.inst_class[i] in EMISSIVE
    albedo = np.empty_like(grouped)
    albedo[order] = grouped
    emissive = np.empty_like(emissive_sorted)
    emissive[order] = emissive_sorted
    albedo = albedo.reshape(h, w, 3)
    albedo *= albedo  # display -> linear (gamma 2)
    emissive = emissive.reshape(h, w)

    L = scene.light.tolist()
    lx, ly, lz = L[0] - P[0], L[1] - P[1], L[2] - P[2]
    dist2 = lx * lx + ly * ly + lz * lz
    ndotl = (n_w[0] * lx + n_w[1] * ly + n_w[2] * lz) / np.sqrt(dist2)
    lit = (ndotl > 0) & ~emissive
    vis = shadow(scene, P, n_w, lit)
    power = float(rng.uniform(2.5, 4.0))
    diffuse = np.where(lit, ndotl, 0.0) * vis * power / (1.0 + 0.25 * dist2)
    amb = np.array(AMBIENT[style], dtype=np.float32) * np.float32(rng.uniform(0.6, 1.1))
    light = np.array(LIGHT[style], dtype=np.float32)
    shade = amb + diffuse[..., None] * light
    shade[emissive] = 1.6
    radiance = albedo * shade

    sub = radiance[::3, ::3]
    lum = 0.2126 * sub[..., 0] + 0.7152 * sub[..., 1] + 0.0722 * sub[..., 2]
    scale = rng.uniform(0.75, 0.95) / max(float(np.percentile(lum, 95)), 1e-6)
    if exposure is not None:
        scale = exposure
    img = np.sqrt(np.clip(radiance * np.float32(scale), 0, 1))
    img = _blur(img)
    if style == "b":
        grey = img.mean(axis=2, keepdims=True)
        img = 0.8 * img + 0.2 * grey
        img = img * _vignette(h, w) + np.array([0.02, 0.0, 0.03], dtype=np.float32)
    # sensor noise: uniform, with the style's standard deviation
    img += np.float32(NOISE[style] * math.sqrt(12)) * (
        (rng if noise is None else noise).random(img.shape, dtype=np.float32) - 0.5
    )
    image = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)

    R = scene.cam_rot.astype(np.float32)
    n_c = np.stack([R[0, i] * n_w[0] + R[1, i] * n_w[1] + R[2, i] * n_w[2] for i in range(3)], -1)
    classes = np.array(scene.inst_class, dtype=np.uint8)
    return Render(
        depth=t.astype(np.float32),
        normals=n_c.astype(np.float32),
        inst=inst,
        semseg=classes[inst],
        edges=instance_edges(inst),
        image=image,
        exposure=float(scale),
    )


def look_summary(style: str) -> dict:
    """A JSON-friendly description of a style (for the metadata file)."""
    return {
        "materials": {str(c): kind for c, (kind, _) in STYLE_MATERIALS[style].items()},
        "light": list(LIGHT[style]),
        "noise_std": NOISE[style],
        "vignette": style == "b",
        "gamma": 2.0,
        "fov_deg": round(2 * math.degrees(math.atan(0.5 / 0.81)), 2),
    }
