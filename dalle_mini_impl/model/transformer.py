"""The DALL-E transformer: one decoder-only stream over [text ; image] tokens, in one readable file.

Follows DALL-E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation") as DALLE-pytorch reimplements
it: per-position text pad tokens, a text/image loss weighting of 1/8 : 7/8, and the sparse row, column
and convolutional attention patterns; with the modern pieces of GPT-2/LLaMA-style decoders (pre-norm,
SwiGLU, QK-norm, rotary positions) as options. Laid out nanoGPT-style, top to bottom: config and size
presets, helpers (rotary tables, attention masks), blocks, the model.

The sequence. The text tokenizer gives `text` (b, t): bos at position 0, the caption, eos, then pads.
The image tokenizer gives `image` (b, n) with n = grid_h * grid_w in raster order. The model reads

    position   0 .. t-1        t .. t+n-2
    token      text[0..t-1]    image[0..n-2]

and the logits at position j predict the token at j + 1: text positions 0..t-2 predict text[1..t-1],
the last text position predicts image[0] (so it plays DALL-E's "start of image" role, learned through
the pad or eos token that sits there), and image position t+i predicts image[i+1]. The last image
token is never fed. One output head covers text_vocab + image_vocab ids; a position that predicts text
puts -inf on every image id and vice versa, and the per-position pad tokens are input-only.

unCLIP's decoder (DALL-E 2; `cond_dim`, `cond_len` > 0): a CLIP image embedding (b, cond_dim) is projected to
cond_len positions before the text, [embedding ; text ; image], so every offset above moves by cond_len
(`prefix_len` = cond_len + text_len is where the image starts). The zero vector is the dropped embedding
(its positions then hold only their learned position vectors): what training feeds with probability
`cond_dropout` and what classifier-free guidance contrasts with.

Product image codes (`image_factors = [K_1, .., K_G]`, for a tokenizer whose ids are tuples of one code
from each of G groups: the dVAE with `group_sizes`, whose flat ids `vae.product` defines): an image id is
embedded as the sum of its factors' embeddings, and the head gives one logit per factor code, a tuple's
logit being the sum of its factors'. So the factors are independent given the hidden state, and the
model can give a high logit to a combination of factors that never occurred together in training. The
loss and sampling still see one softmax over the image_vocab flat ids (it equals the product of the
factor softmaxes).

Text pads (`text_pad`):
  per_position  a pad at position i is fed as the extra token text_vocab + i (DALL-E). Pads attend and
                are attended to. Whether predicting a pad counts in the text loss is `pads_in_loss`
                (default False: the text loss averages over non-pad targets only; True: the pad id is a
                target like any other, as DALLE-pytorch does).
  mask          pads are fed as `pad_id` and masked out as attention keys (a token still sees itself, so
                no row is empty); pads never count in the loss.

Positions: text has learned absolute embeddings. Image positions are either row + column embeddings
(`pos_2d = "embed"`) or 2-D rotary (`"rope"`): in every head, half the rotary frequencies turn with the
grid row and half with the grid column. Under rope, text keeps its learned absolute embeddings and is
not rotated (angle 0), so text-to-text attention is position-aware through the embeddings alone.

Attention patterns (`attn_patterns`, cycled over layers) are defined on the grid cell of the image token
each position holds; every pattern is causal and every image position sees all text:
  full    every earlier token
  row     image tokens in the same grid row
  column  image tokens in the same grid column
  conv    image tokens in the conv_kernel x conv_kernel window centred on its own cell

Usage:
    from dalle_mini_impl.model.transformer import DALLE, preset_config
    model = DALLE(preset_config("anchor-tiny"))
    loss, parts = model.loss(text, image)         # parts: {"text_loss": .., "image_loss": ..}
    # sampling: dalle_mini_impl.model.generate.generate(model, text, ...)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vae.product import id_rows, outer_sum

from ..config import TransformerConfig
from ..errors import UserError

# ----------------------------------------------------------------------------------------------
# Config and size presets
# ----------------------------------------------------------------------------------------------

MLPS = ("gelu", "swiglu")
NORMS = ("layer", "rms")
POS_2D = ("embed", "rope")
TEXT_PADS = ("per_position", "mask")
PATTERNS = ("full", "row", "column", "conv")


# Sizes for `TransformerConfig.preset` (LlamaGen's GPT_models). The anchor-* presets reproduce the
# dalle-pytorch 1.6.6 configurations that `bench.anchor` compares against (its GEGLU with ff_mult 4 is our
# default SwiGLU with mlp_ratio 4), and dalle256 is DALL-E's 256 px geometry for GPU benchmarks; those three
# also carry vocabularies and grid, which the tokenizers' replace when a run builds its model.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=256, depth=4, heads=8),  # CPU
    "small": dict(dim=512, depth=8, heads=8),
    "base": dict(dim=768, depth=12, heads=12),
    "large": dict(dim=1024, depth=24, heads=16),
    "anchor-tiny": dict(
        dim=256, depth=4, heads=8, head_dim=32, text_len=16, text_vocab=1000, image_vocab=512, grid_h=8, grid_w=8
    ),
    "anchor-medium": dict(
        dim=512, depth=6, heads=8, head_dim=64, text_len=64, text_vocab=10000, image_vocab=1024, grid_h=8, grid_w=8
    ),
    "dalle256": dict(
        dim=1024,
        depth=12,
        heads=16,
        head_dim=64,
        text_len=64,
        text_vocab=16384,
        image_vocab=8192,
        grid_h=32,
        grid_w=32,
    ),
}
GEOMETRY = ("text_vocab", "image_vocab", "image_factors", "text_len", "grid_h", "grid_w", "pad_id")


def resolve_config(cfg: TransformerConfig, **geometry: Any) -> TransformerConfig:
    """A copy of `cfg` that a model can be built from: size and geometry filled in, every field checked.

    A size or geometry field left 0 (or empty) takes the preset's value; `geometry` (the tokenizers' numbers:
    text_vocab, image_vocab, image_factors, text_len, grid_h, grid_w, pad_id) is then filled in, and a
    value the config already sets must agree with it (all but pad_id, whose 0 is a real id: the tokenizer's
    pad id always wins). head_dim comes from the preset only when neither dim nor heads is set (a preset's
    head width belongs to its dim and heads); else it is dim // heads. Resolving a resolved config returns
    an equal one.
    """
    if cfg.preset not in PRESETS:
        raise UserError(f"transformer preset '{cfg.preset}' is unknown; use one of: {', '.join(PRESETS)}")
    unknown = sorted(set(geometry) - set(GEOMETRY))
    if unknown:
        raise TypeError(f"resolve_config got {unknown[0]!r}, which is not a geometry field: {', '.join(GEOMETRY)}")
    out = dataclasses.replace(cfg, attn_patterns=list(cfg.attn_patterns), image_factors=list(cfg.image_factors))
    preset = dict(PRESETS[cfg.preset])
    if cfg.dim > 0 or cfg.heads > 0:
        preset.pop("head_dim", None)
    for key, value in preset.items():
        if not getattr(out, key):
            setattr(out, key, value)
    for key, value in geometry.items():
        value = list(value) if key == "image_factors" else value
        if key != "pad_id" and getattr(cfg, key) and getattr(cfg, key) != value:
            raise UserError(
                f"config key 'transformer.{key}' is {getattr(cfg, key)!r} but the tokenizers give {value!r}; "
                "leave it unset: it is read from them"
            )
        setattr(out, key, value)
    _check(out)
    return out


def preset_config(name: str, **overrides: Any) -> TransformerConfig:
    """A preset as a whole config (benchmarks, tests); `overrides` set any other field."""
    return resolve_config(TransformerConfig(preset=name, **overrides))


def _check(cfg: TransformerConfig) -> None:
    """Every field of a filled-in config is usable; image_factors and head_dim are completed in place."""

    def bad(key: str, allowed: str) -> UserError:
        return UserError(f"transformer config '{key}' is {getattr(cfg, key)!r}; it must be {allowed}")

    for key, allowed in (("mlp", MLPS), ("norm", NORMS), ("pos_2d", POS_2D), ("text_pad", TEXT_PADS)):
        if getattr(cfg, key) not in allowed:
            raise bad(key, " or ".join(allowed))
    if not cfg.attn_patterns or any(p not in PATTERNS for p in cfg.attn_patterns):
        raise bad("attn_patterns", "a non-empty list of " + ", ".join(PATTERNS))
    for key in ("text_vocab", "image_vocab", "grid_h", "grid_w", "dim", "depth", "heads"):
        if getattr(cfg, key) < 1:
            raise bad(key, "a positive integer")
    cfg.image_factors = list(cfg.image_factors or [cfg.image_vocab])
    if any(k < 2 for k in cfg.image_factors) or math.prod(cfg.image_factors) != cfg.image_vocab:
        raise bad("image_factors", f"group sizes >= 2 whose product is image_vocab {cfg.image_vocab}")
    if cfg.text_len < 2:
        raise bad("text_len", "at least 2 (bos plus one token)")
    if not 0 <= cfg.pad_id < cfg.text_vocab:
        raise bad("pad_id", f"a text id in [0, {cfg.text_vocab})")
    if cfg.head_dim == 0:
        if cfg.dim % cfg.heads:
            raise bad("heads", f"a divisor of dim {cfg.dim}, or set head_dim")
        cfg.head_dim = cfg.dim // cfg.heads
    if cfg.pos_2d == "rope" and cfg.head_dim % 4:
        raise bad("head_dim", "a multiple of 4 for 2-D rotary positions (half rows, half columns)")
    if cfg.conv_kernel < 1 or cfg.conv_kernel % 2 == 0:
        raise bad("conv_kernel", "an odd positive integer")
    if not 0.0 <= cfg.text_loss_weight <= 1.0:
        raise bad("text_loss_weight", "between 0 and 1")
    if cfg.text_pad == "mask" and cfg.pads_in_loss:
        raise bad("pads_in_loss", "false when text_pad is 'mask' (masked pads are never targets)")
    if cfg.cond_dim < 0 or cfg.cond_len < 0 or (cfg.cond_dim > 0) != (cfg.cond_len > 0):
        raise bad("cond_len", f"0 with cond_dim 0 (no embedding) or positive with cond_dim {cfg.cond_dim} > 0")
    if cfg.cond_tokens < 0 or cfg.cond_token_dim < 0 or (cfg.cond_tokens > 0) != (cfg.cond_token_dim > 0):
        raise bad("cond_tokens", "0 with cond_token_dim 0, or both positive")
    if cfg.cond_tokens and (cfg.cond_tokens >= cfg.cond_len or cfg.cond_tokens * cfg.cond_token_dim >= cfg.cond_dim):
        raise bad(
            "cond_tokens", f"below cond_len {cfg.cond_len}, its slices within cond_dim {cfg.cond_dim} and leaving some"
        )
    if not 0.0 <= cfg.cond_dropout <= 1.0:
        raise bad("cond_dropout", "between 0 and 1")
    for key in ("dropout", "attn_dropout"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise bad(key, "in [0, 1)")


# ----------------------------------------------------------------------------------------------
# Helpers: rotary tables, attention masks
# ----------------------------------------------------------------------------------------------


def rope_2d_angles(cfg: TransformerConfig, base: float = 10000.0) -> torch.Tensor:
    """Rotation angles (L, head_dim / 2) per sequence position: 0 for the prefix, row | column for image."""
    quarter = cfg.head_dim // 4
    inv_freq = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (quarter,)
    cell = torch.arange(cfg.image_len - 1)  # grid cells of the image tokens that are fed
    rows = (cell // cfg.grid_w).double()[:, None] * inv_freq
    cols = (cell % cfg.grid_w).double()[:, None] * inv_freq
    image = torch.cat([rows, cols], dim=-1)  # (n - 1, head_dim / 2)
    text = torch.zeros(cfg.prefix_len, 2 * quarter, dtype=torch.float64)
    return torch.cat([text, image]).float()  # (L, head_dim / 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + e/2) of x (b, h, s, e) by the angles behind cos, sin (s, e)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def pattern_mask(cfg: TransformerConfig, pattern: str) -> torch.Tensor:
    """Which key each query may see under `pattern`: a causal boolean mask (L, L), True = visible."""
    L, t = cfg.seq_len, cfg.prefix_len
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    if pattern == "full":
        return mask
    cell = torch.arange(cfg.image_len - 1)
    r, c = cell // cfg.grid_w, cell % cfg.grid_w
    if pattern == "row":
        near = r[:, None] == r[None, :]
    elif pattern == "column":
        near = c[:, None] == c[None, :]
    else:
        reach = cfg.conv_kernel // 2
        near = ((r[:, None] - r[None, :]).abs() <= reach) & ((c[:, None] - c[None, :]).abs() <= reach)
    mask[t:, t:] &= near  # image queries keep all prefix keys; image keys only in the pattern
    return mask


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = visible) as the additive one SDPA turns it into (0 or -inf), in dtype.

    SDPA converts a boolean mask in every call; a cached pass over several positions (a window of speculative
    decoding) converts it once for all layers instead (what that saves: docs/RESULTS.md, "Speculative decoding on
    the emoji bundle: where the passes go").
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class Linear(nn.Module):
    """y = x @ weight with the weight stored (in, out), no bias.

    The transpose of nn.Linear's layout: for the few rows of a decoding step, MKL's CPU GEMM is faster on
    a row-major right-hand side while the weights sit in cache, and the same once they stream from memory
    and for large training batches (`python -m dalle_mini_impl.bench --only sample` times decoding).
    """

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


@dataclass
class KVCache:
    """One layer's preallocated keys and values (b, heads, L, head_dim), written in place."""

    k: torch.Tensor
    v: torch.Tensor


