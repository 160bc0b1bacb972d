"""Shared encoders returning L feature maps, finest first.

``ResNetEncoder`` wraps torchvision's ResNet-18/34/50/101 exactly as the official code does
(same modules, same ImageNet weights, layer 4 dilated): five features at strides 2, 4, 8, 16,
16|32, so official checkpoints load into it. ``TimmEncoder`` accepts any timm model that supports
``features_only`` (CNNs and hierarchical transformers), with whatever number of levels and
strides it has. Every encoder describes its features with ``channels`` and ``reductions``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

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
    """Base class: normalises a [B,3,H,W] image in [0,1] and returns L NCHW feature maps.

    ``channels[i]`` and ``reductions[i]`` (the stride w.r.t. the input) describe feature ``i``;
    features go from the finest to the deepest (the last one). ``strides`` is an alias of
    ``reductions``.
    """

    name: str
    channels: list[int]
    reductions: list[int]

    def __init__(self, normalisation: str) -> None:
        super().__init__()
        self.name = type(self).__name__  # subclasses set the configured name
        if normalisation not in NORMALISATIONS:
            raise ValueError(
                f"encoder normalisation '{normalisation}' is not one of {sorted(NORMALISATIONS)}"
            )
        mean, std = NORMALISATIONS[normalisation]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def strides(self) -> list[int]:
        """Alias of ``reductions``."""
        return self.reductions

    @property
    def num_levels(self) -> int:
        return len(self.channels)

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
        self.name = name
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
        self.reductions = [2, 4, 8, 16, 16 if dilated else 32]

    def forward(self, image: Tensor) -> list[Tensor]:
        f0 = self.relu(self.bn1(self.conv1(self.normalise(image))))
        f1 = self.layer1(self.maxpool(f0))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3, self.layer4(f3)]


def _timm_download_error(name: str, exc: Exception) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f"could not download timm weights for '{name}': {exc}. Set `pretrained: false` or "
        "pre-populate the Hugging Face cache.")


class TimmEncoder(Encoder):
    """Any timm model with ``features_only``: CNNs (``timm:convnext_tiny``) or hierarchical
    transformers (``timm:swin_tiny_patch4_window7_224``, ``timm:pvt_v2_b0``).

    All the model's feature levels are used unless ``out_indices`` picks some; ``channels`` and
    ``reductions`` come from timm's ``feature_info``. NHWC outputs (Swin) are returned as NCHW.
    ``options`` are passed to ``timm.create_model`` (e.g. ``{"img_size": [256, 512],
    "strict_img_size": false}`` for Swin). ``dilated`` asks for ``output_stride=16`` (dilated
    last stage); it defaults to False here because most timm models (every transformer) do not
    support it and timm's weights are trained at stride 32.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        dilated: bool = False,
        normalisation: str = "imagenet",
        out_indices: Sequence[int] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(normalisation)
        import timm

        self.name = f"timm:{name}"
        kwargs: dict[str, Any] = {**(options or {}), "features_only": True}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(int(i) for i in out_indices)
        if dilated:
            if "output_stride" in kwargs:
                raise ValueError(f"encoder '{self.name}': give either dilated or "
                                 "options.output_stride, not both")
            kwargs["output_stride"] = 16
        try:
            self.net = timm.create_model(name, pretrained=pretrained, **kwargs)
        except OSError as exc:
            raise _timm_download_error(name, exc) from exc
        except RuntimeError as exc:
            text = str(exc).lower()
            if pretrained and ("download" in text or "hub" in text):
                raise _timm_download_error(name, exc) from exc
            if "unknown model" in text:
                raise ValueError(f"encoder '{self.name}': {exc}") from exc
            raise
        except (TypeError, AssertionError, ValueError, NotImplementedError) as exc:
            if dilated and self._builds_without_output_stride(timm, name, kwargs):
                raise ValueError(
                    f"encoder '{self.name}' does not support dilated: true (timm output_stride=16"
                    f" failed: {type(exc).__name__}: {exc}). Set dilated: false.") from exc
            raise ValueError(f"encoder '{self.name}' with options {dict(options or {})}: "
                             f"{type(exc).__name__}: {exc}") from exc
        info = self.net.feature_info
        self.channels = [int(c) for c in info.channels()]
        self.reductions = [int(r) for r in info.reduction()]
        if dilated and max(self.reductions) > 16:
            raise ValueError(f"encoder '{self.name}' accepted output_stride=16 but its features "
                             f"are at strides {self.reductions}; set dilated: false")
        fmt = getattr(self.net, "output_fmt", "NCHW")
        self.nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"

    @staticmethod
    def _builds_without_output_stride(timm: Any, name: str, kwargs: dict[str, Any]) -> bool:
        """Whether the model builds once ``output_stride`` is dropped (randomly initialised)."""
        kwargs = {k: v for k, v in kwargs.items() if k != "output_stride"}
        try:
            timm.create_model(name, pretrained=False, **kwargs)
        except Exception:
            return False
        return True

    def forward(self, image: Tensor) -> list[Tensor]:
        feats = list(self.net(self.normalise(image)))
        return [f.permute(0, 3, 1, 2) for f in feats] if self.nhwc else feats


def build_encoder(
    name: str = "resnet101",
    pretrained: bool = True,
    dilated: bool | None = None,
    normalisation: str | None = None,
    out_indices: Sequence[int] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Encoder:
    """``resnet18|34|50|101`` (torchvision, as the paper) or ``timm:<model name>``.

    ``dilated`` defaults to True for the torchvision ResNets (the paper: layer 4 dilated,
    stride 16) and to False for timm models (``output_stride=16`` only when asked: most timm
    models, all transformers, do not support it). ``out_indices`` and ``options`` (extra
    ``timm.create_model`` arguments) are for timm models only.
    """
    if name.startswith("timm:"):
        return TimmEncoder(name[5:], pretrained, bool(dilated), normalisation or "imagenet",
                           out_indices, options)
    if out_indices is not None or options:
        raise ValueError(f"encoder '{name}': out_indices and options are for timm encoders only")
    return ResNetEncoder(name, pretrained, True if dilated is None else dilated,
                         normalisation or "paper")
