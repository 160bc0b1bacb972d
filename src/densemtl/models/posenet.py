"""The pose network of the self-supervised depth setting (Monodepth2's, as the paper uses it).

A ResNet-18 reads two frames stacked along the channels (6 inputs; the ImageNet weights of its
first convolution are duplicated and halved, so the pretrained response to two equal frames is
the single-frame one); a small decoder turns its deepest feature into a rotation vector and a
translation, scaled by 0.01. The two frames are always given in temporal order, and the
transform is inverted for a frame that comes before the sample, so that the result always takes
a point from the sample's camera frame to the other frame's (``X_k = R X_0 + t``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.models as tvm
from torch import Tensor, nn

from ..data.geometry import rigid_transform
from .encoders import NORMALISATIONS, PretrainedWeightsError, _load_torchvision_weights


class PoseNet(nn.Module):
    """Relative camera motion between two frames.

    Args:
        pretrained: ImageNet weights for the ResNet-18 (downloaded through torchvision).
        num_predictions: transforms the decoder outputs (Monodepth2 predicts 2 and uses the
            first; kept for its weight layout).
        scale: output scaling of rotation vector and translation (0.01).
        normalisation: image normalisation (``paper``: (x - 0.45) / 0.225).
    """

    def __init__(self, pretrained: bool = True, num_predictions: int = 2, scale: float = 0.01,
                 normalisation: str = "paper") -> None:
        super().__init__()
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"pose normalisation '{normalisation}' is not one of "
                             f"{sorted(NORMALISATIONS)}")
        if num_predictions < 1:
            raise ValueError(f"num_predictions must be >= 1, got {num_predictions}")
        resnet = tvm.resnet18()
        if pretrained:
            try:
                weights = _load_torchvision_weights(tvm.ResNet18_Weights.IMAGENET1K_V1)
            except PretrainedWeightsError as exc:
                raise PretrainedWeightsError(
                    f"pose network: {exc}".replace("in the encoder config",
                                                   "in the pose_network config")) from exc
            resnet.load_state_dict(weights)
        conv1 = nn.Conv2d(6, 64, 7, 2, 3, bias=False)
        with torch.no_grad():
            conv1.weight.copy_(torch.cat([resnet.conv1.weight] * 2, dim=1) / 2)
        self.encoder = nn.Sequential(conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                     resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        self.squeeze = nn.Conv2d(512, 256, 1)
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(), nn.Conv2d(256, 256, 3, 1, 1),
            nn.ReLU(), nn.Conv2d(256, 6 * num_predictions, 1))
        self.num_predictions, self.scale = num_predictions, float(scale)
        mean, std = NORMALISATIONS[normalisation]
        self.register_buffer("mean", torch.tensor(mean * 2).view(1, 6, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std * 2).view(1, 6, 1, 1), persistent=False)

    def motion(self, earlier: Tensor, later: Tensor) -> tuple[Tensor, Tensor]:
        """Rotation vector and translation [B,3] each, from ``earlier`` to ``later`` (images
        [B,3,H,W] in [0, 1]): the first of the decoder's predictions."""
        x = (torch.cat([earlier, later], dim=1) - self.mean) / self.std
        out = self.decoder(self.squeeze(self.encoder(x))).mean(dim=(2, 3))
        out = self.scale * out.view(-1, self.num_predictions, 6)[:, 0]
        return out[:, :3], out[:, 3:]

    def forward(self, image: Tensor, frames: Tensor, offsets: Sequence[int]) -> Tensor:
        """Transforms [B,F,4,4] from ``image``'s camera to each of ``frames`` [B,F,3,H,W], whose
        offsets from the image are ``offsets`` (negative: an earlier frame)."""
        if frames.shape[1] != len(offsets):
            raise ValueError(f"{frames.shape[1]} frames but offsets {list(offsets)}")
        poses = []
        for i, k in enumerate(offsets):
            other = frames[:, i]
            if k < 0:
                axis_angle, translation = self.motion(other, image)
            else:
                axis_angle, translation = self.motion(image, other)
            poses.append(rigid_transform(axis_angle, translation, invert=k < 0))
        return torch.stack(poses, dim=1)
