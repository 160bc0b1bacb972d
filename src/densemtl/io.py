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


# EXIF orientation (tag 274) -> numpy operations on an [H,W,...] array that undo it
_ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


def image_to_float(img: Image.Image, bits: int | None = None) -> np.ndarray:
    """A decoded Pillow image as float32 RGB [H,W,3] in [0, 1], upright.

    EXIF orientation is applied; palette, grey, CMYK, ... images become RGB (alpha is dropped);
    16-bit and 32-bit integer samples are scaled by their bit depth (``bits`` when the caller
    knows it, e.g. 16 for a 16-bit PNG that Pillow opened as 32-bit ``I``); float samples already
    in [0, 1] are kept and others are scaled by their range (:func:`float_range`).
    """
    orientation = img.getexif().get(274, 1) if hasattr(img, "getexif") else 1
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.float32) / 65535.0
    elif img.mode == "I":
        raw = np.asarray(img).astype(np.float64)
        top = 2.0**bits - 1 if bits else 2.0**31 - 1  # Pillow's "I" is signed 32-bit
        arr = (np.clip(raw, 0, None) / top).astype(np.float32)
    elif img.mode == "F":
        arr = float_range(np.asarray(img, dtype=np.float32))
    else:
        rgb = img if img.mode in ("RGB", "L") else img.convert("RGB")
        arr = np.asarray(rgb, dtype=np.float32)
        arr *= np.float32(1 / 255)
    return orient(as_rgb(arr), orientation)


def float_range(arr: np.ndarray) -> np.ndarray:
    """Float samples in [0, 1] as they are; any other range mapped from [min(0, minimum),
    maximum] to [0, 1] (so 0 stays black); NaN and infinities become 0."""
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo >= 0.0 and hi <= 1.0:
        return arr
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def array_to_float(arr: np.ndarray) -> np.ndarray:
    """An [H,W] or [H,W,C] array (uint8, uint16, other integers or floats) as float32 RGB
    [H,W,3] in [0, 1]: integers by their type's range, floats as :func:`float_range`."""
    a = np.asarray(arr)
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        a = (np.clip(a.astype(np.float64), 0, None) / info.max).astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        a = float_range(a)
    else:
        raise TypeError(f"cannot read an image from an array of dtype {a.dtype}")
    return as_rgb(a)


def as_rgb(arr: np.ndarray) -> np.ndarray:
    """[H,W], [H,W,1], [H,W,2] (grey + alpha), [H,W,3] or [H,W,4] -> [H,W,3]."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"an image must be [H,W] or [H,W,C] with C in 1..4, got {arr.shape}")
    if arr.shape[2] in (1, 2):
        return np.repeat(arr[..., :1], 3, axis=2)
    return arr[..., :3]


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Undo an EXIF orientation (1-8) on an [H,W,...] array."""
    turn = _ORIENTATIONS.get(int(orientation))
    return np.ascontiguousarray(arr if turn is None else turn(arr))


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Any image file as float32 RGB [H,W,3] in [0, 1] (see :func:`image_to_float`).

    16-bit colour PNGs are decoded exactly (Pillow reads them as 8-bit); TIFFs go through
    ``tifffile`` (Pillow truncates 16-bit colour TIFFs to 8 bits).
    """
    path = require_file(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                arr = tif.asarray()
                orientation = getattr(tif.pages[0].tags.get("Orientation"), "value", 1)
        except Exception as e:  # tifffile raises many types for broken files
            raise DataError(f"cannot decode image {path}: {e}") from e
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # planar [C,H,W] storage
        return orient(array_to_float(arr), int(orientation))
    try:
        img = Image.open(path)
        bits16 = img.format == "PNG" and bool(img.tile) and str(img.tile[0][3]).endswith(";16B")
        if bits16 and img.mode in ("RGB", "RGBA"):
            orientation = img.getexif().get(274, 1)
            return orient(as_rgb(_png16_colour(path, img).astype(np.float32) / 65535.0),
                          orientation)
        img.load()
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path}: {e}") from e
    return image_to_float(img, bits=16 if bits16 else None)


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


def _ramp_table(levels: int = 1024) -> np.ndarray:
    """The ramp interpolated at ``levels`` evenly spaced points, uint8 [levels, 3]."""
    t = np.linspace(0.0, len(_RAMP) - 1, levels)
    i = np.minimum(t.astype(np.int64), len(_RAMP) - 2)
    frac = (t - i)[:, None]
    return (_RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac).round().astype(np.uint8)


_RAMP_TABLE = _ramp_table()


def colour_ramp(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float [H,W] -> uint8 [H,W,3] on a continuous colour ramp, ``lo`` dark blue, ``hi`` red
    (1024 levels, looked up: a 12-megapixel map needs no float colour volume)."""
    t = np.asarray(values, np.float32) - np.float32(lo)
    t *= np.float32((len(_RAMP_TABLE) - 1) / max(hi - lo, 1e-6))
    np.clip(t, 0, len(_RAMP_TABLE) - 1, out=t)
    return _RAMP_TABLE[np.rint(t).astype(np.uint16)]
