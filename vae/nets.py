"""Convolutional building blocks shared by both image tokenizers: ResNet encoder, decoder, patch critic.

Used by `vae.dvae` and `vae.vq`; nothing here knows about codebooks. The encoder follows the shape of
DALL-E's dVAE (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", appendix A.2: a stem conv,
ResNet blocks per resolution, identity-at-init residual branches, bottlenecked blocks) and the decoder
mirrors it. Deviations, all made for CPU speed (training must keep pace with dalle-pytorch's 2-layer
DiscreteVAE at 32 px while adding ResBlocks): the stem conv already has stride 2, so every ResBlock runs
at half the input resolution or less (full-resolution 3x3 convolutions alone would cost more than that
whole baseline); ResBlocks halve the width inside; and the inner down- and up-samplings are 2x2,
stride 2 (non-overlapping, a quarter of a 4x4 kernel's cost). Edges still land on the right pixel:
the decoder's last layer is a 4x4, stride-2 transposed conv reading a 64-wide feature per 2x2 block.

Widths: level i (resolution H / 2^(i+1)) has `hidden * 2^i` channels, capped at `4 * hidden`.
Normalisation is GroupNorm, the activation SiLU (as in VQGAN).
The patch discriminator is pix2pix's PatchGAN (Isola et al. 2017), shrunk to three convolutions.
"""

from __future__ import annotations

import torch
from torch import nn


def level_widths(hidden: int, levels: int) -> list[int]:
    """Channels at each resolution level, from the finest (stem output) to the coarsest."""
    return [min(hidden * 2**i, 4 * hidden) for i in range(levels)]


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in VQGAN when the width allows, otherwise groups of at least 4 channels
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(silu(norm(conv(silu(norm(x)))))), half width inside.

    The second conv starts at zero so every block is the identity at init (DALL-E scales its residual
    branches down for the same reason): a deep stack then trains at lr 1e-3 without warm-up trouble.
    """

    def __init__(self, channels: int):
        super().__init__()
        mid = channels // 2
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels, mid, 3, padding=1)
        self.norm2 = group_norm(mid)
        self.conv2 = nn.Conv2d(mid, channels, 3, padding=1)
        self.act = nn.SiLU()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


class Encoder(nn.Module):
    """Images (b, 3, H, W) in [-1, 1] -> features (b, out_channels, H / factor, W / factor)."""

    def __init__(self, out_channels: int, factor: int, hidden: int, res_blocks: int, in_channels: int = 3):
        super().__init__()
        levels = factor.bit_length() - 1
        widths = level_widths(hidden, levels)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1)]
        for i, width in enumerate(widths):
            layers += [ResBlock(width) for _ in range(res_blocks)]
            if i + 1 < levels:
                layers += [nn.Conv2d(width, widths[i + 1], 2, stride=2)]
        layers += [group_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    @property
    def head(self) -> nn.Conv2d:
        """The last 1x1 conv (the dVAE gives it a small init so the first code choices are near uniform)."""
        return self.layers[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """Latents (b, in_channels, h, w) -> pixel statistics (b, out_channels, h * factor, w * factor)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, hidden: int, res_blocks: int):
        super().__init__()
        levels = factor.bit_length() - 1
        widths = level_widths(hidden, levels)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 1)]
        for i, width in enumerate(widths):
            layers += [ResBlock(width) for _ in range(res_blocks)]
            if i + 1 < levels:
                up = nn.ConvTranspose2d(width, widths[i + 1], 2, stride=2)
            else:
                up = nn.ConvTranspose2d(width, out_channels, 4, stride=2, padding=1)
            layers += [group_norm(width), nn.SiLU(), up]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class PatchDiscriminator(nn.Module):
    """PatchGAN critic: images (b, 3, H, W) in [-1, 1] -> realness logits (b, 1, H / 4, W / 4)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, hidden, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 2 * hidden, 4, stride=2, padding=1),
            group_norm(2 * hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * hidden, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
