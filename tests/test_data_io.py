"""File readers/writers: exact 16-bit PNGs, errors that name the file, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from densemtl.io import (
    DataError,
    png_bytes,
    read_json,
    read_npy,
    read_png,
    read_rgb,
    save_npy,
    write_atomic,
)

from test_data_helpers import raw_png, rgb_image


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (4, 6, 4)])
def test_16bit_png_exact_from_an_independent_writer(tmp_path, shape):
    a = np.random.default_rng(1).integers(0, 65536, shape).astype(np.uint16)
    a.flat[:3] = [0, 255, 65535]  # low byte only, and the extremes
    out = read_png(raw_png(tmp_path / "x.png", a))
    assert out.dtype == np.uint16 and np.array_equal(out, a)


@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_encoder_round_trip_every_filter(tmp_path, filter_type, dtype):
    a = np.random.default_rng(2).integers(0, np.iinfo(dtype).max + 1, (6, 9, 3)).astype(dtype)
    path = tmp_path / "y.png"
    path.write_bytes(png_bytes(a, filter_type=filter_type))
    assert np.array_equal(read_png(path), a)
    assert png_bytes(a, filter_type=filter_type) == path.read_bytes()  # deterministic


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.png"):
        read_rgb(tmp_path / "nothing.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png"):
        read_rgb(bad)
    rgb_image(tmp_path / "ok.png", 32, 32)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    with pytest.raises(DataError, match=r"truncated\.png"):
        read_png(truncated)
    (tmp_path / "a.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"a\.npy"):
        read_npy(tmp_path / "a.npy")
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(DataError, match=r"c\.json"):
        read_json(tmp_path / "c.json")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "f.bin"

    def explode(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(target, explode)
    assert not target.exists() and list((tmp_path / "sub").iterdir()) == []
    save_npy(target.with_suffix(".npy"), np.arange(3))
    assert read_npy(target.with_suffix(".npy")).tolist() == [0, 1, 2]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    """Atomic writes rename a temporary file: the result must still have the mode any new file
    gets under the user's umask (0666 minus it), e.g. 0644 for a shared results folder."""
    import os

    import torch

    from densemtl.io import save_json, save_npy, save_png, save_text, save_torch

    old = os.umask(umask)
    try:
        writers = {"a.png": lambda p: save_png(p, np.zeros((4, 5, 3), np.uint8)),
                   "a.json": lambda p: save_json(p, {"x": 1}),
                   "a.npy": lambda p: save_npy(p, np.zeros(3)),
                   "a.md": lambda p: save_text(p, "x"),
                   "a.ckpt": lambda p: save_torch(p, {"w": torch.zeros(2)})}
        for name, write in writers.items():
            write(tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    finally:
        os.umask(old)
