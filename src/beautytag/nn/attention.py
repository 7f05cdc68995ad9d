"""Channel + spatial attention on a backbone's last feature map.

* :class:`SeedAttention` - the original design's parameter-free formulas::

      F_c = F * sigmoid(AvgPool_hw(F))                 (per channel)
      F_s = F * sigmoid(MaxPool_c(F) + AvgPool_c(F))   (per position)
      out = F_c * F_s

* :class:`CBAM` - Woo et al. 2018: a shared MLP on average- and max-pooled channel
  descriptors, then a 7x7 convolution over [mean_c, max_c] as the spatial gate. Gates
  are ``2 * sigmoid(z)`` with the last layer of each branch zero-initialised, so the
  module starts as the identity and does not damage pretrained features.
"""

from __future__ import annotations

import torch
from torch import nn


class SeedAttention(nn.Module):
    """The original design's channel x spatial attention (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc = x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))
        fs = x * torch.sigmoid(x.amax(dim=1, keepdim=True) + x.mean(dim=1, keepdim=True))
        return fc * fs


class ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return 2.0 * torch.sigmoid(z)


class SpatialGate(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], 1))
        return 2.0 * torch.sigmoid(z)


class CBAM(nn.Module):
    """Convolutional Block Attention Module, identity at initialisation."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)


def create_attention(kind: str, channels: int) -> nn.Module:
    """`none`, `seed` or `cbam`."""
    if kind == "none":
        return nn.Identity()
    if kind == "seed":
        return SeedAttention()
    if kind == "cbam":
        return CBAM(channels)
    raise ValueError(f"unknown attention {kind!r}; choose none, seed or cbam")
