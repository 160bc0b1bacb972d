"""Patch discriminator for output-space domain adaptation (the paper's UDA setting).

A stack of 4x4 stride-2 convolutions, each under spectral normalisation, with LeakyReLU(0.2)
between them and nothing after the last: the output is a map of domain logits, one per patch,
at ``1 / 2**num_layers`` of the input resolution. There is no normalisation layer and no
sigmoid; train it with ``BCEWithLogits``. During training the whole input batch is mirrored
left-right with probability ``flip`` (one coin per forward pass, drawn on the input's device so
no value is read back on the host).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["PatchDiscriminator"]


class PatchDiscriminator(nn.Module):
    """Spectral-norm patch discriminator.

    Args:
        in_channels: channels of the domain map it judges (C for segmentation entropy maps,
            1 for depth, 3 for normals, 1 for edges).
        ndf: width of the first layer; layer ``i`` has ``ndf * 2**i`` channels (the paper: 64,
            giving 64 -> 128 -> 256 -> 512 -> 1).
        num_layers: number of stride-2 convolutions, the last one giving 1 channel (paper: 5).
        negative_slope: LeakyReLU slope (paper: 0.2).
        flip: probability of mirroring the batch in training mode (paper: 0.5; 0 disables).
    """

    def __init__(self, in_channels: int, ndf: int = 64, num_layers: int = 5,
                 negative_slope: float = 0.2, flip: float = 0.5) -> None:
        super().__init__()
        if in_channels < 1 or ndf < 1 or num_layers < 1:
            raise ValueError("in_channels, ndf and num_layers must be >= 1, got "
                             f"{in_channels}, {ndf}, {num_layers}")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip must be a probability, got {flip}")
        widths = [in_channels] + [ndf * 2**i for i in range(num_layers - 1)] + [1]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
            layers.append(spectral_norm(nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1)))
            if i < num_layers - 1:
                layers.append(nn.LeakyReLU(negative_slope, inplace=True))
        self.body = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.flip = float(flip)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B,in_channels,H,W] -> patch logits [B,1,~H/2^L,~W/2^L]."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected [B,{self.in_channels},H,W], got {tuple(x.shape)}")
        if self.training and self.flip > 0:
            coin = torch.rand((), device=x.device) < self.flip
            x = torch.where(coin, x.flip(-1), x)
        return self.body(x)
