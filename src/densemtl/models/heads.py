"""Task heads: ASPP, the paper's "padnet+" U-Net decoder, and the DeepLab head (STL baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for 1x1 pooled maps that also trains with one image per batch.

    With a single value per channel, batch statistics do not exist (plain BatchNorm raises, as
    the official ASPP does at batch 1). In that case this layer normalises with its running
    statistics and leaves them untouched; otherwise, and always in eval mode, it is exactly
    ``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys).
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return super().forward(x)


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ImagePooling(nn.Sequential):
    """ASPP image-pooling branch: global average, 1x1 conv + BN + ReLU, broadcast back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cin, cout, 1, bias=False),
            PooledBatchNorm2d(cout),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3): 1x1 + dilated 3x3 branches (+ pooling).

    Module layout (``convs.i``, ``project``) matches torchvision and the official code.
    """

    def __init__(
        self,
        cin: int,
        rates: Sequence[int] = (6, 12, 18),
        cout: int = 256,
        pooling: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [conv_bn_relu(cin, cout, 1)]
        branches += [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
        if pooling:
            branches.append(ImagePooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * cout, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class ConvBlock(nn.Module):
    """Reflection-padded 3x3 convolution with bias, then ELU (Monodepth2 style)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")
        self.act = nn.ELU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class TaskDecoder(nn.Module):
    """The paper's "padnet+" decoder: a U-Net over the five encoder features.

    For each level i = 4..0: ``up[i]`` (ASPP at level 4, else a ConvBlock) -> nearest upsampling
    when the map is smaller than the skip feature (always at level 0, to the image size) ->
    concatenation with encoder feature i-1 -> ``merge[i]`` (ConvBlock). Level i's features are
    at stride 2^i; a 1x1 ``side`` conv gives the prediction at each scale in ``scales``.

    The decoder can run any contiguous subset of levels (``run``), which is how the exchange
    block is inserted between levels.
    """

    def __init__(
        self,
        enc_channels: Sequence[int],
        out_channels: int,
        num_ch_dec: Sequence[int] = (64, 128, 128, 256, 256),
        scales: Sequence[int] = (0, 1),
        aspp: bool = True,
        aspp_rates: Sequence[int] = (6, 12, 18),
        aspp_pooling: bool = True,
        aspp_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(enc_channels) != 5 or len(num_ch_dec) != 5:
            raise ValueError("TaskDecoder needs five encoder and five decoder channel counts")
        if any(s not in range(5) for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"decoder scales must be distinct levels in 0..4, got {list(scales)}")
        self.num_ch_dec = list(num_ch_dec)
        self.scales = list(scales)
        self.up = nn.ModuleDict()
        self.merge = nn.ModuleDict()
        for i in range(4, -1, -1):
            cin = enc_channels[4] if i == 4 else num_ch_dec[i + 1]
            if i == 4 and aspp:
                self.up[str(i)] = ASPP(cin, aspp_rates, num_ch_dec[4], aspp_pooling, aspp_dropout)
            else:
                self.up[str(i)] = ConvBlock(cin, num_ch_dec[i])
            skip = enc_channels[i - 1] if i > 0 else 0
            self.merge[str(i)] = ConvBlock(num_ch_dec[i] + skip, num_ch_dec[i])
        self.side = nn.ModuleDict(
            {str(s): nn.Conv2d(num_ch_dec[s], out_channels, 1) for s in self.scales})

    def run(
        self,
        feats: Sequence[Tensor],
        x: Tensor | None,
        levels: Sequence[int],
        image_size: tuple[int, int],
        defer_side: int | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run ``levels`` (descending) from ``x`` (``None``: start from f4).

        Returns the last level's features and the side outputs emitted on the way (except at
        level ``defer_side``, whose prediction the caller makes later).
        """
        x = feats[4] if x is None else x
        out: dict[int, Tensor] = {}
        for i in levels:
            x = self.up[str(i)](x)
            if i == 0:
                x = F.interpolate(x, size=image_size, mode="nearest")
            else:
                skip = feats[i - 1]
                if x.shape[-2:] != skip.shape[-2:]:
                    x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
                x = torch.cat([x, skip], dim=1)
            x = self.merge[str(i)](x)
            if i != defer_side and str(i) in self.side:
                out[i] = self.side[str(i)](x)
        return x, out

    def forward(self, feats: Sequence[Tensor], image_size: tuple[int, int]) -> dict[int, Tensor]:
        return self.run(feats, None, (4, 3, 2, 1, 0), image_size)[1]


class DeepLabHead(nn.Sequential):
    """DeepLab v3 head on the deepest feature (the paper's STL baseline).

    ASPP (rates 12/24/36, image pooling, 256 channels, dropout 0.5), 3x3 conv + BN + ReLU,
    1x1 classifier. The caller upsamples the stride-16 output to the image size.
    """

    def __init__(self, cin: int, out_channels: int, rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__(
            ASPP(cin, rates, 256, pooling=True, dropout=0.5),
            conv_bn_relu(256, 256, 3),
            nn.Conv2d(256, out_channels, 1),
        )
