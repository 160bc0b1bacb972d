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
    """Reflection-padded 3x3 convolution with bias, then ELU (Monodepth2 style).

    ``up_channels``: how many of the ``cin`` input channels come from the map that
    :meth:`upsampled` upsamples (the rest are the skip feature); default all of them. A plain
    int, so that exported graphs see the fused path's kernel shapes.
    """

    def __init__(self, cin: int, cout: int, up_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")
        self.act = nn.ELU(inplace=True)
        self.up_channels = cin if up_channels is None else int(up_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))

    def upsampled(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """``forward(cat([nearest_up2(x), skip]))`` without building the upsampled map."""
        cx = self.up_channels
        out = upsample2_conv3x3(x, self.conv.weight[:, :cx], self.conv.bias)
        if skip is not None:
            out = out + F.conv2d(F.pad(skip, (1, 1, 1, 1), mode="reflect"),
                                 self.conv.weight[:, cx:])
        return self.act(out)


def _phase_kernels(weight: Tensor) -> Tensor:
    """3x3 kernels [O,I,3,3] -> the four 2x2 phase kernels [4*O, I, 2, 2] of conv(up2(x)).

    Output row 2i sees upsampled rows 2i-1, 2i, 2i+1 = low-res rows i-1, i, i: taps
    (w0, w1 + w2) on rows (i-1, i); row 2i+1 sees i, i, i+1: taps (w0 + w1, w2) on (i, i+1).
    The same holds for columns. Channel order is (o, a, b) for ``pixel_shuffle``. Few traced
    ops (``unbind`` rather than indexing) keep ONNX export fast; the shapes are static for the
    exporter when ``weight`` is a parameter or a slice of one with constant bounds.
    """
    w0, w1, w2 = weight.unbind(2)
    rows = torch.stack([torch.stack([w0, w1 + w2], 2), torch.stack([w0 + w1, w2], 2)])
    # rows: [2(a), O, I, 2(taps), 3]; now fold the columns the same way
    r0, r1, r2 = rows.unbind(-1)
    cols = torch.stack([torch.stack([r0, r1 + r2], -1), torch.stack([r0 + r1, r2], -1)])
    # cols: [2(b), 2(a), O, I, 2, 2] -> [O, a, b, I, 2, 2]
    o, i = weight.shape[:2]
    return cols.permute(2, 1, 0, 3, 4, 5).reshape(4 * o, i, 2, 2)


def upsample2_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``conv3x3_reflect(nearest_up2(x))`` computed at low resolution (exact, ~2.2x cheaper).

    Reflection padding of the upsampled map equals replicate padding of ``x``; each of the four
    output phases is a 2x2 convolution of the padded low-resolution map.
    """
    h, w = x.shape[-2:]
    # replicate padding by concatenation: torch.compile (2.14) mis-strides replication_pad2d's
    # backward on CPU; the values are the same
    x = torch.cat([x.narrow(-2, 0, 1), x, x.narrow(-2, h - 1, 1)], dim=-2)
    x = torch.cat([x.narrow(-1, 0, 1), x, x.narrow(-1, w - 1, 1)], dim=-1)
    out = F.conv2d(x, _phase_kernels(weight))
    # phase (a, b) of output pixel (i, j) sits at (i + a, j + b) of the (h+1)x(w+1) result
    o = weight.shape[0]
    out = out.view(out.shape[0], o, 2, 2, h + 1, w + 1)
    out = torch.stack([out.select(2, 0).narrow(3, 0, h), out.select(2, 1).narrow(3, 1, h)], 2)
    out = torch.stack([out.select(3, 0).narrow(-1, 0, w), out.select(3, 1).narrow(-1, 1, w)], 3)
    # [B, O, a, b, h, w]
    out = F.pixel_shuffle(out.reshape(out.shape[0], 4 * o, h, w), 2)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


PAPER_NUM_CH_DEC = (64, 128, 128, 256, 256)
"""The paper's decoder widths for the five ResNet levels (level 0 first)."""


def default_num_ch_dec(levels: int) -> list[int]:
    """Decoder widths for ``levels`` levels: the paper's five for L = 5, its last L entries
    for L < 5 (the deep, wide end), and extra 64-channel fine levels in front for L > 5."""
    if levels <= len(PAPER_NUM_CH_DEC):
        return list(PAPER_NUM_CH_DEC[len(PAPER_NUM_CH_DEC) - levels:])
    return [64] * (levels - len(PAPER_NUM_CH_DEC)) + list(PAPER_NUM_CH_DEC)


def resolve_num_ch_dec(num_ch_dec: Sequence[int] | None, levels: int,
                       encoder: str = "the encoder") -> list[int]:
    """``num_ch_dec`` checked against the encoder's number of levels (default when None)."""
    if num_ch_dec is None:
        return default_num_ch_dec(levels)
    if len(num_ch_dec) != levels:
        raise ValueError(
            f"decoder num_ch_dec has {len(num_ch_dec)} entries ({list(num_ch_dec)}) but "
            f"{encoder} has {levels} feature levels: give {levels} decoder widths (level 0 "
            "first), or leave num_ch_dec out for the default")
    return [int(c) for c in num_ch_dec]


class TaskDecoder(nn.Module):
    """The paper's "padnet+" decoder: a U-Net over the L encoder features.

    For each level i = L-1..0: ``up[i]`` (ASPP at the top level L-1, else a ConvBlock) ->
    upsampling to the size of encoder feature i-1 (level 0: the input image) when it differs
    -> concatenation with encoder feature i-1 -> ``merge[i]`` (ConvBlock). Level i's output thus
    has the resolution of feature i-1 (the image for level 0), and a 1x1 ``side`` conv gives the
    prediction at each scale in ``scales``: output "scale" s is decoder level s, whatever the
    backbone. For the torchvision ResNets (features at strides 2, 4, 8, 16, 16|32) level s is
    at H/2^s, as in the paper; for e.g. ConvNeXt (strides 4, 8, 16, 32) level 1 is at H/4.

    Upsampling is nearest: where the target is exactly twice the size, and with
    ``fused_upsample`` (default), the x2 upsampling and the following reflection-padded conv are
    computed together at low resolution (:func:`upsample2_conv3x3`): the same outputs (up to
    float rounding) for about 45% of the multiply-adds of those channels and without the
    upsampled map in memory; other ratios (x4 for ConvNeXt's level 0) and ``False`` use the
    literal interpolate-then-convolve path.

    ``num_ch_dec`` gives one width per level (level 0 first); default
    :func:`default_num_ch_dec` (the paper's [64, 128, 128, 256, 256] for five levels). The
    decoder can run any contiguous subset of levels (``run``), which is how the exchange block
    is inserted between levels.
    """

    def __init__(
        self,
        enc_channels: Sequence[int],
        out_channels: int,
        num_ch_dec: Sequence[int] | None = None,
        scales: Sequence[int] = (0, 1),
        aspp: bool = True,
        aspp_rates: Sequence[int] = (6, 12, 18),
        aspp_pooling: bool = True,
        aspp_dropout: float = 0.5,
        fused_upsample: bool = True,
    ) -> None:
        super().__init__()
        self.fused_upsample = fused_upsample
        n = len(enc_channels)
        if n < 1:
            raise ValueError("TaskDecoder needs at least one encoder feature level")
        num_ch_dec = resolve_num_ch_dec(num_ch_dec, n)
        if any(s not in range(n) for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(
                f"decoder scales must be distinct levels in 0..{n - 1}, got {list(scales)}")
        self.num_levels = n
        self.num_ch_dec = num_ch_dec
        self.scales = list(scales)
        self.up = nn.ModuleDict()
        self.merge = nn.ModuleDict()
        top = n - 1
        for i in range(top, -1, -1):
            cin = enc_channels[top] if i == top else num_ch_dec[i + 1]
            if i == top and aspp:
                self.up[str(i)] = ASPP(cin, aspp_rates, num_ch_dec[i], aspp_pooling, aspp_dropout)
            else:
                self.up[str(i)] = ConvBlock(cin, num_ch_dec[i])
            skip = enc_channels[i - 1] if i > 0 else 0
            self.merge[str(i)] = ConvBlock(num_ch_dec[i] + skip, num_ch_dec[i], num_ch_dec[i])
        self.side = nn.ModuleDict(
            {str(s): nn.Conv2d(num_ch_dec[s], out_channels, 1) for s in self.scales})

    @property
    def levels(self) -> list[int]:
        """All decoder levels in running order (L-1 .. 0)."""
        return list(range(self.num_levels - 1, -1, -1))

    def run(
        self,
        feats: Sequence[Tensor],
        x: Tensor | None,
        levels: Sequence[int],
        image_size: tuple[int, int],
        defer_side: int | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run ``levels`` (descending) from ``x`` (``None``: start from the deepest feature).

        Returns the last level's features and the side outputs emitted on the way (except at
        level ``defer_side``, whose prediction the caller makes later).
        """
        x = feats[-1] if x is None else x
        out: dict[int, Tensor] = {}
        for i in levels:
            x = self.up[str(i)](x)
            skip = feats[i - 1] if i > 0 else None
            size = tuple(image_size) if skip is None else tuple(skip.shape[-2:])
            if tuple(x.shape[-2:]) == size:
                x = self.merge[str(i)](x if skip is None else torch.cat([x, skip], dim=1))
            elif self.fused_upsample and size == (2 * x.shape[-2], 2 * x.shape[-1]):
                x = self.merge[str(i)].upsampled(x, skip)
            else:
                x = F.interpolate(x, size=size, mode="nearest")
                x = self.merge[str(i)](x if skip is None else torch.cat([x, skip], dim=1))
            if i != defer_side and str(i) in self.side:
                out[i] = self.side[str(i)](x)
        return x, out

    def forward(self, feats: Sequence[Tensor], image_size: tuple[int, int]) -> dict[int, Tensor]:
        return self.run(feats, None, self.levels, image_size)[1]


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
