"""Every file densemtl reads or writes goes through here: readers whose errors name the file,
one atomic write, PNG / JPEG / NPY / JSON / text / torch savers, and colour palettes.

Readers return numpy arrays in the file's own bit depth. 16-bit PNGs are read with Pillow only
(no OpenCV): grey ones natively, RGB/RGBA ones by decoding the file twice, once keeping the high
and once the low byte of every sample (Pillow has no 16-bit colour mode, but its unpackers for
both byte orders exist), which is exact. Writers are atomic: a temporary file in the target folder
renamed over the target, so an interrupted run never leaves a half-written file behind. The
temporary file is created like any new file (mode 0666 minus the umask), so what is written is
as readable by colleagues as a file written with ``open``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError)


class DataError(ValueError):
    """A data file is unreadable or its content breaks the format; the message names it."""


def require_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, or FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"missing file: {path}", str(path))
    return path


def _open_image(path: Path) -> Image.Image:
    require_file(path)
    try:
        img = Image.open(path)
        img.load()
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path}: {e}") from e
    return img


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """An 8-bit colour image as uint8 [H,W,3]."""
    img = _open_image(Path(path))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _png16_colour(path: Path, img: Image.Image) -> np.ndarray:
    """Exact decode of a 16-bit RGB/RGBA PNG: high bytes and low bytes in two passes."""
    rawmode = img.tile[0][3] if img.tile else None  # (codec, extents, offset, args)
    big = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
    if rawmode not in big:
        raise DataError(f"unsupported 16-bit PNG layout in {path} (raw mode {rawmode!r})")
    planes = []
    for raw in (rawmode, big[rawmode]):
        with Image.open(path) as im:
            tile = (*im.tile[0][:3], raw)
            kind = type(im.tile[0])  # a named tuple since Pillow 11, a plain tuple before
            im.tile = [kind(*tile) if hasattr(kind, "_fields") else tile]
            im.load()
            planes.append(np.asarray(im).astype(np.uint16))
    return (planes[0] << 8) | planes[1]


def read_png(path: str | os.PathLike[str]) -> np.ndarray:
    """A PNG in its own bit depth: uint8 or uint16, [H,W] (grey/palette) or [H,W,C]."""
    path = Path(path)
    require_file(path)
    try:
        img = Image.open(path)
        bits16 = img.format == "PNG" and img.tile and str(img.tile[0][3]).endswith(";16B")
        if bits16 and img.mode in ("RGB", "RGBA"):
            return _png16_colour(path, img)
        img.load()
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path}: {e}") from e
    if bits16 and img.mode not in ("I;16", "I;16B", "I", "RGB", "RGBA"):
        raise DataError(f"unsupported 16-bit PNG mode {img.mode!r} in {path}")
    arr = np.asarray(img)
    if img.mode == "I" and bits16:  # some Pillow versions open 16-bit grey as 32-bit "I"
        arr = arr.astype(np.uint16)
    return arr


def read_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``.npy`` array (no pickles)."""
    path = require_file(path)
    try:
        return np.load(path, allow_pickle=False)
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot read array {path}: {e}") from e


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON document."""
    path = require_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse JSON {path}: {e}") from e


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:  # permissions follow the umask, like any new file
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def _filter_rows(rows: np.ndarray, bpp: int, filter_type: int) -> np.ndarray:
    """PNG sub (1), average (3) or Paeth (4) filtering of int16 byte rows."""
    up = np.zeros_like(rows)
    up[1:] = rows[:-1]
    left = np.zeros_like(rows)
    left[:, bpp:] = rows[:, :-bpp]
    if filter_type == 1:
        pred = left
    elif filter_type == 3:
        pred = (left + up) // 2
    elif filter_type == 4:
        up_left = np.zeros_like(rows)
        up_left[1:, bpp:] = rows[:-1, :-bpp]
        p = left + up - up_left
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    else:
        raise ValueError(f"PNG filter type must be 0..4, got {filter_type}")
    return ((rows - pred) % 256).astype(np.uint8)


def _deflate(data: bytes, level: int) -> bytes:
    """zlib stream with run-length matching only: about twice as fast as the default strategy on
    noisy images, and no larger after the "up" filter."""
    z = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    return z.compress(data) + z.flush()


def png_bytes(array: np.ndarray, compress_level: int = 1, filter_type: int = 2) -> bytes:
    """Encode a uint8/uint16 [H,W] or [H,W,C] (C = 1, 2, 3, 4) array as PNG.

    One filter for every row (0 none, 1 sub, 2 up, 3 average, 4 Paeth; "up" is fast and
    compresses images well), run-length deflate and no metadata chunks, so equal arrays give
    equal bytes.
    """
    a = np.ascontiguousarray(array)
    if a.dtype not in (np.uint8, np.uint16) or a.ndim not in (2, 3):
        raise ValueError(f"cannot encode {a.dtype} array of shape {a.shape} as PNG")
    h, w = a.shape[:2]
    channels = 1 if a.ndim == 2 else a.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bpp = channels * a.itemsize
    rows8 = a.astype(a.dtype.newbyteorder(">"), copy=False).view(np.uint8).reshape(h, w * bpp)
    if filter_type in (0, 2):  # fast path: uint8 arithmetic wraps modulo 256 as PNG requires
        filtered = rows8.copy()
        if filter_type == 2:
            filtered[1:] -= rows8[:-1]
    else:
        filtered = _filter_rows(rows8.astype(np.int16), bpp, filter_type)
    raw = np.concatenate([np.full((h, 1), filter_type, np.uint8), filtered], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8 * a.itemsize, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", _deflate(raw, compress_level))
        + _png_chunk(b"IEND", b"")
    )


def save_png(path: str | os.PathLike[str], array: np.ndarray, compress_level: int = 1) -> None:
    """Atomically write ``array`` as a PNG (deterministic bytes for equal arrays)."""
    data = png_bytes(array, compress_level)
    write_atomic(path, lambda f: f.write(data))


def save_jpeg(path: str | os.PathLike[str], array: np.ndarray, quality: int = 95) -> None:
    """Atomically write an RGB uint8 array as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    write_atomic(path, lambda f: f.write(buf.getvalue()))


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Atomically write ``array`` as ``.npy``."""
    write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def save_json(path: str | os.PathLike[str], obj: Any, sort_keys: bool = True) -> None:
    """Atomically write ``obj`` as indented JSON (keys sorted unless ``sort_keys=False``)."""
    data = (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode()
    write_atomic(path, lambda f: f.write(data))


def save_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 text."""
    data = text.encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` with ``torch.save`` (checkpoints)."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


# --- colours ------------------------------------------------------------------------------------

def palette(num_classes: int) -> np.ndarray:
    """A deterministic, well-spread uint8 [C,3] palette: the bits of ``class + 1`` interleaved
    over R, G and B from the most significant bit down (the PASCAL VOC scheme; class 0 is not
    black)."""
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(num_classes):
        c, r, g, b = i + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[i] = (r, g, b)
    return out


# Anchors of a perceptually ordered dark-blue -> teal -> yellow -> red ramp (our own).
_RAMP = np.array([
    [48, 18, 59], [65, 69, 171], [70, 117, 237], [57, 162, 252], [27, 207, 212],
    [36, 236, 166], [97, 252, 108], [164, 252, 59], [209, 232, 52], [243, 198, 58],
    [254, 155, 45], [243, 99, 21], [217, 56, 6], [177, 25, 1], [122, 4, 3],
], dtype=np.float32)


def colour_ramp(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float [H,W] -> uint8 [H,W,3] on a continuous colour ramp, ``lo`` dark blue, ``hi`` red."""
    t = np.clip((np.asarray(values, np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    t = t * (len(_RAMP) - 1)
    i = np.minimum(t.astype(np.int64), len(_RAMP) - 2)
    frac = (t - i)[..., None]
    return (_RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac).round().astype(np.uint8)
