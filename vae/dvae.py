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

With `group_sizes = (K_1, .., K_G)` the code of a cell is a tuple of G choices, one among the K_i
entries of each group, and the decoder reads the sum of the G chosen vectors: wav2vec 2.0's product
Gumbel quantiser (Baevski et al. 2020, two groups of 320). The flat id of the tuple (`vae.product`,
codebook_size = K_1 .. K_G) is what `encode` returns and a transformer models, so every other stage
sees plain ids; a transformer built with the same `image_factors` (`dalle_mini_impl.model.transformer`) embeds
and predicts the factors separately, and can then emit a combination of factors it never saw together
(a color with a shape's edge). Left to itself the product quantiser spreads every kind of content over
all groups; `group_dropout` (nested dropout, `drop_groups`) orders them, the first group carrying what
matters most. `group_inputs` decides the split instead: a group whose encoder reads only the ink map
(`ink_map`, one channel) can code where things are drawn but not in which color, so with ['rgb', 'ink']
the RGB group is left to code the color (the shapes preset: 8 color codes x 64 layout codes, whose
transformer draws held-out color-shape pairs far more often: docs/RESULTS.md, "Codes that split color
from layout").

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

from .base import ImageTokenizer, VAEError
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
from .product import check_group_sizes, id_rows, join_ids, row_offsets, split_ids

LOGIT_INIT_GAIN = 8.0  # the logit head's init std, in units of 1 / sqrt(fan_in)


def gumbel_noise_like(logits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of the shape, dtype and device of `logits`.

    On CPU numpy's PCG64 draws it several times faster than torch's exponential_ sampler (the one
    F.gumbel_softmax uses), which costs a sizeable part of a small dVAE's training step (`python -m
    dalle_mini_impl.bench --only vae` times that step). Its seed is drawn from torch's generator, so
    torch.manual_seed still makes training reproducible.
    """
    if logits.device.type != "cpu":
        return torch.empty_like(logits).exponential_().log_().neg_()
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
    u = torch.from_numpy(rng.random(tuple(logits.shape), dtype=np.float32))
    return u.clamp_(min=1e-20).log_().neg_().log_().neg_().to(logits.dtype)  # -log(-log u), in place


def ink_map(images: torch.Tensor) -> torch.Tensor:
    """Images (b, 3, H, W) in [0, 1] -> their ink, 1 - min(R, G, B), (b, 1, H, W) in [0, 1].

    The strongest of the three inks (cyan, magenta, yellow) a print of the pixel needs: 0 on white, and
    near one value (0.80 to 0.92 on the shapes palette) for every saturated or dark color, with a blend
    towards white (an antialiased edge) scaling it down in proportion. It keeps where things are drawn and
    drops which color they are drawn in, so a group whose encoder reads only the ink map
    (`group_inputs`) codes layout, and a group that reads RGB is left to code the color.
    """
    return 1 - images.amin(dim=1, keepdim=True)


def check_group_inputs(sizes: tuple[int, ...], inputs: list[str] | None) -> tuple[str, ...]:
    """What each group's encoder reads, checked: 'rgb' for every group when none are given."""
    if not inputs:
        return ("rgb",) * len(sizes)
    if len(inputs) != len(sizes) or not set(inputs) <= {"rgb", "ink"} or "rgb" not in inputs:
        raise VAEError(
            f"group_inputs {list(inputs)} must name 'rgb' or 'ink' for each of the {len(sizes)} code groups "
            f"{list(sizes)}, with at least one 'rgb' group to carry the color (e.g. ['rgb', 'ink'] for two groups), "
            "or be [] for 'rgb' in every group"
        )
    return tuple(inputs)


def best_codes(weights: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Per group, the ids (b, g, h, w) of the largest entry of (b, K_1 + .. + K_G, h, w): argmax's (first of ties).

    `max(dim=1).indices` rather than `argmax(dim=1)`: on CPU it is the faster of the two over the code
    dimension.
    """
    return torch.stack([group.max(dim=1).indices for group in weights.split(sizes, dim=1)], dim=1)


def one_hot_like(weights: torch.Tensor, factors: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """One-hot per group (b, K_1 + .. + K_G, h, w) of factors (b, g, h, w), of the dtype and device of `weights`."""
    rows = factors + row_offsets(sizes, factors.device)[:, None, None]
    return torch.zeros_like(weights).scatter_(1, rows, 1.0)


def group_softmax(logits: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Softmax over each group's codes of logits (b, K_1 + .. + K_G, h, w)."""
    if len(sizes) == 1:
        return F.softmax(logits, dim=1)
    return torch.cat([F.softmax(group, dim=1) for group in logits.split(sizes, dim=1)], dim=1)


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
        group_sizes: list[int] | None = None,
        group_dropout: float = 0.0,
        group_inputs: list[str] | None = None,
    ):
        super().__init__(codebook_size, factor, hidden, res_blocks, code_dim, recon_loss)
        self.group_sizes = check_group_sizes(codebook_size, group_sizes)
        if not 0.0 <= group_dropout < 1.0 or (group_dropout and self.groups == 1):
            raise VAEError(f"group_dropout must be in [0, 1) and needs several group_sizes, got {group_dropout!r}")
        self.group_dropout = float(group_dropout)
        self.group_inputs = check_group_inputs(self.group_sizes, group_inputs)
        self.kwargs = dict(
            codebook_size=codebook_size,
            factor=factor,
            hidden=hidden,
            res_blocks=res_blocks,
            code_dim=code_dim,
            recon_loss=recon_loss,
            straight_through=bool(straight_through),
            diversity_weight=float(diversity_weight),
            group_sizes=list(self.group_sizes) if self.groups > 1 else None,
            group_dropout=float(group_dropout),
            group_inputs=list(self.group_inputs) if "ink" in self.group_inputs else None,
        )
        self.diversity_weight = float(diversity_weight)
        self.straight_through = bool(straight_through)
        width = sum(self.group_sizes)  # logits and codebook rows: every group's codes, group after group
        self.encoder = Encoder(sum(self._sizes_of("rgb")), factor, hidden, res_blocks)
        heads = [self.encoder.head]
        if "ink" in self.group_inputs:  # the groups that see only the ink map have their own encoder
            self.ink_encoder = Encoder(sum(self._sizes_of("ink")), factor, hidden, res_blocks, in_channels=1)
            heads.append(self.ink_encoder.head)
        self.codebook = nn.Embedding(width, code_dim)
        self.decoder = Decoder(code_dim, decoder_channels(recon_loss), factor, hidden, res_blocks)
        # a wide logit spread at init (std ~5 nats, against the Gumbel noise's 1.3): cells then pick codes
        # by their content from the first step, spread over the whole codebook like a random hash, and
        # information reaches the decoder at once. With PyTorch's default init the logits start near-flat,
        # the noise decides every sample, and on shapes the codebook collapses to a few codes (codebook
        # usage: `python -m dalle_mini_impl.eval recon`, and the `train.vae` log).
        for head in heads:
            nn.init.normal_(head.weight, std=LOGIT_INIT_GAIN / math.sqrt(head.weight.shape[1]))
            nn.init.zeros_(head.bias)

    def _sizes_of(self, source: str) -> list[int]:
        """The sizes of the groups whose encoder reads `source` ('rgb' or 'ink'), in group order."""
        return [k for k, s in zip(self.group_sizes, self.group_inputs) if s == source]

    # -- continuous side ---------------------------------------------------------------------------

    def free_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] -> logits over each group's codes (b, K_1 + .. + K_G, h, w)."""
        rgb = self.encoder(images * 2 - 1)
        if "ink" not in self.group_inputs:
            return rgb
        from_rgb = iter(rgb.split(self._sizes_of("rgb"), dim=1))
        from_ink = iter(self.ink_encoder(ink_map(images) * 2 - 1).split(self._sizes_of("ink"), dim=1))
        return torch.cat([next(from_rgb if s == "rgb" else from_ink) for s in self.group_inputs], dim=1)

    def flat_ids(self, factors: torch.Tensor) -> torch.Tensor:
        """Factor ids (b, g, h, w) -> flat ids (b, h, w) in [0, codebook_size)."""
        return join_ids(factors.movedim(1, -1), self.group_sizes)

    def factor_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat ids (b, h, w) -> factor ids (b, g, h, w), factor i in [0, group_sizes[i])."""
        return split_ids(ids, self.group_sizes).movedim(-1, 1)

    def one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat ids (b, h, w) -> their one-hot weights per group (b, K_1 + .. + K_G, h, w), float32."""
        b, h, w = ids.shape
        zeros = torch.zeros(b, sum(self.group_sizes), h, w, device=ids.device)
        return one_hot_like(zeros, self.factor_ids(ids), self.group_sizes)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights over codes (b, K_1 + .. + K_G, h, w) -> the weighted sum of codebook vectors (b, d, h, w)."""
        # einsum("b k h w, k d -> b d h w") computed as a 1x1 convolution, which reads the (b, k, h, w)
        # layout directly, without the einsum's permute copies (`python -m dalle_mini_impl.bench --only vae`
        # times the training step)
        return F.conv2d(weights, rearrange(self.codebook.weight, "k d -> d k 1 1"))

    def soft_latent(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Logits (b, K_1 + .. + K_G, h, w) -> the softmax(logits / temperature) mixture of codebook vectors."""
        return self.mix(group_softmax(logits / temperature, self.group_sizes))

    def snap(self, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (b, K_1 + .. + K_G, h, w) -> (codebook vectors of the argmaxes, straight-through; ids)."""
        factors = best_codes(free, self.group_sizes)  # (b, g, h, w)
        return self.mix(self._straight_through(free, factors)), self.flat_ids(factors)

    def code_weights(self, free: torch.Tensor) -> torch.Tensor:
        """Logits (b, K_1 + .. + K_G, h, w) -> one-hot of the argmax per group, straight-through to the softmax."""
        return self._straight_through(free, best_codes(free, self.group_sizes))

    def _straight_through(self, free: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """One-hot per group of `factors` (b, g, h, w) forward, the gradient of the groups' softmax of `free`."""
        probs = group_softmax(free, self.group_sizes)
        return one_hot_like(probs, factors, self.group_sizes) + (probs - probs.detach())

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w) -> codebook vectors (b, d, h, w): the one-hot end of the relaxation."""
        if self.groups == 1:
            return rearrange(self.codebook(ids), "b h w d -> b d h w")
        rows = id_rows(ids, self.group_sizes)  # (b, h, w, g)
        return rearrange(self.codebook(rows).sum(dim=-2), "b h w d -> b d h w")

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Codebook mixtures (b, d, h, w) -> images (b, 3, H, W) in [0, 1] (straight-through clamp)."""
        return clamp_straight_through(pixels_from_stats(self.decoder(latent), self.recon_loss))

    # -- training ----------------------------------------------------------------------------------

    def relaxed_one_hot(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """A Gumbel-softmax sample per group of the logits; hard one-hot forward if straight-through; groups
        dropped per `group_dropout`."""
        # (logits + g) / temperature as one fused op on the (b, k, h, w) tensor
        noise = gumbel_noise_like(logits).mul_(1 / temperature)
        soft = group_softmax(torch.add(noise, logits, alpha=1 / temperature), self.group_sizes)
        if self.straight_through:
            soft = one_hot_like(soft, best_codes(soft, self.group_sizes), self.group_sizes) + (soft - soft.detach())
        if self.group_dropout:
            soft = self.drop_groups(soft)
        return soft

    def drop_groups(self, weights: torch.Tensor) -> torch.Tensor:
        """Nested dropout over the groups (Rippel et al. 2014): per cell, with probability `group_dropout`,
        the groups after a uniformly drawn first one are zeroed, so the decoder must draw the cell from
        its first groups alone, and the groups come to play different parts (which parts is left to
        training: dropout alone does not make one group hold color and another shape; `group_inputs` does).
        """
        b, _, h, w = weights.shape
        g = self.groups
        drop = torch.rand(b, 1, h, w, device=weights.device) < self.group_dropout
        keep = torch.randint(1, g, (b, 1, h, w), device=weights.device)  # groups kept where dropped
        kept = torch.where(drop, keep, g)  # (b, 1, h, w)
        sizes = torch.tensor(self.group_sizes, device=weights.device)
        group = torch.arange(g, device=weights.device).repeat_interleave(sizes)[None, :, None, None]
        return weights * (group < kept).to(weights.dtype)

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
        # (b, K_1 + .. + K_G, h, w), in float32: CPU autocast leaves softmax in bf16, where the Gumbel-softmax, KL
        # and diversity terms were rounded to 3 significant digits (a no-op in a float32 run)
        logits = self.free_latent(x).float()
        stats = self.decoder(self.mix(self.relaxed_one_hot(logits, temperature)))  # (b, 3 or 6, H, W)
        recon = reconstruction_loss(x, stats, self.recon_loss)
        kl = diversity = 0.0
        for group in logits.split(self.group_sizes, dim=1):  # KL of the product distribution: the groups' sum
            log_probs = F.log_softmax(group, dim=1)
            probs = log_probs.exp()
            kl = kl + kl_to_uniform(probs, log_probs)
            diversity = diversity + batch_kl_to_uniform(probs)
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
                "ids": self.flat_ids(best_codes(logits, self.group_sizes)),
                "reconstruction": pixels,
            }
        return loss, metrics
