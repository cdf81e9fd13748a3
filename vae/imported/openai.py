"""OpenAI's DALL-E dVAE (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", appendix A), rewritten.

The architecture of the `dall_e` package's Encoder and Decoder with the same parameter names
(`blocks.group_1.block_1.res_path.conv_1.w`, ...), so the weights of OpenAI's encoder.pkl / decoder.pkl,
converted once by `python -m vae.convert openai encoder.pkl decoder.pkl OUT`, load unchanged:
- encoder: a 7x7 stem, four groups of bottleneck ResNet blocks (3x3, 3x3, 3x3, 1x1 convolutions, the
  residual branch scaled by 1 / n_layers^2) at widths 1, 2, 4, 8 x hidden with 2x2 max-pooling between
  them (8x downsampling), then a 1x1 conv to one logit per code;
- decoder: a 1x1 conv from the one-hot codes to `init_channels`, four groups of blocks (1x1, 3x3, 3x3,
  3x3) at widths 8, 4, 2, 1 x hidden with nearest 2x upsampling between them, then a 1x1 conv to the
  logit-Laplace statistics, of which the first three channels are the pixels' means in logit space.
Pixels are squeezed into [0.1, 0.9] before the encoder and the decoder's sigmoid is mapped back and
clamped to [0, 1] (the package's `map_pixels` / `unmap_pixels`): the interface's [0, 1] both ways.
The code of a cell is the argmax of the encoder's logits; the decoder reads it as a one-hot vector.

    model = OpenAIDVAE(codebook_size=8192, hidden=256, blocks_per_group=2, init_channels=128)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import clamp_straight_through, map_pixels, pixels_from_stats
from .common import ImportedTokenizer

GROUPS = 4  # the dall_e package's group_count: three 2x resamplings, factor 8
WIDTHS = (1, 2, 4, 8)  # each group's width in multiples of `hidden`, finest first


class Conv(nn.Module):
    """The dall_e package's Conv2d: parameters `w` and `b`, 'same' padding for an odd kernel."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kernel, kernel))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=(n_in * kernel**2) ** -0.5)
        self.padding = (kernel - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.padding)


class Block(nn.Module):
    """x -> id_path(x) + res_path(x) / n_layers^2, the residual branch a bottleneck at a quarter width."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        mid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, mid, mid, mid, n_out)
        layers: list[tuple[str, nn.Module]] = []
        for i, kernel in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv(widths[i], widths[i + 1], kernel))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(blocks: list[Block], resample: nn.Module | None, resample_name: str) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = [(f"block_{i + 1}", block) for i, block in enumerate(blocks)]
    if resample is not None:
        layers.append((resample_name, resample))
    return nn.Sequential(OrderedDict(layers))


class Encoder(nn.Module):
    """Images mapped to [0.1, 0.9] (b, 3, H, W) -> code logits (b, codebook_size, H/8, W/8)."""

    def __init__(self, codebook_size: int, hidden: int, blocks_per_group: int):
        super().__init__()
        n_layers = GROUPS * blocks_per_group
        layers: list[tuple[str, nn.Module]] = [("input", Conv(3, hidden, 7))]
        width = hidden
        for g, mult in enumerate(WIDTHS):
            blocks = []
            for _ in range(blocks_per_group):
                blocks.append(Block(width, mult * hidden, n_layers, kernels=(3, 3, 3, 1)))
                width = mult * hidden
            pool = nn.MaxPool2d(kernel_size=2) if g < GROUPS - 1 else None
            layers.append((f"group_{g + 1}", _group(blocks, pool, "pool")))
        layers.append(
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(width, codebook_size, 1))])))
        )
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """One-hot codes (b, codebook_size, h, w) -> logit-Laplace statistics (b, 6, 8h, 8w)."""

    def __init__(self, codebook_size: int, hidden: int, blocks_per_group: int, init_channels: int):
        super().__init__()
        n_layers = GROUPS * blocks_per_group
        layers: list[tuple[str, nn.Module]] = [("input", Conv(codebook_size, init_channels, 1))]
        width = init_channels
        for g, mult in enumerate(reversed(WIDTHS)):
            blocks = []
            for _ in range(blocks_per_group):
                blocks.append(Block(width, mult * hidden, n_layers, kernels=(1, 3, 3, 3)))
                width = mult * hidden
            upsample = nn.Upsample(scale_factor=2, mode="nearest") if g < GROUPS - 1 else None
            layers.append((f"group_{g + 1}", _group(blocks, upsample, "upsample")))
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(width, 6, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class OpenAIDVAE(ImportedTokenizer):
    """DALL-E's dVAE. The free latent is the encoder's logits (b, codebook_size, h, w); codes are their argmax."""

    kind = "openai_dvae"

    def __init__(
        self, codebook_size: int = 8192, hidden: int = 256, blocks_per_group: int = 2, init_channels: int = 128
    ):
        super().__init__(codebook_size, 2 ** (GROUPS - 1), hidden, blocks_per_group, codebook_size, "logit_laplace")
        self.kwargs = dict(
            codebook_size=codebook_size, hidden=hidden, blocks_per_group=blocks_per_group, init_channels=init_channels
        )
        self.encoder = Encoder(codebook_size, hidden, blocks_per_group)
        self.decoder = Decoder(codebook_size, hidden, blocks_per_group, init_channels)

    def free_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] -> code logits (b, codebook_size, h, w)."""
        return self.encoder(map_pixels(images))

    def snap(self, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits -> (one-hot of the argmax, straight-through to the softmax; ids (b, h, w))."""
        ids = free.argmax(dim=1)
        return self._straight_through(free, ids), ids

    def code_weights(self, free: torch.Tensor) -> torch.Tensor:
        """Logits -> one-hot of the argmax (b, codebook_size, h, w), straight-through to the softmax."""
        return self._straight_through(free, free.argmax(dim=1))

    def _straight_through(self, free: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        probs = free.softmax(dim=1)
        return self.embed_ids(ids).to(probs.dtype) + (probs - probs.detach())

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w) -> one-hot codes (b, codebook_size, h, w), the decoder's input."""
        return F.one_hot(ids, self.codebook_size).permute(0, 3, 1, 2).float()

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """One-hot codes (or a relaxation) -> images (b, 3, H, W) in [0, 1]: sigmoid, unmapped, clamped."""
        return clamp_straight_through(pixels_from_stats(self.decoder(latent), "logit_laplace"))
