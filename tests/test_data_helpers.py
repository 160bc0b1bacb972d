"""Helpers for the data tests: tiny files in the datasets' distributed formats.

``raw_png`` is a deliberately minimal PNG writer (no filtering, written independently of
``densemtl.io``) so that the decoders are checked against bytes they did not produce.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def raw_png(path: Path, array: np.ndarray) -> Path:
    """Write uint8/uint16 [H,W] or [H,W,3|4] as a PNG with filter type 0 on every row."""
    a = np.asarray(array)
    h, w = a.shape[:2]
    channels = 1 if a.ndim == 2 else a.shape[2]
    colour = {1: 0, 3: 2, 4: 6}[channels]
    bits = 16 if a.dtype == np.uint16 else 8
    data = a.astype(">u2" if bits == 16 else np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + data[i].tobytes() for i in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, colour, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def rgb_image(path: Path, h: int, w: int, seed: int = 0, fmt: str | None = None) -> np.ndarray:
    """A random 8-bit RGB image saved with Pillow (PNG or JPEG by extension)."""
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format=fmt)
    return img


def grey_png(path: Path, array: np.ndarray) -> Path:
    """8-bit or 16-bit single-channel PNG through Pillow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def angle_deg(a, b):
    """Per-pixel angle between [3,...] unit-vector fields, in degrees."""
    import torch

    cos = (a * b).sum(0).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))
