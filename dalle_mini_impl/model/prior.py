"""unCLIP's prior (DALL-E 2, Ramesh et al. 2022, section 2.1): a caption -> a CLIP image embedding.

The decoder (`transformer.DALLE` with `cond_dim`) draws an image from a CLIP image embedding; the prior gives
it one for a caption, so that text-to-image runs through the decoder. Two kinds share one network:

  diffusion   Gaussian diffusion over the embedding, the network predicting the clean embedding x0 from the
              noised one x_t (the paper's choice), cosine noise schedule (Nichol & Dhariwal 2021); sampled
              by DDIM (Song et al. 2021, eta 0) over `sample_steps` of the `timesteps` levels, from N(0, I).
  regression  the same network fed no noise (x_t = 0 at the last level): one deterministic guess per
              caption, the conditional mean; the baseline a diffusion prior has to beat.

The network is a small bidirectional transformer (the DALL-E transformer's blocks) over

    [caption ids (t) ; CLIP text embedding (1) ; noise level (1) ; x_t (1) ; query (1)]

whose last position reads out x0. Embeddings are unit vectors; the diffusion runs on them times sqrt(e) (one
unit of variance per number, as DALLE2-pytorch scales them) and samples are normalised back to unit length.
Classifier-free guidance (`text_dropout` in training, `guidance_scale` when sampling) drops the caption
ids (masked out as keys) and the text embedding (zeroed) together.

Usage:
    prior = EmbeddingPrior(cfg.unclip.prior, embed_dim=128, text_vocab=475, text_len=16, pad_id=0)
    loss = prior.loss(text_ids, text_emb, image_emb)               # (b, t), (b, e), (b, e)
    emb = prior.sample(text_ids, text_emb, generator=g)             # (b, e), unit length
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PriorConfig, TransformerConfig
from ..errors import UserError
from .transformer import Block, Linear

KINDS = ("diffusion", "regression")


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """The signal fraction alpha_bar (T,) of noise levels 1 .. T under the cosine schedule, betas capped at 0.999."""
    f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


def level_features(levels: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (b, dim) of integer noise levels (b,), as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=levels.device) / half)
    angles = levels.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def check_prior_config(cfg: PriorConfig) -> None:
    def bad(key: str, allowed: str) -> UserError:
        return UserError(f"config key 'unclip.prior.{key}' is {getattr(cfg, key)!r}; it must be {allowed}")

    if cfg.kind not in KINDS:
        raise bad("kind", " or ".join(KINDS))
    for key in ("dim", "depth", "heads", "timesteps", "sample_steps"):
        if getattr(cfg, key) < 1:
            raise bad(key, "a positive integer")
    if cfg.dim % cfg.heads or cfg.dim % 2:
        raise bad("dim", f"even and a multiple of heads ({cfg.heads})")
    if cfg.sample_steps > cfg.timesteps:
        raise bad("sample_steps", f"at most timesteps ({cfg.timesteps})")
    if not 0.0 <= cfg.text_dropout < 1.0:
        raise bad("text_dropout", "in [0, 1)")


class EmbeddingPrior(nn.Module):
    """Caption ids (b, t) and CLIP text embeddings (b, e) -> CLIP image embeddings (b, e); see the module docstring."""

    def __init__(self, cfg: PriorConfig, *, embed_dim: int, text_vocab: int, text_len: int, pad_id: int):
        super().__init__()
        check_prior_config(cfg)
        self.cfg, self.embed_dim, self.text_len, self.pad_id = cfg, embed_dim, text_len, pad_id
        d = cfg.dim
        block = TransformerConfig(dim=d, depth=cfg.depth, heads=cfg.heads, head_dim=d // cfg.heads)
        self.text_emb = nn.Embedding(text_vocab, d)
        self.text_pos = nn.Embedding(text_len, d)
        self.text_in = Linear(embed_dim, d)  # the CLIP text embedding
        self.level_in = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.x_in = Linear(embed_dim, d)  # the noised image embedding
        self.slots = nn.Embedding(4, d)  # text embedding, level, x_t, query: a learned vector each
        self.blocks = nn.ModuleList(Block(block) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.out = Linear(d, embed_dim)
        for m in self.modules():
            if isinstance(m, (Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        self.register_buffer("alpha_bar", cosine_alpha_bar(cfg.timesteps), persistent=False)

    @property
    def scale(self) -> float:
        """Unit embeddings times this have about one unit of variance per number."""
        return math.sqrt(self.embed_dim)

    def forward(
        self, text: torch.Tensor, text_emb: torch.Tensor, x_t: torch.Tensor, level: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """The predicted clean embedding (b, e), scaled like x_t, from caption ids (b, t), text embeddings (b, e),
        noised embeddings x_t (b, e) at integer levels (b,) in 0 .. T-1, and keep (b,): False drops the caption."""
        b, t = text.shape
        x_text = self.text_emb(text) + self.text_pos.weight
        x_text_emb = self.text_in(text_emb * keep[:, None].to(text_emb.dtype))
        x_level = self.level_in(level_features(level, self.cfg.dim).to(x_text.dtype))
        x = torch.cat(
            [x_text, torch.stack([x_text_emb, x_level, self.x_in(x_t), x_text.new_zeros(b, self.cfg.dim)], 1)], dim=1
        )
        x[:, t:] = x[:, t:] + self.slots.weight
        # keys: the caption's non-pad ids where it is kept, and the four slots always
        key_ok = torch.ones(b, t + 4, dtype=torch.bool, device=text.device)
        key_ok[:, :t] = (text != self.pad_id) & keep[:, None]
        mask = key_ok[:, None, None, :]  # (b, 1, 1, t + 4)
        for blk in self.blocks:
            x = blk(x, 0, mask, False, None, None)
        return self.out(self.norm(x[:, -1]))

    def _check(self, text: torch.Tensor, text_emb: torch.Tensor) -> None:
        if text.dim() != 2 or text.shape[1] != self.text_len:
            raise ValueError(f"text must be (b, {self.text_len}) ids, got {tuple(text.shape)}")
        if text_emb.shape != (text.shape[0], self.embed_dim):
            raise ValueError(f"text_emb must be ({text.shape[0]}, {self.embed_dim}), got {tuple(text_emb.shape)}")

    def loss(
        self,
        text: torch.Tensor,
        text_emb: torch.Tensor,
        image_emb: torch.Tensor,
        generator: torch.Generator | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean squared error of the predicted clean embedding (scaled), and the cosine of the prediction to the
        target (detached). keep (b,): False where the caption is dropped (None: all kept)."""
        self._check(text, text_emb)
        b, device = text.shape[0], text.device
        x0 = image_emb.float() * self.scale
        if keep is None:
            keep = torch.ones(b, dtype=torch.bool, device=device)
        if self.cfg.kind == "regression":
            level = torch.full((b,), self.cfg.timesteps - 1, device=device)
            x_t = torch.zeros_like(x0)
        else:
            gen_device = generator.device if generator is not None else device
            level = torch.randint(self.cfg.timesteps, (b,), generator=generator, device=gen_device).to(device)
            noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device)
            ab = self.alpha_bar[level][:, None]
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = self(text, text_emb.float(), x_t, level, keep)
        loss = F.mse_loss(pred.float(), x0)
        cos = F.cosine_similarity(pred.detach().float(), x0, dim=-1).mean()
        return loss, {"cosine": cos}

    def _x0(self, text, text_emb, x_t, level, guidance_scale: float) -> torch.Tensor:
        b = text.shape[0]
        keep = torch.ones(b, dtype=torch.bool, device=text.device)
        if guidance_scale == 1.0:
            return self(text, text_emb, x_t, level, keep)
        both = self(
            torch.cat([text, text]),
            torch.cat([text_emb, text_emb]),
            torch.cat([x_t, x_t]),
            torch.cat([level, level]),
            torch.cat([keep, ~keep]),
        )
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.inference_mode()
    def sample(
        self,
        text: torch.Tensor,
        text_emb: torch.Tensor,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Unit image embeddings (b, e) for caption ids (b, t) and their CLIP text embeddings (b, e): DDIM over
        `steps` levels (None: the config's sample_steps) from N(0, I) drawn from `generator`; one forward pass
        for a regression prior. guidance_scale: classifier-free guidance on the caption (1: off)."""
        self._check(text, text_emb)
        steps = self.cfg.sample_steps if steps is None else steps
        scale = guidance_scale
        if not 1 <= steps <= self.cfg.timesteps:
            raise ValueError(f"steps must lie in 1 .. {self.cfg.timesteps}, got {steps}")
        was_training = self.training
        self.eval()
        try:
            b, device = text.shape[0], text.device
            text_emb = text_emb.to(self.out.weight.dtype)
            if self.cfg.kind == "regression":
                x_t = text_emb.new_zeros(b, self.embed_dim)
                x0 = self._x0(text, text_emb, x_t, torch.full((b,), self.cfg.timesteps - 1, device=device), scale)
                return F.normalize(x0.float(), dim=-1)
            gen_device = generator.device if generator is not None else device
            x = torch.randn(b, self.embed_dim, generator=generator, device=gen_device).to(device, text_emb.dtype)
            levels = torch.linspace(self.cfg.timesteps - 1, 0, steps).round().long().tolist()
            for i, level in enumerate(levels):
                x0 = self._x0(text, text_emb, x, torch.full((b,), level, device=device), scale)
                if i + 1 == len(levels):
                    break
                ab, ab_next = self.alpha_bar[level], self.alpha_bar[levels[i + 1]]
                eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
                x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
            return F.normalize(x0.float(), dim=-1)
        finally:
            self.train(was_training)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of unit vectors a, b (..., e) at t in [0, 1] (0: a, 1: b); unit vectors out."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    t = torch.as_tensor(t, dtype=a.dtype)
    if t.dim() == 1:  # one t per output row
        t = t[:, None]
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = omega.sin()
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so
    return F.normalize(out, dim=-1)


__all__ = ["KINDS", "EmbeddingPrior", "check_prior_config", "cosine_alpha_bar", "level_features", "slerp"]
