"""LlamaGen's VQ tokenizer (Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image
Generation"), rewritten: the `VQ-16` / `VQ-8` models of its tokenizer/tokenizer_image/vq_model.py, whose
released weights are vq_ds16_c2i.pt and vq_ds8_c2i.pt (16384 codes of 8 dimensions).

The parameter names are the original's (`encoder.conv_blocks.0.res.1.conv1.weight`, `encoder.mid.1.q.weight`,
`quantize.embedding.weight`, ...), so a checkpoint's `ema`, `model` or `state_dict` entry, converted once by
`python -m vae.convert llamagen vq_ds16_c2i.pt OUT`, loads unchanged (the training-only `codebook_used`
statistic is left out). The network is taming's VQGAN (`vae.imported.taming`'s blocks: GroupNorm(32),
swish, ResNet blocks, single-head attention) arranged LlamaGen's way:
- encoder: per level `num_res_blocks` ResNet blocks at width `ch * encoder_ch_mult[level]`, attention after
  each block of the coarsest level only, a stride-2 conv between levels; a middle of block, attention,
  block (`mid.0`, `mid.1`, `mid.2`); GroupNorm, swish and a 3x3 conv to `z_channels`;
- decoder: the mirror with its own `decoder_ch_mult`, `num_res_blocks + 1` blocks per level, its
  `conv_blocks` stored coarsest first;
- quantizer: `quant_conv` to `embed_dim`; with `l2_norm` (the released models) latents and codes are
  l2-normalised and the code is the nearest by squared distance, i.e. by cosine; the decoder reads the
  normalised code.
Images are [-1, 1] inside; the interface's [0, 1] is mapped in and out (the output clamped).

    model = LlamaGenVQ(codebook_size=16384, embed_dim=8, ch=128, encoder_ch_mult=[1, 1, 2, 2, 4],
                       decoder_ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256)   # vq_ds16_c2i
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..base import VAEError
from .common import ImportedTokenizer
from .taming import AttnBlock, Downsample, ResnetBlock, Upsample, nonlinearity, normalize


class Level(nn.Module):
    """One resolution level: `res` (ResNet blocks), `attn` (after each block, or empty), a resampler."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock(i, o) for i, o in widths])
        self.attn = nn.ModuleList([AttnBlock(o) for _, o in widths] if attention else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    """Images in [-1, 1] (b, 3, H, W) -> latents (b, z_channels, H/f, W/f)."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            widths = [(block_in if i == 0 else block_out, block_out) for i in range(num_res_blocks)]
            block = Level(widths, attention=level == last)
            if level != last:
                block.downsample = Downsample(block_out, with_conv=True)
            self.conv_blocks.append(block)
        channels = ch * ch_mult[-1]
        self.mid = middle(channels)
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, block in enumerate(self.conv_blocks):
            h = block(h)
            if level != len(self.conv_blocks) - 1:
                h = block.downsample(h)
        for mid_block in self.mid:
            h = mid_block(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (b, z_channels, h, w) -> images in [-1, 1] (b, 3, f h, f w), not clamped."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        last = len(ch_mult) - 1
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = middle(block_in)
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):  # coarsest first, in the order they run
            block_out = ch * ch_mult[level]
            widths = [(block_in if i == 0 else block_out, block_out) for i in range(num_res_blocks + 1)]
            block = Level(widths, attention=level == last)
            block_in = block_out
            if level != 0:
                block.upsample = Upsample(block_out, with_conv=True)
            self.conv_blocks.append(block)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for mid_block in self.mid:
            h = mid_block(h)
        for level, block in enumerate(self.conv_blocks):
            h = block(h)
            if level != len(self.conv_blocks) - 1:
                h = block.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """LlamaGen's VectorQuantizer: `embedding` (k, embed_dim); with `l2_norm`, codes and latents on the sphere."""

    def __init__(self, codebook_size: int, embed_dim: int, l2_norm: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)

    def codes(self) -> torch.Tensor:
        """The code vectors (k, embed_dim) the decoder reads: normalised when `l2_norm`."""
        return F.normalize(self.embedding.weight, p=2, dim=-1) if self.l2_norm else self.embedding.weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (b, d, h, w) -> ids (b, h, w), with the original's distance expression and argmin."""
        b, _, h, w = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        e = self.codes()
        d = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(e**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, rearrange(e, "n d -> d n"))
        )
        return rearrange(torch.argmin(d, dim=1), "(b h w) -> b h w", b=b, h=h, w=w)


class LlamaGenVQ(ImportedTokenizer):
    """LlamaGen's VQ tokenizer. Free latent: `quant_conv`'s output (b, embed_dim, h, w), before normalising."""

    kind = "llamagen_vq"

    def __init__(
        self,
        codebook_size: int = 16384,
        embed_dim: int = 8,
        ch: int = 128,
        encoder_ch_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4),
        decoder_ch_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        l2_norm: bool = True,
    ):
        encoder_ch_mult, decoder_ch_mult = [int(m) for m in encoder_ch_mult], [int(m) for m in decoder_ch_mult]
        if len(encoder_ch_mult) != len(decoder_ch_mult):
            raise VAEError(f"encoder_ch_mult {encoder_ch_mult} and decoder_ch_mult {decoder_ch_mult} differ in levels")
        super().__init__(codebook_size, 2 ** (len(encoder_ch_mult) - 1), ch, num_res_blocks, embed_dim, "mse")
        self.kwargs = dict(
            codebook_size=codebook_size, embed_dim=embed_dim, ch=ch, encoder_ch_mult=encoder_ch_mult,
            decoder_ch_mult=decoder_ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
            l2_norm=bool(l2_norm),
        )  # fmt: skip
        self.encoder = Encoder(ch, encoder_ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, decoder_ch_mult, num_res_blocks, z_channels)
        self.quantize = VectorQuantizer(codebook_size, embed_dim, bool(l2_norm))
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def free_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] -> pre-quantisation latents (b, embed_dim, h, w)."""
        return self.quant_conv(self.encoder(images * 2 - 1))

    def snap(self, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> (the nearest codes, straight-through to the (normalised) latents; ids (b, h, w))."""
        z = F.normalize(free, p=2, dim=1) if self.quantize.l2_norm else free
        ids = self.quantize.nearest(free.detach())
        return self.embed_ids(ids).detach() + (z - z.detach()), ids

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w) -> code vectors (b, embed_dim, h, w), the decoder's input (contiguous, as the original's)."""
        return rearrange(F.embedding(ids, self.quantize.codes()), "b h w d -> b d h w").contiguous()

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Code vectors (b, embed_dim, h, w) -> images (b, 3, H, W) in [0, 1] (straight-through clamp)."""
        x = self.decoder(self.post_quant_conv(latent)) * 0.5 + 0.5
        return x.clamp(0, 1) + (x - x.detach())
