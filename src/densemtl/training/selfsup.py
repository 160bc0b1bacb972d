"""Self-supervised depth from video (the paper's semi-supervised setting, "SDE").

Segmentation is supervised as usual; the depth task (``disp``) learns from neighbouring frames:
the predicted depth of the sample's frame and the pose network's camera motion warp each
neighbour into the sample's view, and the photometric error between the warped neighbour and the
frame (Monodepth2's recipe) is the loss:

* per output scale s, the disparity is upsampled (bilinear) to the frame's size and converted
  to depth; pixels are back-projected with the sample's intrinsics, moved by the predicted
  transform, projected, and the neighbour is sampled there (bilinear, border padding);
* the error is ``w (1 - SSIM) / 2 + (1 - w) |a - b|`` (w = 0.85; SSIM over 3x3 windows with
  reflection padding), averaged over the colour channels;
* per pixel the minimum is taken over the warped neighbours and, with auto-masking, over the
  *unwarped* neighbours too (plus noise of 1e-5 to break ties), so pixels that do not move
  with respect to the camera (or a static camera) teach nothing;
* an edge-aware smoothness of the mean-normalised disparity at its own resolution, weighted by
  ``1e-3 / 2^s``, is added; the loss is the mean over scales.

All (sample, neighbour) pairs are warped as one batch; everything runs on the device in fp32
(also inside bf16 autocast) and reads nothing back on the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.geometry import backproject
from ..functional import fp32_context
from ..models.posenet import PoseNet
from ..tasks import get_task
from .module import MultiTaskModule, reject_gradient_weighting

# --- the photometric loss --------------------------------------------------------------------

SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2


def ssim_distance(x: Tensor, y: Tensor) -> Tensor:
    """``clamp((1 - SSIM) / 2, 0, 1)`` per pixel and channel, SSIM over 3x3 windows of the
    reflection-padded images [B,C,H,W]."""
    x, y = F.pad(x, (1, 1, 1, 1), mode="reflect"), F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    var_x = F.avg_pool2d(x * x, 3, 1) - mu_x * mu_x
    var_y = F.avg_pool2d(y * y, 3, 1) - mu_y * mu_y
    cov = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return ((1 - num / den) / 2).clamp(0, 1)


def photometric_error(pred: Tensor, target: Tensor, ssim_weight: float = 0.85) -> Tensor:
    """[B,1,H,W]: ``w * SSIM distance + (1 - w) * L1``, each averaged over channels."""
    l1 = (pred - target).abs().mean(1, keepdim=True)
    if ssim_weight == 0:
        return l1
    ssim = ssim_distance(pred, target).mean(1, keepdim=True)
    return ssim_weight * ssim + (1 - ssim_weight) * l1


def warp(source: Tensor, depth: Tensor, K: Tensor, T: Tensor) -> Tensor:
    """``source`` [B,C,H,W] seen from the target camera: each target pixel, at ``depth``
    [B,1,H,W] (metres), is back-projected with ``K`` [B,3,3], moved by ``T`` [B,4,4] (target
    camera -> source camera), projected with ``K`` and ``source`` is sampled there (bilinear,
    border padding; pixel centres at integer coordinates, as everywhere in densemtl)."""
    b, _, h, w = depth.shape
    points = backproject(depth, K).flatten(2)  # [B,3,HW]
    moved = T[:, :3, :3] @ points + T[:, :3, 3:]
    pix = K @ moved
    uv = pix[:, :2] / (pix[:, 2:3] + 1e-7)  # [B,2,HW]
    scale = uv.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)]).view(1, 2, 1)
    grid = (uv * scale - 1.0).transpose(1, 2).reshape(b, h, w, 2)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border",
                         align_corners=True)


def smoothness(disparity: Tensor, image: Tensor) -> Tensor:
    """Edge-aware first-order smoothness of the mean-normalised ``disparity`` [B,1,h,w]
    against ``image`` [B,3,h,w]: ``mean |d_x disp| exp(-mean_c |d_x I|)`` + the same in y."""
    d = disparity / (disparity.mean(dim=(2, 3), keepdim=True) + 1e-7)
    dx, dy = (d[..., :, 1:] - d[..., :, :-1]).abs(), (d[..., 1:, :] - d[..., :-1, :]).abs()
    ix = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(1, keepdim=True)
    iy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(1, keepdim=True)
    return (dx * torch.exp(-ix)).mean() + (dy * torch.exp(-iy)).mean()


class PhotometricLoss(nn.Module):
    """The self-supervised depth loss (see the module docstring).

    Args:
        scales: output scales of the depth head that are supervised (the paper: 0, 1, 2, 3).
        ssim_weight: weight of the SSIM term against L1 (0.85).
        smoothness: weight of the smoothness term at scale 0 (1e-3; divided by 2^s).
        automask: also take the minimum over the unwarped neighbours.
        tie_noise: standard deviation of the noise added to the unwarped errors.
    """

    def __init__(self, scales: Sequence[int] = (0, 1, 2, 3), ssim_weight: float = 0.85,
                 smoothness: float = 1e-3, automask: bool = True,
                 tie_noise: float = 1e-5) -> None:
        super().__init__()
        if not scales or len(set(scales)) != len(scales):
            raise ValueError(f"photometric scales must be distinct and non-empty, got {scales}")
        if not 0 <= ssim_weight <= 1:
            raise ValueError(f"ssim_weight must be in [0, 1], got {ssim_weight}")
        self.scales = [int(s) for s in scales]
        self.ssim_weight, self.smoothness_weight = float(ssim_weight), float(smoothness)
        self.automask, self.tie_noise = bool(automask), float(tie_noise)

    def forward(self, raw: Mapping[int, Tensor], task: Any, image: Tensor, frames: Tensor,
                K: Tensor, poses: Tensor) -> dict[str, Tensor]:
        """``raw``: the depth head's output per scale; ``task``: its declaration
        (``disparity``, ``depth_from_disparity``); ``image`` [B,3,H,W]; ``frames``
        [B,F,3,H,W]; ``K`` [B,3,3]; ``poses`` [B,F,4,4] (sample camera -> frame camera)."""
        missing = [s for s in self.scales if s not in raw]
        if missing:
            raise KeyError(f"photometric loss: the depth head has no output at scale(s) "
                           f"{missing} (it has {sorted(raw)}); add them to the decoder's scales")
        with fp32_context(image.device):
            b, n, _, h, w = frames.shape
            # every (sample, neighbour) pair is one item of a batch of B*F warps
            sources = frames.float().flatten(0, 1)
            targets = image.float().repeat_interleave(n, dim=0)
            K_bf = K.float().repeat_interleave(n, dim=0)
            poses_bf = poses.float().flatten(0, 1)
            candidates = []
            if self.automask:
                err = photometric_error(sources, targets, self.ssim_weight).view(b, n, h, w)
                candidates.append(err + self.tie_noise * torch.randn_like(err))
            photo, smooth = [], []
            for s in self.scales:
                disp = task.disparity(raw[s].float())
                depth = task.depth_from_disparity(
                    F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=False))
                warped = warp(sources, depth.repeat_interleave(n, dim=0), K_bf, poses_bf)
                errors = photometric_error(warped, targets, self.ssim_weight).view(b, n, h, w)
                best = torch.cat([errors, *candidates], dim=1).amin(dim=1)
                photo.append(best.mean())
                small = image.float() if disp.shape[-2:] == (h, w) else F.interpolate(
                    image.float(), size=disp.shape[-2:], mode="bilinear", align_corners=False,
                    antialias=True)
                smooth.append(smoothness(disp, small) * (self.smoothness_weight / 2**s))
            photometric = torch.stack(photo).mean()
            smooth_term = torch.stack(smooth).mean()
            return {"photometric": photometric, "smoothness": smooth_term,
                    "total": photometric + smooth_term}


# --- the LightningModule -----------------------------------------------------------------------

class SelfSupervisedDepthModule(MultiTaskModule):
    """:class:`~densemtl.training.MultiTaskModule` with depth learned from video.

    Training batches carry ``frames`` (the data module's ``frames: [-1, 1]``); the supervised
    losses are the parent's (the depth task's own loss only counts samples that carry a depth
    label: none unless the data module's ``label_fraction`` keeps some), plus
    ``photometric_weight`` times the :class:`PhotometricLoss` of ``depth_task``. Evaluation is
    the parent's (the ``disp`` metric median-scales each image by default).

    Keyword arguments (every other one goes to :class:`MultiTaskModule`):
        depth_task: the task learned from video (default ``disp``; it must provide
            ``disparity`` and ``depth_from_disparity``).
        pose: ``network`` (the paper: a pose network learns the camera motion) or ``given``
            (the camera motion is known: the batches' ``poses``, e.g. from odometry, or the
            exact poses of the built-in sequences; no pose network is built).
        pose_network: :class:`~densemtl.models.posenet.PoseNet` options (``pretrained``...).
        pose_lr: learning rate of the pose network (the paper: 1e-6); it follows the schedule.
        photometric: :class:`PhotometricLoss` options (``scales``, ``ssim_weight``,
            ``smoothness``, ``automask``).
        photometric_weight: weight of the photometric loss in the total (1).
    """

    def __init__(
        self,
        *,
        depth_task: str = "disp",
        pose: str = "network",
        pose_network: dict[str, Any] | None = None,
        pose_lr: float = 1e-6,
        photometric: dict[str, Any] | None = None,
        photometric_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        reject_gradient_weighting(self)
        if depth_task not in self.task_names:
            raise ValueError(f"depth_task '{depth_task}' is not one of the model's tasks "
                             f"{self.task_names}")
        task = get_task(depth_task)
        if not (hasattr(task, "disparity") and hasattr(task, "depth_from_disparity")):
            raise ValueError(f"task '{depth_task}' cannot be learned from video: it has no "
                             "'disparity' / 'depth_from_disparity' (use the 'disp' task)")
        if pose_lr < 0 or photometric_weight < 0 or not math.isfinite(photometric_weight):
            raise ValueError("pose_lr and photometric_weight must be >= 0")
        if pose not in ("network", "given"):
            raise ValueError(f"pose must be 'network' or 'given', got {pose!r}")
        self.depth_task, self.pose = depth_task, pose
        self.pose_net = PoseNet(**(pose_network or {})) if pose == "network" else None
        self.pose_lr = float(pose_lr)
        self.photometric = PhotometricLoss(**(photometric or {}))
        self.photometric_weight = float(photometric_weight)

    def extra_param_groups(self) -> list[dict[str, Any]]:
        if self.pose_net is None:
            return []
        return [{"params": list(self.pose_net.parameters()), "lr": self.pose_lr,
                 "name": "pose"}]

    def self_supervised_loss(self, outputs: Mapping[str, Mapping[int, Tensor]],
                             batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The photometric loss of one batch with ``frames``, ``frame_offsets`` and ``K``."""
        for key in ("frames", "frame_offsets", "K", *(("poses",) if self.pose == "given" else ())):
            if key not in batch:
                raise KeyError(f"self-supervised depth needs '{key}' in the training batch: give "
                               "the data module 'frames: [-1, 1]' and a dataset with sequences "
                               "and intrinsics" + (" and known poses" if key == "poses" else ""))
        if self.pose_net is None:
            poses = batch["poses"]
        else:
            poses = self.pose_net(batch["image"], batch["frames"], batch["frame_offsets"][0])
        return self.photometric(outputs[self.depth_task], get_task(self.depth_task),
                                batch["image"], batch["frames"], batch["K"], poses)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        outputs = self(batch["image"])
        losses = self.supervised_losses(outputs, batch)
        selfsup = self.self_supervised_loss(outputs, batch)
        losses["total"] = losses["total"] + self.photometric_weight * selfsup["total"]
        extra = {f"train/{k}": v.detach() for k, v in selfsup.items() if k != "total"}
        self.log_training(losses, batch["image"].shape[0], extra)
        return losses["total"]
