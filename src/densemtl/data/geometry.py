"""Pinhole geometry: intrinsics under resize/crop/flip, back-projection, normals from depth.

Conventions (used everywhere in densemtl):

* camera frame: x right, y down, z forward; depth is the z coordinate, in metres;
* pixel (u, v) is column u, row v and its *centre* sits at the integer coordinate (u, v); the
  image covers [-0.5, W - 0.5] x [-0.5, H - 0.5];
* a point P = (X, Y, Z) projects to u = fx X / Z + s Y / Z + cx, v = fy Y / Z + cy.

Under these conventions (exact, tested by projecting points):

* resize W -> W' (sx = W'/W): fx' = sx fx, s' = sx s, cx' = sx (cx + 0.5) - 0.5 (same in y);
* crop at (top, left): cx' = cx - left, cy' = cy - top (padding = a negative offset);
* horizontal flip of a W-wide image: cx' = W - 1 - cx, s' = -s; the flipped image is the image
  of the mirrored scene (X -> -X), so normals have their x component negated.
"""

from __future__ import annotations

import torch
from torch import Tensor


def make_intrinsics(fx: float, fy: float, cx: float, cy: float) -> Tensor:
    """A float32 [3,3] pinhole matrix."""
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float32)


def scale_intrinsics(K: Tensor, sx: float, sy: float) -> Tensor:
    """Intrinsics after resizing the image by factors (sx, sy) (pixel-centre convention)."""
    K = K.clone()
    K[..., 0, :] *= sx
    K[..., 1, :] *= sy
    # K[...,0,2] is now sx*cx; the half-pixel shift makes it sx*(cx + .5) - .5
    K[..., 0, 2] += 0.5 * (sx - 1.0)
    K[..., 1, 2] += 0.5 * (sy - 1.0)
    return K


def resize_intrinsics(K: Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> Tensor:
    """Intrinsics after resizing an ``old_hw`` image to ``new_hw``."""
    return scale_intrinsics(K, new_hw[1] / old_hw[1], new_hw[0] / old_hw[0])


def crop_intrinsics(K: Tensor, top: int, left: int) -> Tensor:
    """Intrinsics after cropping at offset (top, left); negative offsets mean padding."""
    K = K.clone()
    K[..., 0, 2] -= left
    K[..., 1, 2] -= top
    return K


def hflip_intrinsics(K: Tensor, width: int) -> Tensor:
    """Intrinsics of the horizontally flipped image (the mirrored scene X -> -X)."""
    K = K.clone()
    K[..., 0, 2] = (width - 1) - K[..., 0, 2]
    K[..., 0, 1] = -K[..., 0, 1]
    return K


def pixel_rays(K: Tensor, height: int, width: int) -> Tensor:
    """K^-1 [u, v, 1]^T for every pixel: [..., 3, H, W] with z = 1."""
    dtype = K.dtype if K.is_floating_point() else torch.float32
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=K.device),
        torch.arange(width, dtype=dtype, device=K.device),
        indexing="ij",
    )
    ones = torch.ones_like(u)
    uv1 = torch.stack([u, v, ones])  # [3,H,W]
    Kinv = torch.linalg.inv(K.to(dtype))
    return torch.einsum("...ij,jhw->...ihw", Kinv, uv1)


def backproject(depth: Tensor, K: Tensor) -> Tensor:
    """Depth [..., 1, H, W] (metres) and K [..., 3, 3] -> camera-frame points [..., 3, H, W]."""
    rays = pixel_rays(K, depth.shape[-2], depth.shape[-1]).to(depth.dtype)
    return rays * depth


def project(points: Tensor, K: Tensor) -> Tensor:
    """Camera-frame points [..., 3] -> pixel coordinates [..., 2] (u, v)."""
    uvw = points @ K.transpose(-1, -2)
    return uvw[..., :2] / uvw[..., 2:3]


