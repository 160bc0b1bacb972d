"""Procedural indoor scenes for the synthetic benchmark: sampling and analytic ray casting.

Geometry (world frame: y up, floor at y = 0, the room spans x in [-W/2, W/2], z in [-D/2, D/2]):
a box-shaped room (floor, ceiling, four walls), cabinets (boxes), tables (a top and four legs),
balls (spheres, on the floor or on furniture), bins (vertical cylinders). Posters and windows
(on walls) and rugs (on the floor) only change appearance and labels, never depth or normals, so
they cannot be read off the geometry. Every pixel is ray-cast exactly (one ray through each
pixel centre, so labels are exact); shading is Lambertian from one point light with exact cast
shadows (shadow rays against the objects) plus ambient light, followed by auto-exposure, a slight
blur and sensor noise.

Randomness: the geometry comes from one generator and the appearance (colours, textures, light
colour, noise) from another, both derived from (seed, split, index); the appearance generator
also depends on the style. The same seed in styles ``a`` and ``b`` therefore gives the same
scenes with different looks; use different seeds for an unpaired adaptation benchmark.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import numpy as np

CLASS_NAMES = (
    "floor",
    "wall",
    "ceiling",
    "cabinet",
    "table",
    "ball",
    "bin",
    "poster",
    "rug",
    "window",
)
PALETTE = np.array(
    [
        (140, 100, 60),
        (170, 170, 200),
        (240, 240, 160),
        (200, 60, 60),
        (230, 150, 40),
        (60, 180, 75),
        (70, 110, 230),
        (220, 50, 200),
        (80, 200, 200),
        (150, 230, 250),
    ],
    dtype=np.uint8,
)
FLOOR, WALL, CEILING, CABINET, TABLE, BALL, BIN, POSTER, RUG, WINDOW = range(10)
STYLES = ("a", "b")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
FOCAL_PER_WIDTH = 0.81  # fx / W, the NYUv2 Kinect's ~63 degree horizontal field of view

_EPS = 1e-4


# --- scene description -----------------------------------------------------------------------
@dataclass
class Prim:
    """One solid primitive: kind 'box' (centre, half, yaw), 'sphere' (centre, r) or
    'cylinder' (centre = base centre, r, height); ``inst`` = its instance id."""

    kind: str
    inst: int
    centre: np.ndarray
    half: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw: float = 0.0
    r: float = 0.0
    height: float = 0.0

    def corners(self) -> np.ndarray:
        """The 8 corners of a world-space bounding box, [8,3]."""
        c = self.centre
        if self.kind == "box":
            cs, sn = abs(math.cos(self.yaw)), abs(math.sin(self.yaw))
            ext = np.array(
                [
                    cs * self.half[0] + sn * self.half[2],
                    self.half[1],
                    sn * self.half[0] + cs * self.half[2],
                ]
            )
            lo, hi = c - ext, c + ext
        elif self.kind == "sphere":
            lo, hi = c - self.r, c + self.r
        else:
            lo = c - np.array([self.r, 0.0, self.r])
            hi = c + np.array([self.r, self.height, self.r])
        return np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )


@dataclass
class Decal:
    """An appearance-only rectangle on a wall (support = wall instance) or the floor."""

    inst: int
    cls: int
    support: int
    centre: tuple[float, float]  # (s, t) on the support surface, metres
    half: tuple[float, float]
    yaw: float = 0.0  # rugs only


@dataclass
class Scene:
    room: np.ndarray  # (W, H, D)
    cam_pos: np.ndarray  # (3,)
    cam_rot: np.ndarray  # (3,3) camera -> world
    light: np.ndarray  # (3,)
    prims: list[Prim]
    decals: list[Decal]
    inst_class: list[int]  # class of each instance id


# instance ids of the room surfaces
I_FLOOR, I_CEIL, I_WALL_XN, I_WALL_XP, I_WALL_ZN, I_WALL_ZP = range(6)
_ROOM_CLASSES = [FLOOR, CEILING, WALL, WALL, WALL, WALL]


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a room, a camera, a light, furniture and decals."""
    W, H, D = rng.uniform(3.5, 7.0), rng.uniform(2.4, 3.2), rng.uniform(4.0, 9.0)
    cam = np.array(
        [
            rng.uniform(-W / 2 + 0.5, W / 2 - 0.5),
            rng.uniform(1.0, 1.7),
            rng.uniform(D / 2 - 1.5, D / 2 - 0.4),
        ]
    )
    yaw, pitch, roll = rng.uniform(-0.6, 0.6), rng.uniform(-0.45, 0.05), rng.uniform(-0.05, 0.05)
    # camera (x right, y down, z forward) -> world: looking along -z, then roll, pitch, yaw
    rot = _rot_y(yaw) @ _rot_x(pitch) @ np.diag([1.0, -1.0, -1.0]) @ _rot_z(roll)
    light = np.array([rng.uniform(-W / 3, W / 3), H - 0.05, rng.uniform(-D / 3, D / 3)])
    inst_class = list(_ROOM_CLASSES)
    prims: list[Prim] = []
    footprints: list[tuple[float, float, float]] = [(cam[0], cam[2], 0.9)]  # keep clear of camera
    tops: list[tuple[float, float, float, float]] = []  # (x, z, radius, top height) to put balls on

    def place(radius: float, against_wall: bool) -> tuple[float, float, float] | None:
        for _ in range(30):
            if against_wall:
                side = int(rng.integers(0, 3))  # x-, x+, z- (the wall behind the camera: never)
                along = rng.uniform(-1, 1)
                if side == 0:
                    x, z, yaw_ = -W / 2 + radius + 0.02, along * (D / 2 - radius), math.pi / 2
                elif side == 1:
                    x, z, yaw_ = W / 2 - radius - 0.02, along * (D / 2 - radius), -math.pi / 2
                else:
                    x, z, yaw_ = along * (W / 2 - radius), -D / 2 + radius + 0.02, 0.0
            else:
                x = rng.uniform(-W / 2 + radius, W / 2 - radius)
                z = rng.uniform(-D / 2 + radius, D / 2 - radius)
                yaw_ = rng.uniform(-math.pi, math.pi)
            if all(
                (x - fx) ** 2 + (z - fz) ** 2 > (radius + fr + 0.05) ** 2
                for fx, fz, fr in footprints
            ):
                footprints.append((x, z, radius))
                return x, z, yaw_
        return None

    def new_inst(cls: int) -> int:
        inst_class.append(cls)
        return len(inst_class) - 1

    for _ in range(int(rng.integers(0, 4))):  # cabinets
        half = np.array([rng.uniform(0.2, 0.75), rng.uniform(0.25, 1.0), rng.uniform(0.15, 0.3)])
        spot = place(float(np.hypot(half[0], half[2])) * 0.9, rng.random() < 0.6)
        if spot is None:
            continue
        x, z, yaw_ = spot
        prims.append(Prim("box", new_inst(CABINET), np.array([x, half[1], z]), half, yaw_))
        tops.append((x, z, float(min(half[0], half[2])), 2 * half[1]))
    for _ in range(int(rng.integers(0, 3))):  # tables: a top and four legs
        hw, hd = rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.5)
        height, thick, leg = (
            rng.uniform(0.65, 0.8),
            rng.uniform(0.03, 0.06),
            rng.uniform(0.025, 0.05),
        )
        spot = place(float(np.hypot(hw, hd)), False)
        if spot is None:
            continue
        x, z, yaw_ = spot
        inst = new_inst(TABLE)
        table_rot = _rot_y(yaw_)
        prims.append(
            Prim(
                "box",
                inst,
                np.array([x, height - thick / 2, z]),
                np.array([hw, thick / 2, hd]),
                yaw_,
            )
        )
        for sx in (-1, 1):
            for sz in (-1, 1):
                off = table_rot @ np.array([sx * (hw - leg - 0.03), 0.0, sz * (hd - leg - 0.03)])
                prims.append(
                    Prim(
                        "box",
                        inst,
                        np.array([x + off[0], (height - thick) / 2, z + off[2]]),
                        np.array([leg, (height - thick) / 2, leg]),
                        yaw_,
                    )
                )
        tops.append((x, z, float(min(hw, hd)), height))
    for _ in range(int(rng.integers(0, 4))):  # balls
        r = rng.uniform(0.1, 0.3)
        if tops and rng.random() < 0.4:
            x, z, rad, top = tops[int(rng.integers(0, len(tops)))]
            if rad > r:
                ang, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, rad - r) * 0.5
                prims.append(
                    Prim(
                        "sphere",
                        new_inst(BALL),
                        np.array([x + dist * math.cos(ang), top + r, z + dist * math.sin(ang)]),
                        r=r,
                    )
                )
                continue
        spot = place(r, False)
        if spot is not None:
            prims.append(Prim("sphere", new_inst(BALL), np.array([spot[0], r, spot[1]]), r=r))
    for _ in range(int(rng.integers(0, 4))):  # bins
        r, h = rng.uniform(0.12, 0.3), rng.uniform(0.3, 1.0)
        spot = place(r, rng.random() < 0.3)
        if spot is not None:
            prims.append(
                Prim("cylinder", new_inst(BIN), np.array([spot[0], 0.0, spot[1]]), r=r, height=h)
            )

    decals: list[Decal] = []
    wall_len = {I_WALL_XN: D, I_WALL_XP: D, I_WALL_ZN: W, I_WALL_ZP: W}
    used: dict[int, list[tuple[float, float, float, float]]] = {}
    for cls, count in ((POSTER, int(rng.integers(0, 4))), (WINDOW, int(rng.integers(0, 3)))):
        for _ in range(count):
            wall = int(rng.choice([I_WALL_XN, I_WALL_XP, I_WALL_ZN, I_WALL_ZN]))
            if cls == POSTER:
                hw, hh = rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.5)
                cy = rng.uniform(1.1, min(2.0, H - hh - 0.1))
            else:
                hw, hh = rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.7)
                cy = min(rng.uniform(0.9, 1.1) + hh, H - hh - 0.15)
            half_len = wall_len[wall] / 2 - hw - 0.1
            if half_len <= 0:
                continue
            cs = rng.uniform(-half_len, half_len)
            box = (cs - hw, cs + hw, cy - hh, cy + hh)
            if any(
                b[0] < box[1] and box[0] < b[1] and b[2] < box[3] and box[2] < b[3]
                for b in used.get(wall, [])
            ):
                continue
            used.setdefault(wall, []).append(box)
            decals.append(Decal(new_inst(cls), cls, wall, (cs, cy), (hw, hh)))
    for _ in range(int(rng.integers(0, 3))):  # rugs
        hw, hd = rng.uniform(0.5, 1.3), rng.uniform(0.4, 1.0)
        cx, cz = rng.uniform(-W / 2 + 0.3, W / 2 - 0.3), rng.uniform(-D / 2 + 0.3, D / 2 - 0.3)
        decals.append(
            Decal(new_inst(RUG), RUG, I_FLOOR, (cx, cz), (hw, hd), float(rng.uniform(-0.4, 0.4)))
        )
    return Scene(np.array([W, H, D]), cam, rot, light, prims, decals, inst_class)


