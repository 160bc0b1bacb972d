"""The procedural benchmark: determinism, NYUDv2 layout, label consistency, styles, CLI."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from densemtl.data.appearance import render
from densemtl.data.geometry import normals_from_depth
from densemtl.data.scene import (
    CEILING,
    CLASS_NAMES,
    FLOOR,
    POSTER,
    RUG,
    WALL,
    WINDOW,
    intrinsics,
    sample_scene,
)
from densemtl.data.synthetic import SyntheticDataset, generate, main, render_sample

from test_data_helpers import angle_deg

TASKS = ["semseg", "depth", "normals", "edges"]


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_across_runs_and_workers(tmp_path):
    generate(tmp_path / "a", 5, 2, 40, 56, seed=0, workers=2, progress=False)
    generate(tmp_path / "b", 5, 2, 40, 56, seed=0, workers=1, progress=False)
    generate(tmp_path / "c", 5, 2, 40, 56, seed=1, workers=2, progress=False)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert len(a) == 5 * 5 + 2 * 5 + 3  # 5 files per sample, 2 split lists, meta.json
    assert a == b
    assert a.keys() == c.keys()
    assert a["images/train_000000.png"] != c["images/train_000000.png"]
    generate(tmp_path / "a", 3, 1, 40, 56, seed=0, workers=2, progress=False)  # replaced, no stale
    assert not (tmp_path / "a" / "images" / "train_000004.png").exists()


@pytest.mark.parametrize("variant", ["png", "npy"])
def test_loader_reads_it_and_normals_match_depth(tmp_path, variant):
    meta = generate(tmp_path, 4, 1, 48, 64, seed=3, variant=variant, workers=1, progress=False)
    ds = SyntheticDataset(tmp_path, "train", TASKS, validate=True)
    assert ds.class_names == CLASS_NAMES and len(CLASS_NAMES) >= 8 and len(ds) == 4
    assert torch.allclose(ds[0]["K"], torch.tensor(meta["K"], dtype=torch.float32))
    tol = 1e-5 if variant == "npy" else 0.6  # PNG normals are quantised to 8 bits
    for i in range(len(ds)):
        s = ds[i]
        derived = normals_from_depth(s["depth"], s["K"])
        err = angle_deg(derived.double(), s["normals"].double())
        inside = s["edges"][0] == 0  # away from instance boundaries
        assert err[inside].median() < max(tol, 0.05)
        # room surfaces and their decals are planes: finite differences are exact there (box
        # creases and the curvature of balls and bins at this resolution are not)
        planar = inside & torch.isin(
            s["semseg"], torch.tensor([FLOOR, WALL, CEILING, POSTER, RUG, WINDOW])
        )
        assert planar.sum() > 500 and (err[planar] < 0.05 + tol).float().mean() > 0.99
        assert s["depth"].min() > 0.1 and s["depth"].max() < 15


def test_edges_cover_class_boundaries_and_decals_are_appearance_only():
    found = set()
    for i in range(40):
        scene = sample_scene(np.random.default_rng([7, i]))
        if not scene.decals:
            continue
        K, h, w = intrinsics(48, 64), 48, 64
        with_decals = render(scene, K, h, w, "a", np.random.default_rng(1))
        scene.decals = []
        plain = render(scene, K, h, w, "a", np.random.default_rng(1))
        assert np.array_equal(with_decals.depth, plain.depth)
        assert np.array_equal(with_decals.normals, plain.normals)
        found |= set(np.unique(with_decals.semseg).tolist()) & {POSTER, RUG, WINDOW}
        seg, e = with_decals.semseg, with_decals.edges
        step = seg[:, 1:] != seg[:, :-1]
        assert e[:, 1:][step].all() and e[:, :-1][step].all()
    assert found == {POSTER, RUG, WINDOW}


def test_styles_share_geometry_and_differ_in_appearance():
    a = render_sample(2, "val", 3, 48, 64, "a")
    b = render_sample(2, "val", 3, 48, 64, "b")
    assert np.array_equal(a.depth, b.depth) and np.array_equal(a.semseg, b.semseg)
    assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() > 10
    assert not np.array_equal(render_sample(2, "train", 3, 48, 64).depth, a.depth)  # splits differ


def test_every_class_appears(tmp_path):
    meta = generate(tmp_path, 24, 0, 24, 32, seed=0, workers=1, progress=False)
    pixels = np.array(meta["class_pixels"]["train"])
    assert pixels.sum() == 24 * 24 * 32 and (pixels > 0).all()


def test_cli(tmp_path, capsys):
    out, grid = tmp_path / "synth", tmp_path / "grid.png"
    assert (
        main(
            [
                "--out",
                str(out),
                "--train",
                "2",
                "--val",
                "1",
                "--height",
                "32",
                "--width",
                "40",
                "--seed",
                "4",
                "--style",
                "b",
                "--preview",
                str(grid),
                "--quiet",
            ]
        )
        == 0
    )
    assert "wrote 2 train + 1 val" in capsys.readouterr().out
    assert (out / "gt_sets" / "val.txt").read_text() == "val_000000\n"
    from PIL import Image

    assert Image.open(grid).size == (5 * 40, 14 + 2 * 32 + 16)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["--out", str(foreign), "--train", "1", "--val", "0", "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err and (foreign / "keep.txt").exists()
