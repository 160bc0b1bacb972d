"""Shared encoders returning five feature maps (strides 2, 4, 8, 16, 16|32).

``ResNetEncoder`` wraps torchvision's ResNet-18/34/50/101 exactly as the official code does
(same modules, same ImageNet weights, layer 4 dilated), so official checkpoints load into it.
``TimmEncoder`` accepts any timm CNN that supports ``features_only``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # The paper (Monodepth2 convention): one scalar for every channel.
    "paper": ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class PretrainedWeightsError(RuntimeError):
    """Raised when ImageNet weights were asked for but cannot be obtained."""


class Encoder(nn.Module):
    """Base class: normalises a [B,3,H,W] image in [0,1] and returns five feature maps.

    ``channels[i]`` and ``strides[i]`` describe feature ``i`` (f0 at stride 2 ... f4).
    """

    channels: list[int]
    strides: list[int]

    def __init__(self, normalisation: str) -> None:
        super().__init__()
        if normalisation not in NORMALISATIONS:
            raise ValueError(
                f"encoder normalisation '{normalisation}' is not one of {sorted(NORMALISATIONS)}"
            )
        mean, std = NORMALISATIONS[normalisation]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, image: Tensor) -> Tensor:
        return (image - self.mean) / self.std


def _load_torchvision_weights(weights: tvm.WeightsEnum) -> dict[str, Tensor]:
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # network errors surface as many different types
        raise PretrainedWeightsError(
            f"could not download the ImageNet weights {weights} ({type(exc).__name__}: {exc}). "
            "Connect to the internet once (they are cached under $TORCH_HOME), copy the file into "
            "the torch hub cache by hand, or set `pretrained: false` in the encoder config."
        ) from exc


def _dilate_basic_layer(layer: nn.Sequential) -> None:
    """Give a BasicBlock stage stride 1 and dilation 2, as torchvision does for Bottlenecks.

    torchvision refuses ``replace_stride_with_dilation`` for BasicBlock. We apply the same rule
    it uses for Bottleneck: the first block keeps dilation 1 on its first 3x3 conv but loses its
    stride (and so does its 1x1 downsample); every later 3x3 conv of the stage is dilated by 2
    (padding 2), so the receptive field is kept while the resolution stays at stride 16.
    """
    for b, block in enumerate(layer):
        assert isinstance(block, BasicBlock)
        for c, conv in enumerate((block.conv1, block.conv2)):
            conv.stride = (1, 1)
            if b > 0 or c > 0:
                conv.dilation, conv.padding = (2, 2), (2, 2)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


class ResNetEncoder(Encoder):
    """torchvision ResNet with the paper's options (official: ResNet-101, dilated layer 4)."""

    BUILDERS: ClassVar[dict[str, tuple]] = {
        "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
        "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
        "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
        "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
    }

    def __init__(
        self,
        name: str = "resnet101",
        pretrained: bool = True,
        dilated: bool = True,
        normalisation: str = "paper",
    ) -> None:
        super().__init__(normalisation)
        if name not in self.BUILDERS:
            raise ValueError(f"unknown ResNet '{name}'; choose one of {sorted(self.BUILDERS)}")
        builder, weights = self.BUILDERS[name]
        basic = name in ("resnet18", "resnet34")
        kwargs = {} if basic else {"replace_stride_with_dilation": [False, False, dilated]}
        net = builder(weights=None, **kwargs)
        if pretrained:
            net.load_state_dict(_load_torchvision_weights(weights))
        if basic and dilated:
            _dilate_basic_layer(net.layer4)
        # Keep only what the features need (no avgpool / fc parameters).
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        width = 1 if basic else 4
        self.channels = [64, 64 * width, 128 * width, 256 * width, 512 * width]
        self.strides = [2, 4, 8, 16, 16 if dilated else 32]

    def forward(self, image: Tensor) -> list[Tensor]:
        f0 = self.relu(self.bn1(self.conv1(self.normalise(image))))
        f1 = self.layer1(self.maxpool(f0))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3, self.layer4(f3)]


class TimmEncoder(Encoder):
    """Any timm CNN with ``features_only`` and five reductions (e.g. ``timm:convnext_tiny``)."""

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        dilated: bool = True,
        normalisation: str = "imagenet",
    ) -> None:
        super().__init__(normalisation)
        import timm

        kwargs = {"features_only": True, "out_indices": (0, 1, 2, 3, 4)}
        if dilated:
            kwargs["output_stride"] = 16
        try:
            self.net = timm.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as exc:
            if pretrained and ("download" in str(exc).lower() or "hub" in str(exc).lower()):
                raise PretrainedWeightsError(
                    f"could not download timm weights for '{name}': {exc}. Set `pretrained: false`"
                    " or pre-populate the Hugging Face cache."
                ) from exc
            raise
        except OSError as exc:
            raise PretrainedWeightsError(
                f"could not download timm weights for '{name}': {exc}. Set `pretrained: false` "
                "or pre-populate the Hugging Face cache."
            ) from exc
        info = self.net.feature_info
        self.channels = list(info.channels())
        self.strides = list(info.reduction())
        if len(self.channels) != 5:
            raise ValueError(f"timm model '{name}' does not expose five feature levels")

    def forward(self, image: Tensor) -> list[Tensor]:
        return list(self.net(self.normalise(image)))


def build_encoder(
    name: str = "resnet101",
    pretrained: bool = True,
    dilated: bool = True,
    normalisation: str | None = None,
) -> Encoder:
    """``resnet18|34|50|101`` (torchvision, as the paper) or ``timm:<model name>``."""
    if name.startswith("timm:"):
        return TimmEncoder(name[5:], pretrained, dilated, normalisation or "imagenet")
    return ResNetEncoder(name, pretrained, dilated, normalisation or "paper")
