"""DALL-E's discrete VAE: a ResNet encoder's logits over K codes per cell, Gumbel-softmax relaxed in training.

Follows Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation" (section 2.1, appendix A): the encoder
gives logits over `codebook_size` codes for each cell of an (H / factor) x (W / factor) grid; in
training the decoder reads a Gumbel-softmax sample of those logits (temperature annealed towards
1/16, `vae.schedules`) mixed into codebook vectors, and the loss is the reconstruction loss plus a
weighted KL of softmax(logits) to the uniform prior (nats per cell, the mean over cells: with an
MSE reconstruction a weight near 1e-4 barely acts). Encoding takes the argmax (no noise); decoding
reads the codebook vector of each id, i.e. the one-hot end of the relaxation. With
`straight_through=True` training uses the hard one-hot sample forward and the relaxed gradient backward
(Jang et al. 2017), which closes the gap between training and decoding at the cost of noisier gradients.

Two additions keep the codebook in use over a short run (DALL-E trained for 3M steps; here 3000):
- the logit head starts with a wide spread (`LOGIT_INIT_GAIN`), so content, not Gumbel noise, picks
  the codes from the first step;
- `diversity_weight` weighs the KL of the batch-averaged softmax to uniform (wav2vec 2.0's diversity
  loss), which pulls rarely used codes back in without flattening any one cell's distribution.

    model = DiscreteVAE(codebook_size=512, factor=4, hidden=64, res_blocks=1, code_dim=256)
    loss, metrics = model(images, step, temperature=0.5, kl_weight=1e-4)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import ImageTokenizer
from .losses import (
    batch_kl_to_uniform,
    clamp_straight_through,
    decoder_channels,
    kl_to_uniform,
    pixels_from_stats,
    reconstruction_loss,
)
from .metrics import psnr
from .nets import Decoder, Encoder

LOGIT_INIT_GAIN = 8.0  # the logit head's init std, in units of 1 / sqrt(fan_in)


def gumbel_noise_like(logits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of the shape, dtype and device of `logits`.

    On CPU torch's exponential_ sampler (the one F.gumbel_softmax uses) costs ~30 ms for a 32 x 512 x 8 x 8
    batch, a fifth of a training step; numpy's PCG64 is ~6x faster. Its seed is drawn from torch's generator,
    so torch.manual_seed still makes training reproducible.
    """
    if logits.device.type != "cpu":
        return torch.empty_like(logits).exponential_().log_().neg_()
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
    u = torch.from_numpy(rng.random(tuple(logits.shape), dtype=np.float32))
    return u.clamp_(min=1e-20).log_().neg_().log_().neg_().to(logits.dtype)  # -log(-log u), in place


def best_codes(weights: torch.Tensor) -> torch.Tensor:
    """Ids (b, h, w) of the largest entry over codes of (b, k, h, w): argmax's ids (the first of ties).

    `max(dim=1).indices` rather than `argmax(dim=1)`: on CPU it takes half the time over the code
    dimension (10 vs 25 ms for a 32 x 1024 x 16 x 16 batch).
    """
    return weights.max(dim=1).indices


