"""Intrinsics under resize / crop / flip (checked against the real image operations) and
normals from the depth of analytic planes."""

from __future__ import annotations

import math

import pytest
import torch

from densemtl.data.geometry import (
    backproject,
    hflip_intrinsics,
    make_intrinsics,
    normals_from_depth,
    pixel_rays,
    project,
)
from densemtl.data.transforms import crop, hflip, resize

from test_data_helpers import angle_deg

H, W = 24, 32
K0 = make_intrinsics(30.0, 28.0, 14.3, 12.7)


def _coordinate_sample(h=H, w=W, K=K0):
    """An image whose channels hold each pixel's own (u, v): resizing interpolates them."""
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    image = torch.stack([u / 100, v / 100, torch.zeros_like(u)])  # kept inside [0, 1]
    return {"image": image, "K": K.clone(), "id": "c"}


def _points_seen(sample, interior=2):
    """3D points behind the original pixel coordinates stored in the transformed image."""
    u0 = sample["image"][0] * 100
    v0 = sample["image"][1] * 100
    sl = (slice(interior, -interior), slice(interior, -interior))
    u0, v0 = u0[sl].reshape(-1), v0[sl].reshape(-1)
    rays = torch.linalg.inv(K0.double()) @ torch.stack([u0, v0, torch.ones_like(u0)]).double()
    P = (rays * 2.5).T  # depth 2.5 m
    v1, u1 = torch.meshgrid(
        torch.arange(sample["image"].shape[1]),
        torch.arange(sample["image"].shape[2]),
        indexing="ij",
    )
    target = torch.stack([u1[sl].reshape(-1), v1[sl].reshape(-1)], 1).double()
    return P, target


@pytest.mark.parametrize("size", [(48, 64), (12, 16), (17, 45)])
def test_resize_intrinsics_project_points_to_the_resized_pixels(size):
    s = resize(_coordinate_sample(), *size)
    P, target = _points_seen(s)
    uv = project(P, s["K"].double())
    # 0.05 px: the antialiasing filter's own rounding; the other pixel-centre convention would
    # be 0.5 |s - 1| >= 0.15 px off for these sizes
    assert (uv - target).abs().max() < 0.05


def test_crop_and_padding_intrinsics():
    s = crop(_coordinate_sample(), 5, 7, 12, 20)
    P, target = _points_seen(s, interior=1)
    assert (project(P, s["K"].double()) - target).abs().max() < 1e-5
    padded = crop(_coordinate_sample(), -3, -4, H + 6, W + 8)  # zero-filled border
    assert padded["K"][0, 2] == pytest.approx(14.3 + 4) and padded["K"][1, 2] == pytest.approx(
        12.7 + 3
    )
    assert padded["image"][:, :3].abs().sum() == 0


def test_flip_intrinsics_mirror_the_scene():
    s = hflip(_coordinate_sample())
    P, target = _points_seen(s, interior=1)
    P[:, 0] = -P[:, 0]  # the flipped image shows the mirrored scene
    assert (project(P, s["K"].double()) - target).abs().max() < 1e-5
    assert s["K"][0, 2] == pytest.approx(W - 1 - 14.3)
    assert torch.allclose(hflip_intrinsics(hflip_intrinsics(K0, W), W), K0)


def _plane_depth(n, d, K, h, w):
    """Z of the plane n . P = d along every pixel ray (rays have z = 1)."""
    rays = pixel_rays(K.double(), h, w)
    return (d / (n[:, None, None] * rays).sum(0))[None]


@pytest.mark.parametrize(
    "normal", [(0.0, 0.0, -1.0), (0.2, -0.3, -0.93), (-0.5, 0.1, -0.86), (0.0, -0.7, -0.71)]
)
def test_normals_of_analytic_planes_within_half_a_degree(normal):
    n = torch.tensor(normal, dtype=torch.float64)
    n = n / n.norm()
    K = make_intrinsics(40.0, 42.0, 19.5, 15.2)
    depth = _plane_depth(n, -3.0, K, 32, 40).float()
    assert (depth > 0).all()
    est = normals_from_depth(depth, K)
    err = angle_deg(est.double(), n[:, None, None].expand(3, 32, 40))
    assert err.max() < 0.5
    # orientation: towards the camera
    P = backproject(depth.double(), K.double())
    assert ((est.double() * P).sum(0) < 0).all()


def test_normals_after_resize_use_the_scaled_intrinsics():
    """Nearest-resized depth of a plane + the resized K still gives the plane's normal."""
    n = torch.tensor([0.25, -0.4, -0.88], dtype=torch.float64)
    n = n / n.norm()
    K = make_intrinsics(200.0, 200.0, 99.5, 79.5)
    s = {
        "image": torch.zeros(3, 160, 200),
        "depth": _plane_depth(n, -2.0, K, 160, 200).float(),
        "K": K,
    }
    small = resize(s, 40, 50)
    err = angle_deg(
        normals_from_depth(small["depth"], small["K"]).double(), n[:, None, None].expand(3, 40, 50)
    )
    assert err.max() < 0.5
    # with the unscaled (full-resolution) K, as the official code does, normals are wrong
    wrong = angle_deg(
        normals_from_depth(small["depth"], K).double(), n[:, None, None].expand(3, 40, 50)
    )
    assert wrong.median() > 5


def test_normals_at_discontinuities_and_invalid_depth():
    n = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    K = make_intrinsics(20.0, 20.0, 9.5, 9.5)
    depth = _plane_depth(n, -2.0, K, 20, 20).float()
    depth[:, :, 10:] = 4.0  # a step: two fronto-parallel planes
    depth[:, 5, 5] = 0.0
    est = normals_from_depth(depth, K)
    assert est[:, 5, 5].abs().sum() == 0  # invalid depth -> 0-vector
    valid = est.norm(dim=0) > 0
    assert valid.sum() == 20 * 20 - 1
    err = angle_deg(est.double(), n[:, None, None].expand(3, 20, 20))
    assert err[valid].max() < 1e-3  # each side uses its own neighbours, no smearing at the step


def test_normals_batched_and_flip_consistent():
    n = torch.tensor([0.3, -0.2, -0.93], dtype=torch.float64)
    n = n / n.norm()
    K = make_intrinsics(30.0, 30.0, 12.0, 10.0)
    depth = _plane_depth(n, -2.0, K, 20, 26).float()
    s = {
        "image": torch.zeros(3, 20, 26),
        "depth": depth,
        "K": K,
        "normals": normals_from_depth(depth, K),
    }
    f = hflip(s)
    again = normals_from_depth(f["depth"], f["K"])
    assert angle_deg(again.double(), f["normals"].double()).max() < 0.05
    assert float(f["normals"][0].mean()) == pytest.approx(-float(s["normals"][0].mean()), abs=1e-6)
    batch = normals_from_depth(torch.stack([depth, f["depth"]]), torch.stack([K, f["K"]]))
    assert batch.shape == (2, 3, 20, 26) and torch.allclose(batch[1], again, atol=1e-6)
    assert math.isclose(float(batch[0, 0].mean()), float(n[0]), abs_tol=1e-4)
