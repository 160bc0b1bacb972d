"""Joint transforms: per-key interpolation, padding values, flips, jitter, the standard pipeline."""

from __future__ import annotations

import pytest
import torch

from densemtl.data.geometry import make_intrinsics
from densemtl.data.sample import validate_sample
from densemtl.data.transforms import (
    ColorJitter,
    RandomCrop,
    RandomHorizontalFlip,
    build_transforms,
    crop,
    hflip,
    resize,
)


def _sample(h=8, w=12):
    g = torch.Generator().manual_seed(0)
    normals = torch.nn.functional.normalize(torch.randn(3, h, w, generator=g), dim=0)
    normals[:, 0, 0] = 0.0  # one invalid normal
    depth = torch.rand(1, h, w, generator=g) + 1.0
    depth[0, 1, 1] = 0.0
    edges = torch.zeros(1, h, w)
    edges[0, :, 5] = 1.0  # a one-pixel vertical edge
    return {
        "image": torch.rand(3, h, w, generator=g),
        "semseg": torch.arange(h * w).reshape(h, w) % 7,
        "depth": depth,
        "normals": normals,
        "edges": edges,
        "K": make_intrinsics(10.0, 10.0, 5.5, 3.5),
        "id": "t",
    }


def test_resize_is_nearest_for_labels_and_keeps_edges():
    s = _sample()
    up = resize(s, 16, 24)  # exact 2x: every label pixel becomes a 2x2 block
    assert torch.equal(up["semseg"], s["semseg"].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(up["depth"][0, 2:4, 2:4], torch.zeros(2, 2))  # invalid stays invalid
    down = resize(s, 4, 6)  # 2x down: the edge column 5 falls in output column 2
    assert down["edges"][0, :, 2].tolist() == [1.0] * 4 and down["edges"].sum() == 4
    assert set(down["depth"].unique().tolist()) <= set(s["depth"].unique().tolist())
    n = resize(s, 5, 7)["normals"].norm(dim=0)
    assert ((n - 1).abs() < 1e-5).logical_or(n == 0).all()
    validate_sample(resize(s, 5, 7), num_classes=7)


def test_crop_pads_with_invalid_values():
    s = _sample()
    c = crop(s, -2, -3, 8, 12)
    assert (c["semseg"][:2] == 255).all() and (c["semseg"][:, :3] == 255).all()
    assert (c["depth"][:, :2] == 0).all() and (c["normals"][:, :, :3] == 0).all()
    assert (c["image"][:, :2] == 0).all() and (c["edges"][:, :2] == 0).all()
    assert torch.equal(c["semseg"][2:, 3:], s["semseg"][:6, :9])
    assert c["K"][0, 2] == pytest.approx(8.5) and c["K"][1, 2] == pytest.approx(5.5)


def test_hflip_negates_normal_x_and_mirrors_cx():
    s = _sample()
    f = hflip(s)
    assert torch.equal(f["normals"][0], -s["normals"][0].flip(-1))
    assert torch.equal(f["normals"][1:], s["normals"][1:].flip(-1))
    assert torch.equal(f["semseg"], s["semseg"].flip(-1))
    assert f["K"][0, 2] == pytest.approx(12 - 1 - 5.5)
    back = hflip(f)
    for k in ("image", "semseg", "depth", "normals", "edges", "K"):
        assert torch.equal(back[k], s[k]), k


def test_random_transforms_use_torch_seed_and_keep_contract():
    s = _sample(20, 30)
    torch.manual_seed(3)
    a = RandomCrop(10, 10)(s)
    torch.manual_seed(3)
    b = RandomCrop(10, 10)(s)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["K"], b["K"])
    flips = [RandomHorizontalFlip(0.5)(s)["K"][0, 2].item() != 5.5 for _ in range(200)]
    assert 60 < sum(flips) < 140
    j = ColorJitter(0.5, 0.5, 0.5, 0.1)(s)
    assert not torch.equal(j["image"], s["image"])
    assert all(torch.equal(j[k], s[k]) for k in ("semseg", "depth", "normals", "edges", "K"))


def test_build_transforms_train_and_eval():
    s = _sample(40, 60)
    torch.manual_seed(0)
    train = build_transforms(16, 24, train=True, scale_range=(0.5, 1.5), color_jitter=0.2)
    for _ in range(10):
        out = train(s)
        assert out["image"].shape == (3, 16, 24)
        validate_sample(out, num_classes=7)
    cropped = build_transforms(16, 24, train=True, crop=(8, 12), hflip_p=0.0)(s)
    assert cropped["semseg"].shape == (8, 12)
    ev = build_transforms(16, 24, train=False)(s)
    assert torch.equal(ev["K"], resize(s, 16, 24)["K"])