def _pick_tangent(P: Tensor, valid: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per pixel, the one-sided difference along ``dim`` with the smaller depth jump."""
    n = P.shape[dim]
    diff = P.narrow(dim, 1, n - 1) - P.narrow(dim, 0, n - 1)  # P[i+1] - P[i]
    pair_ok = valid.narrow(dim, 1, n - 1) & valid.narrow(dim, 0, n - 1)
    zeros = torch.zeros_like(diff.narrow(dim, 0, 1))
    no = torch.zeros_like(pair_ok.narrow(dim, 0, 1))
    fwd = torch.cat([diff, zeros], dim)
    bwd = torch.cat([zeros, diff], dim)
    fwd_ok = torch.cat([pair_ok, no], dim)
    bwd_ok = torch.cat([no, pair_ok], dim)
    inf = torch.full_like(fwd[..., 2:3, :, :], torch.inf)
    jump_f = torch.where(fwd_ok, fwd[..., 2:3, :, :].abs(), inf)
    jump_b = torch.where(bwd_ok, bwd[..., 2:3, :, :].abs(), inf)
    use_fwd = jump_f <= jump_b
    tangent = torch.where(use_fwd, fwd, bwd)
    return tangent, fwd_ok | bwd_ok


def normals_from_depth(depth: Tensor, K: Tensor) -> Tensor:
    """Unit camera-frame normals [..., 3, H, W] from metric depth [..., 1, H, W] and K.

    Each pixel's tangents are one-sided differences of back-projected points, taking the side
    with the smaller depth change (so a planar patch gets its exact normal up to the pixel next
    to a depth discontinuity, and borders use the inward side). The normal is
    ``dP/dv x dP/du``, normalised and oriented towards the camera (n . P < 0). Pixels with
    invalid depth (0), or without a valid neighbour both horizontally and vertically, get the
    0-vector. Computed in float64 for accuracy, returned in the dtype of ``depth``.
    """
    if depth.ndim < 3 or depth.shape[-3] != 1:
        raise ValueError(f"depth must be [..., 1, H, W], got {tuple(depth.shape)}")
    d64 = depth.double()
    P = backproject(d64, K.double())  # [...,3,H,W]
    valid = d64 > 0  # [...,1,H,W]
    du, ok_u = _pick_tangent(P, valid, dim=-1)
    dv, ok_v = _pick_tangent(P, valid, dim=-2)
    n = torch.linalg.cross(dv, du, dim=-3)
    norm = n.norm(dim=-3, keepdim=True)
    ok = valid & ok_u & ok_v & (norm > 0)
    n = n / norm.clamp_min(1e-300)
    facing = (n * P).sum(dim=-3, keepdim=True)
    n = torch.where(facing > 0, -n, n)
    return torch.where(ok, n, torch.zeros_like(n)).to(depth.dtype)


# --- camera motion -------------------------------------------------------------------------------

def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """Rodrigues: rotation vectors [..., 3] (axis times angle, radians) -> matrices [..., 3, 3].

    The zero vector gives the identity exactly.
    """
    angle = axis_angle.norm(dim=-1, keepdim=True)  # [..., 1]
    axis = axis_angle / angle.clamp_min(1e-12)  # (Monodepth2 adds 1e-7: a 1e-7/angle error)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1)
    cross = cross.view(*axis.shape[:-1], 3, 3)
    sin, cos = angle.sin()[..., None], angle.cos()[..., None]
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin * cross + (1 - cos) * (cross @ cross)


def rigid_transform(axis_angle: Tensor, translation: Tensor, invert: bool = False) -> Tensor:
    """4x4 transforms [..., 4, 4] ``X' = R X + t`` from a rotation vector and a translation
    (each [..., 3]); ``invert`` returns the inverse transform ``X' = R^T (X - t)``."""
    R = axis_angle_to_matrix(axis_angle)
    t = translation.unsqueeze(-1)
    if invert:
        R = R.transpose(-1, -2)
        t = -(R @ t)
    top = torch.cat([R, t], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)