@dataclass(frozen=True)
class Motion:
    """A camera's constant motion per frame, in the camera frame of the earlier frame: a
    translation ``step`` (metres; x right, y down, z forward) and a rotation ``turn``."""

    step: np.ndarray  # (3,)
    turn: np.ndarray  # (3,3)


def sample_motion(rng: np.random.Generator) -> Motion:
    """A walk filmed at a few frames per second: 15-30 cm forward per frame, up to 6 cm sideways
    and 2 cm vertical drift, up to 2 degrees of yaw and 0.9 degrees of pitch per frame."""
    step = np.array([rng.uniform(-0.06, 0.06), rng.uniform(-0.02, 0.02), rng.uniform(0.15, 0.30)])
    yaw, pitch = rng.uniform(-0.035, 0.035), rng.uniform(-0.015, 0.015)
    return Motion(step, _rot_y(yaw) @ _rot_x(pitch))


def moved(scene: Scene, motion: Motion, frames: int) -> Scene:
    """The scene seen ``frames`` frames later (earlier if negative): only the camera moves."""
    pos, rot = scene.cam_pos.copy(), scene.cam_rot.copy()
    for _ in range(abs(frames)):
        if frames > 0:
            pos = pos + rot @ motion.step
            rot = rot @ motion.turn
        else:
            rot = rot @ motion.turn.T
            pos = pos - rot @ motion.step
    return replace(scene, cam_pos=pos, cam_rot=rot)