def make_norm(cfg: TransformerConfig, width: int) -> nn.Module:
    return nn.LayerNorm(width) if cfg.norm == "layer" else nn.RMSNorm(width)


def write_rows(cache: KVCache, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """cache.k[r, :, pos[r, j]] = k[r, :, j] for every row r and j, and the same for v: cache (b, h, L, e), pos
    (b, s), k and v (b, h, s, e).

    One index_copy_ of whole e-vectors into each cache tensor seen as (b h L) rows of e, which on the CPU is
    5-12x faster than scatter_ along L (that indexes every element). Caches are contiguous: `new_cache` allocates
    them whole and decoding only ever keeps their first rows."""
    b, h, length, e = cache.k.shape
    rows = (torch.arange(b * h, device=pos.device).view(b, h, 1) * length + pos[:, None, :]).reshape(-1)  # (b h s)
    for tensor, x in ((cache.k, k), (cache.v, v)):
        tensor.view(-1, e).index_copy_(0, rows, x.reshape(-1, e))


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, inner = cfg.heads, cfg.heads * cfg.head_dim
        self.qkv = Linear(cfg.dim, 3 * inner)
        self.out = Linear(inner, cfg.dim)
        # QK-norm (Dehghani et al. 2023) bounds the attention logits, which keeps bf16 training stable
        self.q_norm = nn.RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.attn_dropout = cfg.attn_dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        start: int | torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        # x (b, s, d) holds sequence positions start .. start + s - 1; a tensor start (1,) is one position
        # of a static-shape decoding step: its key and value are written there and the query reads the
        # whole cache, the mask hiding the positions after it; a tensor start (b, s) gives every row its
        # own positions (speculative decoding's windows), and the query reads the cache up to the width of
        # its mask, which that path always gives (`DALLE.transform_rows`)
        q, k, v = rearrange(self.qkv(x), "b s (three h e) -> three b h s e", three=3, h=self.heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(start, torch.Tensor) and start.dim() == 2:
            write_rows(cache, start, k, v)
            k, v = cache.k[:, :, : mask.shape[-1]], cache.v[:, :, : mask.shape[-1]]
        elif isinstance(start, torch.Tensor):
            cache.k.index_copy_(2, start, k)
            cache.v.index_copy_(2, start, v)
            k, v = cache.k, cache.v  # (b, h, L, e)
        elif cache is not None:
            end = start + x.shape[1]
            cache.k[:, :, start:end] = k
            cache.v[:, :, start:end] = v
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]  # (b, h, end, e): views, no copy
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (b, h, s, e)
        return self.resid_drop(self.out(rearrange(y, "b h s e -> b s (h e)")))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.gated = cfg.mlp == "swiglu"
        self.up = Linear(cfg.dim, hidden * (2 if self.gated else 1))
        self.down = Linear(hidden, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            a, gate = h.chunk(2, dim=-1)
            h = a * F.silu(gate)
        else:
            h = F.gelu(h)
        return self.drop(self.down(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg, cfg.dim), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg, cfg.dim), MLP(cfg)

    def forward(self, x, start, mask, is_causal, rope, cache):
        x = x + self.attn(self.norm1(x), start, mask, is_causal, rope, cache)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class DALLE(nn.Module):
    """Decoder-only transformer over [text ; image] ids (see the module docstring for the layout)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = resolve_config(cfg)  # checked, with the preset's size where cfg leaves it 0
        d, t = cfg.dim, cfg.text_len
        pad_tokens = t if cfg.text_pad == "per_position" else 0
        self.text_emb = nn.Embedding(cfg.text_vocab + pad_tokens, d)
        self.image_emb = nn.Embedding(cfg.image_rows, d)
        self.text_pos = nn.Embedding(t, d)
        if cfg.cond_len:  # unCLIP: the embedding's positions, a projection plus a learned vector each
            lead = cfg.cond_dim - cfg.cond_tokens * cfg.cond_token_dim
            self.cond_proj = Linear(lead, (cfg.cond_len - cfg.cond_tokens) * d)
            self.cond_pos = nn.Embedding(cfg.cond_len, d)
            if cfg.cond_tokens:  # one position per slice (a grid cell), one projection for all of them
                self.cond_token_proj = Linear(cfg.cond_token_dim, d)
        if cfg.pos_2d == "embed":
            self.row_pos = nn.Embedding(cfg.grid_h, d)
            self.col_pos = nn.Embedding(cfg.grid_w, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = make_norm(cfg, d)
        self.head = Linear(d, cfg.text_vocab + cfg.image_rows)
        self.gradient_checkpointing = False

        cell = torch.arange(cfg.image_len)
        self.register_buffer("cell_row", cell // cfg.grid_w, persistent=False)
        self.register_buffer("cell_col", cell % cfg.grid_w, persistent=False)
        self.register_buffer("pad_token", cfg.text_vocab + torch.arange(t), persistent=False)
        self.register_buffer("causal", pattern_mask(cfg, "full"), persistent=False)
        for p in sorted(set(cfg.attn_patterns) - {"full"}):
            self.register_buffer(f"mask_{p}", pattern_mask(cfg, p), persistent=False)
        if cfg.pos_2d == "rope":
            angles = torch.cat([rope_2d_angles(cfg)] * 2, dim=-1)  # (L, e): one angle per channel pair
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere, residual output projections scaled by 1 / sqrt(2 * depth)
        for m in self.modules():
            if isinstance(m, (Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            for w in (block.attn.out.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * self.cfg.depth))

    # --- embedding ---------------------------------------------------------------------------

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text ids (b, t) -> (b, t, d); under per_position a pad at i is the token text_vocab + i."""
        if self.cfg.text_pad == "per_position":
            text = torch.where(text == self.cfg.pad_id, self.pad_token, text)
        return self.text_emb(text) + self.text_pos.weight

    def embed_prefix(self, text: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The positions before the image: [embedding ; text] (b, prefix_len, d) from text ids (b, t) and, for
        an unCLIP decoder, CLIP image embeddings cond (b, cond_dim) (None or zero rows: dropped)."""
        x = self.embed_text(text)
        if not self.cfg.cond_len:
            if cond is not None:
                raise ValueError("this transformer takes no embedding (cond_dim 0); pass cond=None")
            return x
        b, c = text.shape[0], self.cfg
        if cond is None:
            cond = x.new_zeros(b, c.cond_dim)
        if cond.shape != (b, c.cond_dim):
            raise ValueError(f"cond must be ({b}, {c.cond_dim}) embeddings, got {tuple(cond.shape)}")
        T = c.cond_tokens
        lead, cells = cond.to(x.dtype).split([c.cond_dim - T * c.cond_token_dim, T * c.cond_token_dim], dim=1)
        e = self.cond_proj(lead).view(b, c.cond_len - T, c.dim)
        if T:  # one position per cell (`cond_tokens`)
            e = torch.cat([e, self.cond_token_proj(cells.view(b, T, c.cond_token_dim))], dim=1)
        e = e + self.cond_pos.weight
        return torch.cat([e, x], dim=1)

    def embed_image(self, image: torch.Tensor, first: int | torch.Tensor = 0) -> torch.Tensor:
        """Image ids (b, m) of grid cells first .. first + m - 1 -> (b, m, d); a tensor `first` (1,) takes m = 1,
        and a tensor (b, m) gives every id its own cell."""
        if len(self.cfg.image_factors) == 1:
            x = self.image_emb(image)
        else:  # the sum of the factors' embeddings, (b, m, g, d) -> (b, m, d)
            x = self.image_emb(id_rows(image, self.cfg.image_factors)).sum(dim=-2)
        return self._add_cells(x, first)

    def embed_code_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights over each group's codes (b, m, K_1 + .. + K_G) of cells 0 .. m - 1 -> (b, m, d): the weighted
        sum of the code embeddings (one-hot weights: `embed_image` of their ids), differentiable in them."""
        return self._add_cells(weights.to(self.image_emb.weight.dtype) @ self.image_emb.weight, 0)

    def _add_cells(self, x: torch.Tensor, first: int | torch.Tensor) -> torch.Tensor:
        """Image embeddings (b, m, d) of cells first .. first + m - 1 plus their position (under pos_2d "embed")."""
        if self.cfg.pos_2d == "embed":
            cells = first if isinstance(first, torch.Tensor) else slice(first, first + x.shape[1])
            x = x + self.row_pos(self.cell_row[cells]) + self.col_pos(self.cell_col[cells])
        return x

    def embed(self, text: torch.Tensor, image_in: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The first P + m positions: the prefix (`embed_prefix` of text (b, t) and cond) and the image ids fed
        so far (b, m) -> (b, P + m, d)."""
        return torch.cat([self.embed_prefix(text, cond), self.embed_image(image_in)], dim=1)

    # --- attention plumbing -----------------------------------------------------------------

    def attn_masks(self, text: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the boolean mask over all L positions (b or 1, 1, L, L), or None for plain causal.

        Only text_pad == "mask" depends on `text`; layers with the same pattern share one tensor.
        """
        key_ok = None
        if self.cfg.text_pad == "mask":
            L, k, t = self.cfg.seq_len, self.cfg.cond_len, self.cfg.text_len
            key_ok = torch.ones(text.shape[0], L, dtype=torch.bool, device=text.device)
            key_ok[:, k : k + t] = text != self.cfg.pad_id
            key_ok = key_ok[:, None, None, :] | torch.eye(L, dtype=torch.bool, device=text.device)
        shared: dict[str, torch.Tensor | None] = {}
        for p in set(self.cfg.attn_patterns):
            base = self.causal if p == "full" else getattr(self, f"mask_{p}")
            if key_ok is not None:
                shared[p] = base & key_ok  # (b, 1, L, L)
            else:
                shared[p] = None if p == "full" else base[None, None]  # (1, 1, L, L)
        return [shared[self.cfg.pattern(i)] for i in range(self.cfg.depth)]

    def new_cache(self, batch: int) -> list[KVCache]:
        """Preallocated keys and values for every layer and all L positions.

        In the model's dtype, or in the autocast dtype when autocast is on (keys are computed in it).
        """
        w = self.head.weight
        dtype = w.dtype
        if torch.is_autocast_enabled(w.device.type):
            dtype = torch.get_autocast_dtype(w.device.type)
        shape = (batch, self.cfg.heads, self.cfg.seq_len, self.cfg.head_dim)
        return [
            KVCache(torch.zeros(shape, dtype=dtype, device=w.device), torch.zeros(shape, dtype=dtype, device=w.device))
            for _ in range(self.cfg.depth)
        ]

    def transform(
        self,
        x: torch.Tensor,
        start: int | torch.Tensor = 0,
        masks: list[torch.Tensor | None] | None = None,
        cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Embedded positions start .. start + s - 1 (b, s, d) -> final-normed hidden states (b, s, d).

        Without a cache `start` must be 0 (the whole prefix); with one, earlier positions are read from
        it and these are written into it. `masks` comes from `attn_masks` (None: all layers plain causal).
        A tensor `start` (1,) is `decode_step`'s static-shape path: one position, attending to the whole cache.
        """
        if isinstance(start, torch.Tensor):
            return self._transform_one(x, start, masks, cache)
        s = x.shape[1]
        end = start + s
        if cache is None and start != 0:
            raise ValueError(f"transform without a cache needs the whole prefix (start 0), got start {start}")
        rope = None
        if self.cfg.pos_2d == "rope":
            rope = (self.rope_cos[start:end].to(x.dtype), self.rope_sin[start:end].to(x.dtype))
        masks = masks if masks is not None else [None] * self.cfg.depth
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.drop(x)
        additive: dict[int, torch.Tensor] = {}  # a cached pass's masks, each converted once for all layers
        for i, block in enumerate(self.blocks):
            mask, is_causal = masks[i], False
            if mask is not None:
                mask = mask[..., start:end, :end]
            elif start == 0:
                is_causal = True  # SDPA's fused causal path: no mask tensor at all
            elif s > 1:
                mask = self.causal[start:end, :end]
            if mask is not None and cache is not None:
                key = id(masks[i])
                if key not in additive:
                    additive[key] = additive_mask(mask, x.dtype)
                mask = additive[key]
            layer_cache = cache[i] if cache is not None else None
            if ckpt:
                x = checkpoint(block, x, start, mask, is_causal, rope, layer_cache, use_reentrant=False)
            else:
                x = block(x, start, mask, is_causal, rope, layer_cache)
        return self.norm(x)

    def _transform_one(
        self, x: torch.Tensor, pos: torch.Tensor, masks: list[torch.Tensor | None] | None, cache: list[KVCache]
    ) -> torch.Tensor:
        """`transform` for one position given as a tensor pos (1,): every shape independent of its value."""
        if cache is None or x.shape[1] != 1:
            raise ValueError(f"a tensor start needs a cache and one position, got {x.shape[1]} positions")
        rope = None
        if self.cfg.pos_2d == "rope":
            rope = (self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype))  # (1, e)
        masks = masks if masks is not None else [None] * self.cfg.depth
        for block, mask, layer_cache in zip(self.blocks, masks, cache):
            # the query's row of the layer's mask over all L keys: (b or 1, 1, 1, L), or (1, L) plain causal
            row = self.causal[pos] if mask is None else mask.index_select(-2, pos)
            x = block(x, pos, row, False, rope, layer_cache)
        return self.norm(x)

    def transform_rows(
        self, x: torch.Tensor, pos: torch.Tensor, masks: list[torch.Tensor | None] | None, cache: list[KVCache]
    ) -> torch.Tensor:
        """`transform` with every row at its own positions pos (b, s): (b, s, d) -> (b, s, d), for sampling.

        Keys and values are written at each row's positions; a query attends to the cached positions up to
        the largest one under its own row of the layer's mask (speculative decoding's per-row windows, whose
        positions are consecutive; any positions work whose earlier ones are in the cache). No dropout.
        """
        if cache is None or pos.shape != x.shape[:2]:
            raise ValueError(f"transform_rows needs a cache and positions (b, s) = {tuple(x.shape[:2])}")
        rope = None
        if self.cfg.pos_2d == "rope":
            rope = (self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype))  # (b, 1, s, e)
        width = int(pos.max()) + 1  # keys 0 .. width - 1
        rows = torch.arange(x.shape[0], device=pos.device)[:, None]  # (b, 1)
        masks = masks if masks is not None else [None] * self.cfg.depth
        shared: dict[int, torch.Tensor] = {}
        for block, mask, layer_cache in zip(self.blocks, masks, cache):
            key = id(mask)
            if key not in shared:  # each query's row of the mask: (b, 1, s, width)
                full = self.causal[None] if mask is None else mask[:, 0]  # (1 or b, L, L)
                shared[key] = additive_mask(full[rows if full.shape[0] > 1 else 0, pos][..., :width][:, None], x.dtype)
            x = block(x, pos, shared[key], False, rope, layer_cache)
        return self.norm(x)

    def decode_step(
        self, ids: torch.Tensor, cell: torch.Tensor, masks: list[torch.Tensor | None], cache: list[KVCache]
    ) -> torch.Tensor:
        """One decoding step at fixed shapes: ids (b, 1) fed at grid cell `cell` (1,) -> image logits (b, k).

        The logits predict cell + 1. No shape depends on `cell` (its key and value are written into the
        cache with index_copy_ and the query attends to all L cached positions under its mask row), so
        one torch.compile of this function serves every step, and its CUDA-graph capture replays.
        """
        x = self.embed_image(ids, cell)
        h = self._transform_one(x, cell + self.cfg.prefix_len, masks, cache)
        return self.image_logits(h[:, -1])

    # --- heads --------------------------------------------------------------------------------

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d) -> logits over text ids only (..., text_vocab)."""
        return h @ self.head.weight[:, : self.cfg.text_vocab]

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d) -> logits over image ids only (..., image_vocab)."""
        logits = h @ self.head.weight[:, self.cfg.text_vocab :]  # (..., K_1 + .. + K_G)
        return logits if len(self.cfg.image_factors) == 1 else outer_sum(logits, self.cfg.image_factors)

    def code_log_likelihood(
        self, text: torch.Tensor, weights: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean log-likelihood per image (b,) of codes given as weights over each group's codes (b, n, K_1 + ..
        + K_G), raster order, given text (b, t): per cell, the weights times each group's log-softmax.

        One-hot weights give the model's log-likelihood of those ids (minus `loss`'s image part, per image).
        Differentiable in the weights through the inputs and the targets: straight-through one-hots (hard
        forward, soft backward) carry its gradient to whatever made them (VQGAN+CLIP's latents).
        """
        c = self.cfg
        x = torch.cat([self.embed_prefix(text, cond), self.embed_code_weights(weights[:, :-1])], dim=1)
        h = self.transform(x, 0, self.attn_masks(text))[:, c.prefix_len - 1 :]  # (b, n, d): predict cells 0 .. n-1
        logits = h @ self.head.weight[:, c.text_vocab :]  # (b, n, K_1 + .. + K_G)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32 for the softmax
        log_p = torch.cat([group.log_softmax(dim=-1) for group in logits.split(c.image_factors, dim=-1)], dim=-1)
        return (weights.to(log_p.dtype) * log_p).sum(dim=-1).mean(dim=-1)

    def cell_log_likelihoods(
        self, text: torch.Tensor, image: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The log-probability of every image id given the text and the ids before it, (b, n) float32, for
        text (b, t) and image ids (b, n): what editing ranks candidates by (a redrawn region should make the
        kept cells after it likely)."""
        return self.cell_log_probs(text, image, cond).gather(-1, image[..., None]).squeeze(-1)

    def cell_log_probs(self, text: torch.Tensor, image: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The log-probabilities of every image id at every cell given the text and the ids before it, (b, n,
        image_vocab) float32, for text (b, t) and image ids (b, n): one teacher-forced pass (the Jacobi updates
        of CLIP-guided generation read the model's prediction of every cell at once)."""
        h = self.hidden(text, image, cond)[:, self.cfg.prefix_len - 1 :]  # (b, n, d): predict cells 0 .. n-1
        return self.image_logits(h).float().log_softmax(dim=-1)

    # --- training -----------------------------------------------------------------------------

    def _check(self, text: torch.Tensor, image: torch.Tensor) -> None:
        b, t, n = text.shape[0], self.cfg.text_len, self.cfg.image_len
        if text.dim() != 2 or text.shape[1] != t:
            raise ValueError(f"text must be (b, {t}) ids, got shape {tuple(text.shape)}")
        if image.dim() != 2 or image.shape[0] != b or not 1 <= image.shape[1] <= n:
            raise ValueError(f"image must be ({b}, 1..{n}) ids, got shape {tuple(image.shape)}")

    def hidden(self, text: torch.Tensor, image: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Text (b, t), image targets (b, m) and any embedding cond (b, cond_dim) -> hidden states
        (b, P + m - 1, d) of [prefix ; image[:-1]]."""
        self._check(text, image)
        return self.transform(self.embed(text, image[:, :-1], cond), 0, self.attn_masks(text))

    def forward(self, text: torch.Tensor, image: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (b, P + m - 1, text_vocab + image_vocab); position j predicts token j + 1.

        Positions 0 .. P-2 predict text (the embedding's positions too: nothing is read from them) and carry
        -inf on image ids; positions P-1 .. predict image and carry -inf on text ids.
        """
        h = self.hidden(text, image, cond)
        if len(self.cfg.image_factors) == 1:
            logits = self.head(h)  # (b, s, k)
        else:
            logits = torch.cat([self.text_logits(h), self.image_logits(h)], dim=-1)
        tv = self.cfg.text_vocab
        predicts_text = torch.arange(logits.shape[1], device=logits.device) < self.cfg.prefix_len - 1
        is_text_id = torch.arange(logits.shape[2], device=logits.device) < tv
        wrong = predicts_text[:, None] != is_text_id[None, :]  # (s, k)
        return logits.masked_fill(wrong, float("-inf"))

    def loss(
        self, text: torch.Tensor, image: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """text_loss_weight * text CE + (1 - text_loss_weight) * image CE, and both parts (detached).

        The text CE averages over the t - 1 text targets, leaving out pad targets unless pads_in_loss;
        the image CE averages over all n image targets. Each softmax runs over its own segment's ids,
        which equals a softmax over the -inf-restricted logits of `forward`. cond: an unCLIP decoder's
        embeddings (b, cond_dim), zero rows dropped (None: all dropped).
        """
        k, P = self.cfg.cond_len, self.cfg.prefix_len
        h = self.hidden(text, image, cond)  # (b, P + n - 1, d)
        text_logits = self.text_logits(h[:, k : P - 1])  # (b, t - 1, k)
        image_logits = self.image_logits(h[:, P - 1 :])  # (b, n, k)
        targets = text[:, 1:]  # (b, t - 1)
        text_ce = F.cross_entropy(rearrange(text_logits, "b t k -> b k t").float(), targets, reduction="none")
        if self.cfg.pads_in_loss:
            text_loss = text_ce.mean()
        else:
            keep = (targets != self.cfg.pad_id).to(text_ce.dtype)
            text_loss = (text_ce * keep).sum() / keep.sum().clamp(min=1.0)
        image_loss = F.cross_entropy(rearrange(image_logits, "b n k -> b k n").float(), image)
        w = self.cfg.text_loss_weight
        total = w * text_loss + (1 - w) * image_loss
        return total, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: matmul weights decay; norms, biases and embeddings do not."""
        decay, no_decay = [], []
        for module in self.modules():
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_matmul = isinstance(module, Linear)
                (decay if is_matmul else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the token and position tables (the head counts)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per position: 6 N + 12 L T d (PaLM / nanoGPT MFU convention).

        N = non-embedding parameters, L = depth, T = positions per sequence (text_len + image_len - 1),
        d = the attention width heads * head_dim (equal to dim in every preset).
        """
        c = self.cfg
        return 6 * self.num_params() + 12 * c.depth * c.seq_len * c.heads * c.head_dim


__all__ = [
    "DALLE",
    "GEOMETRY",
    "PRESETS",
    "KVCache",
    "TransformerConfig",
    "apply_rope",
    "pattern_mask",
    "preset_config",
    "resolve_config",
    "rope_2d_angles",
]
