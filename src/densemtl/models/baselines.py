"""The baselines the paper compares with: STL / MTL with DeepLab heads, PAD-Net, PAD-Net+.

(The MTL baseline with padnet+ decoders is ``HardSharing`` in ``densemtl.py``.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from .densemtl import DenseMTL, HardSharing, MultiTaskNet, Outputs
from .encoders import build_encoder
from .heads import DeepLabHead
from .xtam import SelfAttentionGate


class DeepLabMTL(MultiTaskNet):
    """Shared encoder + one DeepLab head per task on the deepest feature (hard sharing).

    With one task this is the paper's STL baseline. Outputs are upsampled bilinearly
    (align_corners=False) from the deepest feature's stride (16 for the dilated ResNets) to the
    image size and returned as scale 0.
    """

    def __init__(
        self,
        tasks: Mapping[str, int],
        encoder: Mapping[str, Any] | None = None,
        aspp_rates: Sequence[int] = (12, 24, 36),
    ) -> None:
        super().__init__(tasks)
        self.encoder = build_encoder(**(encoder or {}))
        cin = self.encoder.channels[-1]
        self.heads = nn.ModuleDict(
            {t: DeepLabHead(cin, ch, aspp_rates) for t, ch in self.tasks.items()})

    def forward(self, image: Tensor) -> Outputs:
        deepest = self.encoder(image)[-1]
        size = image.shape[-2:]
        return {t: {0: F.interpolate(head(deepest), size=size, mode="bilinear",
                                     align_corners=False)}
                for t, head in self.heads.items()}


class SADistillation(nn.Module):
    """PAD-Net's distillation: f~_t = f_t + sum over s != t of SA_{s->t}(f_s)."""

    def __init__(self, tasks: Sequence[str], channels: int) -> None:
        super().__init__()
        self.pairs = nn.ModuleDict({
            t: nn.ModuleDict({s: SelfAttentionGate(channels, channels) for s in tasks if s != t})
            for t in tasks})

    def forward(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t: feats[t] + sum(sa(feats[s]) for s, sa in gates.items())
                for t, gates in self.pairs.items()}


class PADNetPlus(DenseMTL):
    """PAD-Net+: padnet+ decoders with PAD-Net distillation after level 2 (H/4 for the ResNets),
    as the paper.

    Both supervised scales (1 and 0) come after the distillation.
    """

    def __init__(
        self,
        tasks: Mapping[str, int],
        encoder: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
        stages: Sequence[int] = (2,),
    ) -> None:
        super().__init__(tasks, encoder, decoder, exchange={"stages": list(stages)})

    def build_exchange(self, channels: int, downsample: int, opts: dict[str, Any]) -> nn.Module:
        return SADistillation(list(self.tasks), channels)


def _bottleneck_pair(cin: int, width: int) -> nn.Sequential:
    """Two torchvision Bottlenecks cin -> width -> width (1x1 conv + BN shortcut if needed)."""
    down = None
    if cin != width:
        down = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width))
    return nn.Sequential(Bottleneck(cin, width // 4, downsample=down),
                         Bottleneck(width, width // 4))


class PADNet(MultiTaskNet):
    """PAD-Net (Xu et al. 2018) on the deepest feature, as in the paper's comparison.

    Per task: two Bottlenecks (e.g. 2048 -> 256) and a 1x1 conv give an intermediate prediction at
    the encoder's output stride; distillation adds SA-gated features of the other tasks; two
    more Bottlenecks and a 1x1 conv give the final prediction, upsampled to the image size.
    Outputs: scale 0 (final) and scale round(log2(stride)) of the deepest feature
    (intermediate; 4 for stride 16), at least 1.
    """

    def __init__(
        self,
        tasks: Mapping[str, int],
        encoder: Mapping[str, Any] | None = None,
        width: int = 256,
    ) -> None:
        super().__init__(tasks)
        self.encoder = build_encoder(**(encoder or {}))
        cin = self.encoder.channels[-1]
        self.inter_scale = max(1, round(math.log2(self.encoder.reductions[-1])))
        self.initial = nn.ModuleDict({t: _bottleneck_pair(cin, width) for t in self.tasks})
        self.initial_out = nn.ModuleDict(
            {t: nn.Conv2d(width, ch, 1) for t, ch in self.tasks.items()})
        self.distill = SADistillation(list(self.tasks), width) if len(self.tasks) > 1 else None
        self.final = nn.ModuleDict({
            t: nn.Sequential(Bottleneck(width, width // 4), Bottleneck(width, width // 4),
                             nn.Conv2d(width, ch, 1))
            for t, ch in self.tasks.items()})

    def forward(self, image: Tensor) -> Outputs:
        deepest = self.encoder(image)[-1]
        feats = {t: block(deepest) for t, block in self.initial.items()}
        out: Outputs = {t: {self.inter_scale: self.initial_out[t](f)} for t, f in feats.items()}
        if self.distill is not None:
            feats = self.distill(feats)
        size = image.shape[-2:]
        for t, head in self.final.items():
            out[t][0] = F.interpolate(head(feats[t]), size=size, mode="bilinear",
                                      align_corners=False)
        return out


def single_task(
    tasks: Mapping[str, int],
    encoder: Mapping[str, Any] | None = None,
    head: str = "deeplab",
    decoder: Mapping[str, Any] | None = None,
) -> MultiTaskNet:
    """STL: one task; ``head`` ``deeplab`` (the paper's STL) or ``padnet+``."""
    if len(tasks) != 1:
        raise ValueError(f"arch 'stl' takes exactly one task, got {list(tasks)}")
    heads: dict[str, Any] = {
        "deeplab": lambda: DeepLabMTL(tasks, encoder),
        "padnet+": lambda: HardSharing(tasks, encoder, decoder),
    }
    if head not in heads:
        raise ValueError(f"stl head '{head}' is not one of {sorted(heads)}")
    if head == "deeplab" and decoder:
        raise ValueError("stl with head 'deeplab' takes no 'decoder' options")
    return heads[head]()
