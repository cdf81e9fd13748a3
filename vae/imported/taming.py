"""taming-transformers' VQGAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis"),
rewritten: `VQModel` and `GumbelVQ` in one class, `quantizer = "vq"` or `"gumbel"`.

The modules and parameter names are those of `taming.modules.diffusionmodules.model` (Encoder, Decoder,
ResnetBlock, AttnBlock) and `taming.models.vqgan`, so a Lightning checkpoint's `state_dict`, converted
once by `python -m vae.convert taming last.ckpt model.yaml OUT`, loads unchanged (its `loss.*` tensors,
the training-only perceptual loss and discriminator, are left out):
- encoder: a 3x3 stem, then per level `num_res_blocks` ResNet blocks (GroupNorm(32), swish, 3x3 convs)
  at width `ch * ch_mult[level]`, self-attention after each block where the level's nominal resolution
  (`resolution` halved per level) is in `attn_resolutions`, and a stride-2 conv between levels; a middle
  of block, attention, block; GroupNorm, swish and a 3x3 conv to `z_channels`;
- decoder: the mirror, with `num_res_blocks + 1` blocks per level and nearest 2x upsampling plus a conv;
- quantizer "vq" (`VectorQuantizer2`): `quant_conv` to `embed_dim`, the nearest of `codebook_size`
  codes by squared distance; "gumbel" (`GumbelQuantize`): a 1x1 conv to one logit per code, whose
  argmax is the code, and the code's embedding is the decoder's input (taming's own forward adds
  Gumbel noise even in eval, so its codes change from call to call; `encode` here takes the
  noise-free argmax, deterministic as the interface asks).
Images are [-1, 1] inside; the interface's [0, 1] is mapped in and out (the output clamped).

    model = TamingVQGAN(codebook_size=1024, embed_dim=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
                        attn_resolutions=[16], resolution=256, z_channels=256)    # the ImageNet f16 1024 model
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..base import VAEError
from .common import ImportedTokenizer

QUANTIZERS = ("vq", "gumbel")


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    # swish written as taming writes it, so that the codes match the original's bit for bit
    return x * torch.sigmoid(x)


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:  # taming pads right and bottom only
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(nonlinearity(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with 1x1 convs for q, k, v and the output."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        # the original's bmm order, so that the codes match bit for bit
        attn = torch.bmm(rearrange(q, "b c h w -> b (h w) c"), k.reshape(b, c, h * w))  # (b, n, n)
        attn = F.softmax(attn * (int(c) ** (-0.5)), dim=2)
        out = torch.bmm(v.reshape(b, c, h * w), attn.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Level(nn.Module):
    """One resolution level: `block` (ResNet blocks), `attn` (after each block, or empty), a resampler."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(i, o) for i, o in widths])
        self.attn = nn.ModuleList([AttnBlock(o) for _, o in widths] if attention else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images in [-1, 1] (b, 3, H, W) -> latents (b, z_channels, H/f, W/f)."""

    def __init__(
        self,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        resolution: int,
        z_channels: int,
        resamp_with_conv: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            widths = [(block_in if i == 0 else block_out, block_out) for i in range(num_res_blocks)]
            down = Level(widths, attention=res in attn_resolutions)
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_out, resamp_with_conv)
                res //= 2
            self.down.append(down)
        channels = ch * ch_mult[-1]
        self.mid = Middle(channels)
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            h = down(h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (b, z_channels, h, w) -> images in [-1, 1] (b, 3, f h, f w), not clamped."""

    def __init__(
        self,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        resolution: int,
        z_channels: int,
        resamp_with_conv: bool,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = Middle(block_in)
        levels: list[Level] = []
        for level in reversed(range(len(ch_mult))):  # built coarsest first, stored finest first
            block_out = ch * ch_mult[level]
            widths = [(block_in if i == 0 else block_out, block_out) for i in range(num_res_blocks + 1)]
            up = Level(widths, attention=res in attn_resolutions)
            block_in = block_out
            if level != 0:
                up.upsample = Upsample(block_out, resamp_with_conv)
                res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2: `embedding` (k, embed_dim), the nearest code by squared distance."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (b, d, h, w) -> ids (b, h, w), with the original's distance expression and argmin."""
        b, _, h, w = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")
        e = self.embedding.weight
        d = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(e**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, rearrange(e, "n d -> d n"))
        )
        return rearrange(torch.argmin(d, dim=1), "(b h w) -> b h w", b=b, h=h, w=w)


class GumbelQuantize(nn.Module):
    """taming's GumbelQuantize: `proj` to one logit per code, `embed` (k, embed_dim) the code vectors."""

    def __init__(self, z_channels: int, embed_dim: int, codebook_size: int):
        super().__init__()
        self.proj = nn.Conv2d(z_channels, codebook_size, 1)
        self.embed = nn.Embedding(codebook_size, embed_dim)


class TamingVQGAN(ImportedTokenizer):
    """A taming VQGAN. Free latent: the quantiser's input, `quant_conv`'s output (b, embed_dim, h, w) for
    "vq", the code logits (b, codebook_size, h, w) for "gumbel"."""

    kind = "taming_vqgan"

    def __init__(
        self,
        codebook_size: int = 1024,
        embed_dim: int = 256,
        ch: int = 128,
        ch_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: list[int] | tuple[int, ...] = (16,),
        resolution: int = 256,
        z_channels: int = 256,
        resamp_with_conv: bool = True,
        quantizer: str = "vq",
    ):
        if quantizer not in QUANTIZERS:
            raise VAEError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
        if quantizer == "gumbel" and embed_dim != z_channels:
            raise VAEError(f"a Gumbel VQGAN needs embed_dim = z_channels, got {embed_dim} and {z_channels}")
        ch_mult, attn_resolutions = [int(m) for m in ch_mult], [int(r) for r in attn_resolutions]
        super().__init__(codebook_size, 2 ** (len(ch_mult) - 1), ch, num_res_blocks, embed_dim, "mse")
        self.kwargs = dict(
            codebook_size=codebook_size, embed_dim=embed_dim, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, resolution=resolution, z_channels=z_channels,
            resamp_with_conv=bool(resamp_with_conv), quantizer=quantizer,
        )  # fmt: skip
        self.quantizer = quantizer
        shape = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                     resolution=resolution, z_channels=z_channels, resamp_with_conv=bool(resamp_with_conv))  # fmt: skip
        self.encoder = Encoder(**shape)
        self.decoder = Decoder(**shape)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if quantizer == "vq":
            self.quantize: nn.Module = VectorQuantizer(codebook_size, embed_dim)
        else:
            self.quantize = GumbelQuantize(z_channels, embed_dim, codebook_size)

    def code_vectors(self) -> torch.Tensor:
        """The codebook (codebook_size, embed_dim): what the decoder reads for each id."""
        return self.quantize.embedding.weight if self.quantizer == "vq" else self.quantize.embed.weight

    def free_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] -> pre-quantisation latents ("vq") or code logits ("gumbel")."""
        h = self.quant_conv(self.encoder(images * 2 - 1))
        return h if self.quantizer == "vq" else self.quantize.proj(h)

    def snap(self, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A free latent -> (the codes' vectors, straight-through to the latent or the logits' softmax; ids)."""
        if self.quantizer == "vq":
            ids = self.quantize.nearest(free.detach())
            return self.embed_ids(ids).detach() + (free - free.detach()), ids
        ids = free.argmax(dim=1)
        return torch.einsum("bkhw,kd->bdhw", self.code_weights(free), self.code_vectors()), ids

    def code_weights(self, free: torch.Tensor) -> torch.Tensor:
        """Gumbel logits -> one-hot of the argmax (b, codebook_size, h, w), straight-through to the softmax."""
        if self.quantizer == "vq":
            return super().code_weights(free)  # an error: nearest-code quantisers have no logits
        probs = free.softmax(dim=1)
        hard = F.one_hot(free.argmax(dim=1), self.codebook_size).permute(0, 3, 1, 2).to(probs.dtype)
        return hard + (probs - probs.detach())

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w) -> code vectors (b, embed_dim, h, w), the decoder's input."""
        latent = rearrange(F.embedding(ids, self.code_vectors()), "b h w d -> b d h w")
        # the memory layout of the original's decoder input (VectorQuantizer2 makes it contiguous, GumbelQuantize's
        # einsum leaves a (b, h, w, d) view): it sets the convolutions' summation order, so the pixels match exactly
        return latent.contiguous() if self.quantizer == "vq" else latent

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Code vectors (b, embed_dim, h, w) -> images (b, 3, H, W) in [0, 1] (straight-through clamp)."""
        x = self.decoder(self.post_quant_conv(latent)) * 0.5 + 0.5
        return x.clamp(0, 1) + (x - x.detach())
