"""A VQGAN-style vector-quantised tokenizer with a factorised, l2-normalised codebook lookup.

The encoder and decoder are the dVAE's ResNets (`vae.nets`). Between them the quantiser follows
"Vector-quantized Image Modeling with Improved VQGAN" (Yu et al. 2022, ViT-VQGAN section 3.2): the
encoder's `code_dim` features are projected to a low-dimensional `lookup_dim` space and l2-normalised,
the nearest of `codebook_size` l2-normalised codes is chosen by cosine similarity, gradients pass it
straight through (van den Oord et al. 2017), and a projection maps the code back up to `code_dim` for
the decoder. Low-dimensional unit codes are what keeps usage high; two more measures help:
- the codebook moves by an exponential moving average of the latents assigned to each code
  (`ema=True`, Razavi et al. 2019, Laplace-smoothed) or by the codebook loss (`ema=False`);
- a code unused for `dead_code_steps` steps restarts at a random latent of the current batch plus a
  little noise (Dhariwal et al. 2020, Jukebox), so the codebook keeps up with the encoder.
An optional PatchGAN critic with hinge loss (Esser et al. 2021, VQGAN) switches on at `disc_start`; its
term is weighted as VQGAN weights it, by `disc_weight` times the ratio of the reconstruction loss's gradient
norm to its own at the decoder's last layer (`adversarial_balance`), so that it never swamps reconstruction.
No pretrained perceptual network is used: the package stands alone.

    model = VQ(codebook_size=512, factor=4, lookup_dim=8, disc_start=2000)
    loss, metrics = model(images, step)                                        # generator step
    d_loss, d_metrics = model(images, step, reconstruction=metrics["reconstruction"])  # critic step

Under DDP the EMA statistics and restarts are all-reduced / broadcast from rank 0, so every rank holds
the same codebook; the codebook is only ever written under no_grad before this step's lookup reads it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import ImageTokenizer, VAEError
from .losses import (
    clamp_straight_through,
    decoder_channels,
    hinge_discriminator_loss,
    hinge_generator_loss,
    pixels_from_stats,
    reconstruction_loss,
)
from .metrics import psnr
from .nets import Decoder, Encoder, PatchDiscriminator

ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4  # VQGAN's calculate_adaptive_weight
CRITIC_PREFIX = "discriminator."  # the patch critic's state-dict names (`VQ.discriminator`): read by training alone
RESTART_NOISE = 0.01  # std of the noise added to a restarted code, relative to its unit length
LAPLACE_EPS = 1e-5


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# code_weights' softmax over cosine similarities in [-1, 1]: at 0.1 a code 0.1 nearer weighs e times more
CODE_WEIGHT_TEMPERATURE = 0.1


class CosineCodebook(nn.Module):
    """`codebook_size` unit vectors of width `dim`; nearest-code lookup by cosine; EMA and restarts.

    Buffers: `unused_steps` (k,) counts the training steps since each code was last chosen; it starts
    at `dead_code_steps`, so on the first training step every unused code restarts from the data
    (a data-dependent init). With `ema` the codes are a buffer driven by `cluster_size` and `embed_sum`.
    """

    def __init__(self, codebook_size: int, dim: int, ema: bool, ema_decay: float, dead_code_steps: int):
        super().__init__()
        self.ema = ema
        self.ema_decay = ema_decay
        self.dead_code_steps = dead_code_steps
        codes = F.normalize(torch.randn(codebook_size, dim), dim=-1)  # (k, l)
        if ema:
            self.register_buffer("embed", codes)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", codes.clone())
        else:
            self.embed = nn.Parameter(codes)
        self.register_buffer("unused_steps", torch.full((codebook_size,), max(dead_code_steps, 0)))

    @property
    def codebook_size(self) -> int:
        return self.embed.shape[0]

    def codes(self) -> torch.Tensor:
        """The unit codes (k, l); differentiable w.r.t. the codebook parameter when not EMA."""
        return F.normalize(self.embed, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Unit latents (m, l) -> ids (m,) of the most similar codes."""
        return (z @ self.codes().detach().t()).argmax(dim=-1)

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One training step's bookkeeping on unit latents (m, l) and their ids (m,): EMA move, then
        restarts of dead codes. Returns the number of codes restarted (0-dim tensor; no host sync)."""
        k = self.codebook_size
        z = z.float()  # under bf16 autocast the latents are bf16, whose counts and sums round (4188 codes as 4192)
        counts = torch.bincount(ids, minlength=k).to(z.dtype)  # (k,)
        sums = torch.zeros(k, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, ids, z)  # (k, l)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        if self.ema:
            self.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.embed_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + LAPLACE_EPS) / (n + k * LAPLACE_EPS) * n
            self.embed.copy_(F.normalize(self.embed_sum / smoothed[:, None], dim=-1))
        self.unused_steps.copy_(torch.where(counts > 0, 0, self.unused_steps + 1))
        if self.dead_code_steps <= 0:
            return torch.zeros((), dtype=torch.long, device=z.device)
        dead = self.unused_steps >= self.dead_code_steps  # (k,)
        # candidates for every code, used only where dead: a torch.where instead of a branch on
        # dead.any() keeps the step free of host syncs and identical in control flow on every rank
        picks = torch.randint(0, z.shape[0], (k,), device=z.device)
        fresh = F.normalize(z[picks] + RESTART_NOISE * torch.randn_like(z[picks]), dim=-1)  # (k, l)
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.embed.copy_(torch.where(dead[:, None], fresh, self.embed))
        if self.ema:
            self.embed_sum.copy_(torch.where(dead[:, None], fresh, self.embed_sum))
            self.cluster_size.copy_(torch.where(dead, 1.0, self.cluster_size))
        self.unused_steps.masked_fill_(dead, 0)
        return dead.sum()


class VQ(ImageTokenizer):
    """VQGAN-style tokenizer. The free latent is the unit vector (b, lookup_dim, h, w) before the lookup."""

    kind = "vq"

    def __init__(
        self,
        codebook_size: int = 512,
        factor: int = 4,
        hidden: int = 64,
        res_blocks: int = 1,
        code_dim: int = 256,
        recon_loss: str = "mse",
        lookup_dim: int = 8,
        ema: bool = True,
        ema_decay: float = 0.95,
        commitment_weight: float = 0.25,
        dead_code_steps: int = 50,
        disc_start: int = -1,
        disc_weight: float = 0.1,
    ):
        super().__init__(codebook_size, factor, hidden, res_blocks, code_dim, recon_loss)
        if not isinstance(lookup_dim, int) or lookup_dim < 1:
            raise VAEError(f"lookup_dim must be an integer >= 1, got {lookup_dim!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise VAEError(f"ema_decay must lie in [0, 1), got {ema_decay!r}")
        self.kwargs = dict(
            codebook_size=codebook_size,
            factor=factor,
            hidden=hidden,
            res_blocks=res_blocks,
            code_dim=code_dim,
            recon_loss=recon_loss,
            lookup_dim=lookup_dim,
            ema=bool(ema),
            ema_decay=float(ema_decay),
            commitment_weight=float(commitment_weight),
            dead_code_steps=int(dead_code_steps),
            disc_start=int(disc_start),
            disc_weight=float(disc_weight),
        )
        self.commitment_weight = float(commitment_weight)
        self.disc_start = int(disc_start)
        self.disc_weight = float(disc_weight)
        self.encoder = Encoder(code_dim, factor, hidden, res_blocks)
        self.to_lookup = nn.Conv2d(code_dim, lookup_dim, 1)
        self.quantizer = CosineCodebook(codebook_size, lookup_dim, bool(ema), float(ema_decay), int(dead_code_steps))
        self.from_lookup = nn.Conv2d(lookup_dim, code_dim, 1)
        self.decoder = Decoder(code_dim, decoder_channels(recon_loss), factor, hidden, res_blocks)
        self.discriminator = PatchDiscriminator(hidden) if self.disc_start >= 0 else None

    # -- continuous side ---------------------------------------------------------------------------

    def free_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] -> unit latents (b, lookup_dim, h, w) in the lookup space."""
        return F.normalize(self.to_lookup(self.encoder(images * 2 - 1)), dim=1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w) -> unit codes (b, lookup_dim, h, w); differentiable w.r.t. a learnt codebook."""
        return rearrange(F.embedding(ids, self.quantizer.codes()), "b h w l -> b l h w")

    def snap(self, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (b, l, h, w) -> (nearest unit codes, straight-through to the normalised latents; ids)."""
        z = F.normalize(free, dim=1)
        ids = rearrange(
            self.quantizer.nearest(rearrange(z.detach(), "b l h w -> (b h w) l")),
            "(b h w) -> b h w",
            b=z.shape[0],
            h=z.shape[2],
        )
        return self.lookup(ids).detach() + (z - z.detach()), ids

    def code_weights(self, free: torch.Tensor) -> torch.Tensor:
        """Latents (b, l, h, w) -> one-hot of the nearest code (b, K, h, w), straight-through to a softmax over
        the cosine similarities to the codes at temperature CODE_WEIGHT_TEMPERATURE."""
        z = F.normalize(free, dim=1)
        sims = torch.einsum("blhw,kl->bkhw", z, self.quantizer.codes().detach())
        probs = (sims / CODE_WEIGHT_TEMPERATURE).softmax(dim=1)
        hard = torch.zeros_like(probs).scatter_(1, sims.detach().argmax(dim=1, keepdim=True), 1.0)
        return hard + (probs - probs.detach())

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w) -> unit codes (b, lookup_dim, h, w), the decoder's input."""
        return self.lookup(ids)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Lookup-space latents (b, l, h, w) -> images (b, 3, H, W) in [0, 1] (straight-through clamp)."""
        return clamp_straight_through(pixels_from_stats(self.decoder(self.from_lookup(latent)), self.recon_loss))

    # -- training ----------------------------------------------------------------------------------

    def generator_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the discriminator's: what the main optimiser should hold."""
        return [p for name, p in self.named_parameters() if not name.startswith(CRITIC_PREFIX)]

    def adversarial_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def adversarial_balance(self, recon: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        """VQGAN's adaptive weight of the GAN term (Esser et al. 2021, eq. 7): |grad recon| / (|grad adversarial| +
        1e-4) at the decoder's last layer, clamped to [0, 1e4], detached. A fixed weight is in the units of the
        reconstruction loss, which here is a mean squared error of about 0.003, so the hinge term (about 1) took over
        at any weight one would guess: 0.1 on emoji-styles fell from 25 to 10.8 dB on validation (docs/RESULTS.md,
        "the VQ's critic weighted as VQGAN weights it"). 0 where no gradient is taken (evaluation, as VQGAN); 1 where
        the decoder's last layer is frozen."""
        last = self.decoder.layers[-1].weight
        if not torch.is_grad_enabled() or not recon.requires_grad:
            return recon.new_zeros(())
        if not last.requires_grad:
            return recon.new_ones(())
        (recon_grad,) = torch.autograd.grad(recon, last, retain_graph=True)
        (adversarial_grad,) = torch.autograd.grad(adversarial, last, retain_graph=True)
        ratio = recon_grad.float().norm() / (adversarial_grad.float().norm() + ADAPTIVE_EPS)
        return ratio.clamp(0, ADAPTIVE_MAX).detach()

    def training_step_loss(
        self, images: torch.Tensor, step: int = 0, **schedule_values: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction + commitment (+ codebook loss without EMA, + hinge GAN loss after disc_start, weighted by
        disc_weight times `adversarial_balance`).

        In training mode it also moves the codebook (EMA) and restarts dead codes. Schedule values (the
        dVAE's temperature and kl_weight) are accepted and ignored so that both tokenizers share one call.
        The discriminator's parameters get gradients from the GAN term: keep them out of the main optimiser
        (`generator_parameters`) and zero their grads before the critic's own backward.
        Metrics (detached): loss, recon, commitment, [codebook], [adversarial, adversarial_weight], psnr, restarted; ids
        (b, h, w) and reconstruction (b, 3, H, W) in [0, 1].
        """
        x = self.check_images(images)
        z = self.free_latent(x)  # (b, l, h, w)
        b, _, h, w = z.shape
        z_flat = rearrange(z, "b l h w -> (b h w) l")
        with torch.no_grad():
            ids_flat = self.quantizer.nearest(z_flat)
            restarted = torch.zeros((), dtype=torch.long, device=z.device)
            if self.training:
                restarted = self.quantizer.update(z_flat, ids_flat)
        ids = rearrange(ids_flat, "(b h w) -> b h w", b=b, h=h, w=w)
        z_q = self.lookup(ids)  # (b, l, h, w)
        commitment = F.mse_loss(z, z_q.detach())
        stats = self.decoder(self.from_lookup(z_q.detach() + (z - z.detach())))  # (b, 3 or 6, H, W)
        recon = reconstruction_loss(x, stats, self.recon_loss)
        loss = recon + self.commitment_weight * commitment
        metrics: dict[str, torch.Tensor] = {"recon": recon.detach(), "commitment": commitment.detach()}
        if not self.quantizer.ema:
            codebook = F.mse_loss(z_q, z.detach())
            loss = loss + codebook
            metrics["codebook"] = codebook.detach()
        pixels = pixels_from_stats(stats, self.recon_loss)
        if self.adversarial_active(step):
            adversarial = hinge_generator_loss(self.discriminator(pixels * 2 - 1))
            weight = self.disc_weight * self.adversarial_balance(recon, adversarial)
            loss = loss + weight * adversarial
            metrics.update(adversarial=adversarial.detach(), adversarial_weight=weight)
        with torch.no_grad():
            pixels = pixels.clamp(0, 1)
            metrics.update(
                loss=loss.detach(), psnr=psnr(pixels, x), restarted=restarted, ids=ids, reconstruction=pixels
            )
        return loss, metrics

    def discriminator_loss(
        self, images: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The critic's hinge loss on real images and (detached) reconstructions, both in [0, 1]."""
        if self.discriminator is None:
            raise VAEError("this VQ tokenizer has no discriminator; build it with disc_start >= 0")
        real = self.discriminator(self.check_images(images) * 2 - 1)
        fake = self.discriminator(reconstruction.detach() * 2 - 1)
        loss = hinge_discriminator_loss(real, fake)
        metrics = {
            "disc_loss": loss.detach(),
            "disc_real": real.detach().mean(),
            "disc_fake": fake.detach().mean(),
        }
        return loss, metrics

    def forward(
        self,
        images: torch.Tensor,
        step: int = 0,
        reconstruction: torch.Tensor | None = None,
        **schedule_values: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's loss; with `reconstruction` given, the critic's loss instead (one forward
        entry point, so that a DDP wrapper sees both passes)."""
        if reconstruction is not None:
            return self.discriminator_loss(images, reconstruction)
        return self.training_step_loss(images, step, **schedule_values)