def relative_pose(source: Scene, target: Scene) -> np.ndarray:
    """The 4x4 rigid transform taking a point from ``source``'s camera frame to ``target``'s
    (X_target = R X_source + t), from the two cameras' world poses."""
    T = np.eye(4)
    T[:3, :3] = target.cam_rot.T @ source.cam_rot
    T[:3, 3] = target.cam_rot.T @ (source.cam_pos - target.cam_pos)
    return T


def intrinsics(height: int, width: int) -> np.ndarray:
    """The benchmark's K: fx = fy = 0.81 W, principal point at the image centre."""
    f = FOCAL_PER_WIDTH * width
    return np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]])


# --- ray casting -------------------------------------------------------------------------------
# Scene numbers are converted to Python floats before they meet pixel arrays: NumPy scalars
# would promote the float32 arrays to float64 and double the cost.
def _hit_box(p: Prim, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    c, s = math.cos(p.yaw), math.sin(p.yaw)
    cx, cy, cz = p.centre.tolist()
    hx, hy, hz = p.half.tolist()
    rx, ry, rz = ox - cx, oy - cy, oz - cz
    lox, loz = c * rx - s * rz, s * rx + c * rz
    ldx, ldz = c * dx - s * dz, s * dx + c * dz
    tmin = np.full(np.shape(dx), -np.inf, dtype=np.float32)
    tmax = np.full(np.shape(dx), np.inf, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for o, d, h in ((lox, ldx, hx), (ry, dy, hy), (loz, ldz, hz)):
            inv = 1.0 / d
            t1, t2 = (-h - o) * inv, (h - o) * inv
            np.maximum(tmin, np.minimum(t1, t2), out=tmin)
            np.minimum(tmax, np.maximum(t1, t2), out=tmax)
    return np.where((tmax >= tmin) & (tmin > _EPS), tmin, np.inf)


def _hit_sphere(p: Prim, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    cx, cy, cz = p.centre.tolist()
    rx, ry, rz = ox - cx, oy - cy, oz - cz
    a = dx * dx + dy * dy + dz * dz
    b = rx * dx + ry * dy + rz * dz
    disc = b * b - a * (rx * rx + ry * ry + rz * rz - p.r * p.r)
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _hit_cylinder(p: Prim, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    cx, y0, cz = p.centre.tolist()
    rx, rz = ox - cx, oz - cz
    y1 = y0 + p.height
    a = dx * dx + dz * dz
    b = rx * dx + rz * dz
    disc = b * b - a * (rx * rx + rz * rz - p.r * p.r)
    with np.errstate(invalid="ignore", divide="ignore"):
        ts = (-b - np.sqrt(disc)) / a
        ys = oy + ts * dy
        side = np.where((disc >= 0) & (ts > _EPS) & (ys >= y0) & (ys <= y1), ts, np.inf)
        tc = (y1 - oy) / dy
        cx, cz = rx + tc * dx, rz + tc * dz
        cap = np.where((tc > _EPS) & (cx * cx + cz * cz <= p.r * p.r), tc, np.inf)
    return np.minimum(side, cap)


_HIT = {"box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def _screen_box(p: Prim, K: np.ndarray, rot: np.ndarray, pos: np.ndarray, h: int, w: int):
    """Pixel window (rows, cols slices) that contains the primitive, or None if behind."""
    pc = (p.corners() - pos) @ rot  # world -> camera: rot^T (x - pos)
    if (pc[:, 2] <= 1e-3).all():
        return None
    if (pc[:, 2] <= 1e-3).any():
        return slice(0, h), slice(0, w)
    u = K[0, 0] * pc[:, 0] / pc[:, 2] + K[0, 2]
    v = K[1, 1] * pc[:, 1] / pc[:, 2] + K[1, 2]
    c0, c1 = max(math.floor(u.min()) - 1, 0), min(math.ceil(u.max()) + 2, w)
    r0, r1 = max(math.floor(v.min()) - 1, 0), min(math.ceil(v.max()) + 2, h)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


@dataclass
class Render:
    """Per-pixel outputs of one camera view (all [H,W] or [H,W,3])."""

    depth: np.ndarray  # float32, z-depth
    normals: np.ndarray  # float32 [H,W,3], camera frame
    inst: np.ndarray  # int32 instance ids (after decals)
    semseg: np.ndarray  # uint8 class ids
    edges: np.ndarray  # bool
    image: np.ndarray  # uint8 [H,W,3]
    exposure: float = 1.0  # the gain from linear radiance to the image (before gamma)


def _room_hit(scene: Scene, dx, dy, dz):
    W, H, D = scene.room.tolist()
    o = scene.cam_pos.tolist()
    with np.errstate(divide="ignore"):  # a zero direction picks the positive side: +inf
        f = np.float32
        tx = np.where(dx >= 0, f(W / 2 - o[0]), f(-W / 2 - o[0])) / dx
        ty = np.where(dy >= 0, f(H - o[1]), f(-o[1])) / dy
        tz = np.where(dz >= 0, f(D / 2 - o[2]), f(-D / 2 - o[2])) / dz
    tyz = np.minimum(ty, tz)
    t = np.minimum(tx, tyz)
    ids = np.where(
        tx <= tyz,
        np.where(dx > 0, I_WALL_XP, I_WALL_XN),
        np.where(
            ty <= tz, np.where(dy > 0, I_CEIL, I_FLOOR), np.where(dz > 0, I_WALL_ZP, I_WALL_ZN)
        ),
    )
    return t, ids.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _camera_rays(fx: float, fy: float, cx: float, cy: float, h: int, w: int):
    """(x/z, y/z) of every pixel's ray in the camera frame (read-only, cached per size)."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    xc, yc = (u - np.float32(cx)) / np.float32(fx), (v - np.float32(cy)) / np.float32(fy)
    xc.flags.writeable = yc.flags.writeable = False
    return xc, yc


def cast(scene: Scene, K: np.ndarray, h: int, w: int):
    """Primary rays: z-depth t, primitive map (-1 - room instance for room, else prim index),
    world ray directions (z_cam = 1)."""
    xc, yc = _camera_rays(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), h, w)
    R = scene.cam_rot.astype(np.float32)
    dx = R[0, 0] * xc + R[0, 1] * yc + R[0, 2]
    dy = R[1, 0] * xc + R[1, 1] * yc + R[1, 2]
    dz = R[2, 0] * xc + R[2, 1] * yc + R[2, 2]
    t, room_ids = _room_hit(scene, dx, dy, dz)
    prim = -1 - room_ids
    o = scene.cam_pos.tolist()
    for k, p in enumerate(scene.prims):
        win = _screen_box(p, K, scene.cam_rot, scene.cam_pos, h, w)
        if win is None:
            continue
        tk = _HIT[p.kind](p, o[0], o[1], o[2], dx[win], dy[win], dz[win])
        closer = tk < t[win]
        t[win] = np.where(closer, tk, t[win])
        prim[win] = np.where(closer, k, prim[win])
    return t, prim, (dx, dy, dz)


def surface(scene: Scene, prim_map: np.ndarray, P: tuple[np.ndarray, ...]):
    """World normals and surface coordinates (s, t) in metres for every pixel."""
    shape = prim_map.shape
    n = np.zeros((3, *shape), dtype=np.float32)
    s = np.zeros(shape, dtype=np.float32)
    tt = np.zeros(shape, dtype=np.float32)
    px, py, pz = P
    room = {  # instance: (normal, s, t)
        I_FLOOR: ((0, 1, 0), px, pz),
        I_CEIL: ((0, -1, 0), px, pz),
        I_WALL_XN: ((1, 0, 0), pz, py),
        I_WALL_XP: ((-1, 0, 0), -pz, py),
        I_WALL_ZN: ((0, 0, 1), px, py),
        I_WALL_ZP: ((0, 0, -1), -px, py),
    }
    flat = prim_map.ravel() + 6  # room surfaces are -6..-1
    order = np.argsort(flat, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=len(scene.prims) + 6))])
    nf, sf, tf = n.reshape(3, -1), s.reshape(-1), tt.reshape(-1)
    pxf, pyf, pzf = px.reshape(-1), py.reshape(-1), pz.reshape(-1)
    for inst, (normal, ss, ts) in room.items():
        m = order[bounds[5 - inst] : bounds[6 - inst]]
        nf[:, m] = np.array(normal, dtype=np.float32)[:, None]
        sf[m], tf[m] = ss.reshape(-1)[m], ts.reshape(-1)[m]
    for k, p in enumerate(scene.prims):
        m = order[bounds[k + 6] : bounds[k + 7]]
        if not len(m):
            continue
        cx, cy, cz = p.centre.tolist()
        rx, ry, rz = pxf[m] - cx, pyf[m] - cy, pzf[m] - cz
        if p.kind == "box":
            c, sn = math.cos(p.yaw), math.sin(p.yaw)
            lx, lz = c * rx - sn * rz, sn * rx + c * rz
            rel = np.stack([np.abs(lx) / p.half[0], np.abs(ry) / p.half[1], np.abs(lz) / p.half[2]])
            axis = rel.argmax(0)
            sign = np.sign(np.choose(axis, [lx, ry, lz]))
            nl = np.zeros((3, len(lx)), dtype=np.float32)
            nl[axis, np.arange(len(lx))] = sign
            # local -> world: x_w = c x_l + s z_l, z_w = -s x_l + c z_l
            nf[:, m] = np.stack([c * nl[0] + sn * nl[2], nl[1], -sn * nl[0] + c * nl[2]])
            sf[m] = np.choose(axis, [lz, lx, lx])
            tf[m] = np.choose(axis, [ry, lz, ry])
        elif p.kind == "sphere":
            nr = np.stack([rx, ry, rz])
            nf[:, m] = nr / np.linalg.norm(nr, axis=0)
            sf[m] = np.arctan2(rx, rz) * p.r
            tf[m] = ry
        else:
            cap = ry >= p.height - 1e-4
            rad = np.sqrt(rx * rx + rz * rz) + 1e-12
            nf[:, m] = np.stack(
                [np.where(cap, 0, rx / rad), cap.astype(np.float32), np.where(cap, 0, rz / rad)]
            )
            sf[m] = np.where(cap, rx, np.arctan2(rx, rz) * p.r)
            tf[m] = np.where(cap, rz, ry)
    return n, s, tt


def apply_decals(scene: Scene, inst: np.ndarray, s: np.ndarray, t: np.ndarray):
    """Relabel decal pixels; returns normalised decal coordinates (a, b) in [0, 1]."""
    a = np.zeros_like(s)
    b = np.zeros_like(t)
    for d in scene.decals:
        m = inst == d.support
        if not m.any():
            continue
        ds, dt = s[m] - d.centre[0], t[m] - d.centre[1]
        if d.yaw:
            c, sn = math.cos(d.yaw), math.sin(d.yaw)
            ds, dt = c * ds - sn * dt, sn * ds + c * dt
        inside = (np.abs(ds) <= d.half[0]) & (np.abs(dt) <= d.half[1])
        if not inside.any():
            continue
        idx = np.flatnonzero(m)[inside]
        inst.flat[idx] = d.inst
        a.flat[idx] = (ds[inside] / d.half[0] + 1) / 2
        b.flat[idx] = 1 - (dt[inside] / d.half[1] + 1) / 2  # b = 0 at the top of wall decals
    return a, b


def shadow(scene: Scene, P: tuple[np.ndarray, ...], n: np.ndarray, lit: np.ndarray) -> np.ndarray:
    """1 where the light is visible from the surface point, else 0 (exact, objects only)."""
    L = scene.light.tolist()
    vis = np.ones(P[0].shape, dtype=np.float32)
    where = np.flatnonzero(lit)  # unlit points stay 1: their diffuse term is 0 anyway
    px, py, pz = (c.ravel()[where] for c in P)
    # light-centred projection (looking down) of every lit point, to cull per primitive
    zl = L[1] - py
    safe = np.maximum(zl, 1e-3)
    ul, wl = (px - L[0]) / safe, (pz - L[2]) / safe
    nx, ny, nz = (c.ravel()[where] for c in n)
    for p in scene.prims:
        cor = p.corners() - scene.light
        cz = -cor[:, 1]
        if (cz <= 1e-3).any():
            cand = np.ones(len(where), dtype=bool)
        else:
            cu, cw = cor[:, 0] / cz, cor[:, 2] / cz
            cand = (
                (zl > float(cz.min()))
                & (ul >= float(cu.min()))
                & (ul <= float(cu.max()))
                & (wl >= float(cw.min()))
                & (wl <= float(cw.max()))
            )
        sel = np.flatnonzero(cand)
        if not len(sel):
            continue
        ox = px[sel] + 1e-3 * nx[sel]
        oy = py[sel] + 1e-3 * ny[sel]
        oz = pz[sel] + 1e-3 * nz[sel]
        t = _HIT[p.kind](p, ox, oy, oz, L[0] - ox, L[1] - oy, L[2] - oz)
        vis.flat[where[sel[t < 1.0]]] = 0.0
    return vis


def instance_edges(inst: np.ndarray) -> np.ndarray:
    """True where a 4-neighbour belongs to another instance (boundaries are 2 pixels wide)."""
    e = np.zeros(inst.shape, dtype=bool)
    dv = inst[1:] != inst[:-1]
    dh = inst[:, 1:] != inst[:, :-1]
    e[1:] |= dv
    e[:-1] |= dv
    e[:, 1:] |= dh
    e[:, :-1] |= dh
    return e