def one_hot_like(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One-hot (b, k, h, w) of ids (b, h, w), with the dtype and device of `weights`."""
    return torch.zeros_like(weights).scatter_(1, ids.unsqueeze(1), 1.0)


class DiscreteVAE(ImageTokenizer):
    """Gumbel-softmax discrete VAE (DALL-E). The free latent is the logits (b, codebook_size, h, w)."""

    kind = "dvae"

    def __init__(
        self,
        codebook_size: int = 512,
        factor: int = 4,
        hidden: int = 64,
        res_blocks: int = 1,
        code_dim: int = 256,
        recon_loss: str = "mse",
        straight_through: bool = False,
        diversity_weight: float = 0.01,
    ):
        super().__init__(codebook_size, factor, hidden, res_blocks, code_dim, recon_loss)
        self.kwargs = dict(
            codebook_size=codebook_size,
            factor=factor,
            hidden=hidden,
            res_blocks=res_blocks,
            code_dim=code_dim,
            recon_loss=recon_loss,
            straight_through=bool(straight_through),
            diversity_weight=float(diversity_weight),
        )
        self.diversity_weight = float(diversity_weight)
        self.straight_through = bool(straight_through)
        self.encoder = Encoder(codebook_size, factor, hidden, res_blocks)
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.decoder = Decoder(code_dim, decoder_channels(recon_loss), factor, hidden, res_blocks)
        # a wide logit spread at init (std ~5 nats, against the Gumbel noise's 1.3): cells then pick codes
        # by their content from the first step, spread over the whole codebook like a random hash, and
        # information reaches the decoder at once. With PyTorch's default init the logits start near-flat,
        # the noise decides every sample, and on shapes the codebook collapses to a few codes (10% usage
        # after 300 steps, against 80-90% with this init, at equal or better PSNR).
        fan_in = self.encoder.head.weight.shape[1]
        nn.init.normal_(self.encoder.head.weight, std=LOGIT_INIT_GAIN / math.sqrt(fan_in))
        nn.init.zeros_(self.encoder.head.bias)

    # -- continuous side ---------------------------------------------------------------------------

    def free_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] -> logits over codes (b, k, h, w)."""
        return self.encoder(images * 2 - 1)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights over codes (b, k, h, w) -> the weighted sum of codebook vectors (b, d, h, w)."""
        # einsum("b k h w, k d -> b d h w") computed as a 1x1 convolution, which reads the (b, k, h, w)
        # layout directly: the einsum's permute copies cost ~7% of a CPU training step
        return F.conv2d(weights, rearrange(self.codebook.weight, "k d -> d k 1 1"))

    def soft_latent(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Logits (b, k, h, w) -> the softmax(logits / temperature) mixture of codebook vectors (b, d, h, w)."""
        return self.mix(F.softmax(logits / temperature, dim=1))

    def snap(self, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (b, k, h, w) -> (codebook vector of the argmax, straight-through to the softmax; ids)."""
        probs = F.softmax(free, dim=1)
        ids = best_codes(free)  # (b, h, w)
        hard = one_hot_like(probs, ids)
        return self.mix(hard + (probs - probs.detach())), ids

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w) -> codebook vectors (b, d, h, w): the one-hot end of the relaxation."""
        return rearrange(self.codebook(ids), "b h w d -> b d h w")

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Codebook mixtures (b, d, h, w) -> images (b, 3, H, W) in [0, 1] (straight-through clamp)."""
        return clamp_straight_through(pixels_from_stats(self.decoder(latent), self.recon_loss))

    # -- training ----------------------------------------------------------------------------------

    def relaxed_one_hot(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """A Gumbel-softmax sample (b, k, h, w) of the logits; hard one-hot forward if straight-through."""
        # (logits + g) / temperature as one fused op on the (b, k, h, w) tensor
        noise = gumbel_noise_like(logits).mul_(1 / temperature)
        soft = F.softmax(torch.add(noise, logits, alpha=1 / temperature), dim=1)
        if not self.straight_through:
            return soft
        return one_hot_like(soft, best_codes(soft)) + (soft - soft.detach())

    def training_step_loss(
        self, images: torch.Tensor, step: int = 0, *, temperature: float = 1.0, kl_weight: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction loss of a Gumbel-softmax sample + kl_weight * KL + diversity_weight * diversity.

        KL is DALL-E's KL(softmax(logits) || uniform) per cell; diversity is the KL of the batch-averaged
        softmax to uniform (`vae.losses.batch_kl_to_uniform`).
        `temperature` and `kl_weight` come from `vae.schedules.values_at(step, ...)`; `step` itself is
        unused here (kept so both tokenizers share one call). Metrics are detached: loss, recon, kl,
        diversity, kl_weight, temperature, psnr (of this step's relaxed reconstruction); and two non-scalars: ids
        (b, h, w), the argmax codes for usage tracking, and reconstruction (b, 3, H, W) in [0, 1].
        """
        x = self.check_images(images)
        logits = self.free_latent(x)  # (b, k, h, w)
        stats = self.decoder(self.mix(self.relaxed_one_hot(logits, temperature)))  # (b, 3 or 6, H, W)
        recon = reconstruction_loss(x, stats, self.recon_loss)
        log_probs = F.log_softmax(logits, dim=1)
        probs = log_probs.exp()
        kl = kl_to_uniform(probs, log_probs)
        diversity = batch_kl_to_uniform(probs)
        loss = recon + kl_weight * kl + self.diversity_weight * diversity
        with torch.no_grad():
            pixels = pixels_from_stats(stats, self.recon_loss).clamp(0, 1)
            metrics = {
                "loss": loss.detach(),
                "recon": recon.detach(),
                "kl": kl.detach(),
                "diversity": diversity.detach(),
                "kl_weight": torch.tensor(float(kl_weight)),
                "temperature": torch.tensor(float(temperature)),
                "psnr": psnr(pixels, x),
                "ids": best_codes(logits),
                "reconstruction": pixels,
            }
        return loss, metrics
