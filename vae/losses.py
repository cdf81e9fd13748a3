"""Reconstruction, prior and adversarial losses of the image tokenizers, as plain functions.

Used by `vae.dvae` and `vae.vq`. The logit-Laplace likelihood and its pixel mapping are DALL-E's
(Ramesh et al. 2021, section A.3): pixels are squeezed into [eps, 1 - eps] so that their logits stay
finite, and the decoder predicts, per channel, a location `mu` (in logit space) and a log-scale `ln b`.
The hinge losses are those of the VQGAN discriminator (Esser et al. 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RECON_LOSSES = ("mse", "l1", "logit_laplace")
LOGIT_LAPLACE_EPS = 0.1


def decoder_channels(recon_loss: str) -> int:
    """Channels the decoder must output: 6 (mu and ln b) for logit-Laplace, else 3 pixels."""
    return 6 if recon_loss == "logit_laplace" else 3


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps] (DALL-E's pixel mapping for the logit-Laplace likelihood)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def pixels_from_stats(stats: torch.Tensor, recon_loss: str) -> torch.Tensor:
    """Decoder output (b, 3 or 6, H, W) -> reconstructed images (b, 3, H, W), not yet clamped."""
    if recon_loss == "logit_laplace":
        eps = LOGIT_LAPLACE_EPS
        # the decoder's mean lives in logit space; undo the mapping without clamping (callers clamp)
        return (torch.sigmoid(stats[:, :3]) - eps) / (1 - 2 * eps)
    # mse / l1 decoders work in [-1, 1], like the encoder's input
    return stats * 0.5 + 0.5


def clamp_straight_through(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] forward, identity backward: a guidance loss still moves saturated pixels."""
    return x.clamp(0, 1) + (x - x.detach())


def logit_laplace_nll(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood (nats per pixel channel) of images x in [0, 1] under the decoder's stats.

    NLL = ln(2b) + ln(x'(1 - x')) + |logit(x') - mu| / b with x' = map_pixels(x). The ln(x'(1 - x'))
    term does not depend on the model; it is kept so that the value is a true density.
    """
    mu, log_b = stats[:, :3], stats[:, 3:]
    xm = map_pixels(x)
    nll = math.log(2.0) + log_b + torch.log(xm * (1 - xm)) + (torch.logit(xm) - mu).abs() * torch.exp(-log_b)
    return nll.mean()


def reconstruction_loss(x: torch.Tensor, stats: torch.Tensor, recon_loss: str) -> torch.Tensor:
    """The configured reconstruction loss between images x (b, 3, H, W) in [0, 1] and decoder output."""
    if recon_loss == "logit_laplace":
        return logit_laplace_nll(x, stats)
    recon = pixels_from_stats(stats, recon_loss)
    if recon_loss == "l1":
        return F.l1_loss(recon, x)
    return F.mse_loss(recon, x)


def kl_to_uniform(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform) from q and log q (b, k, h, w), over the code axis, averaged over cells (nats per cell)."""
    return (probs * log_probs).sum(dim=1).mean() + math.log(probs.shape[1])


def batch_kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """KL(q averaged over the batch and grid || uniform) for q (b, k, h, w) (nats).

    Zero when the codes are used equally often on average, however peaked each cell's own q is: the
    diversity term of wav2vec 2.0 (Baevski et al. 2020), which counters codebook collapse directly.
    """
    q = probs.mean(dim=(0, 2, 3))  # (k,)
    return (q * q.clamp_min(1e-12).log()).sum() + math.log(q.shape[0])


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: push real patches above +1 and reconstructed ones below -1."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: raise the critic's score of its reconstructions."""
    return -fake_logits.mean()
