"""The one interface every image tokenizer in `vae` offers, and the package's error type.

    ids = tokenizer.encode(images)        # (b, 3, H, W) floats in [0, 1] -> (b, h, w) int64 codes
    images = tokenizer.decode(ids)        # (b, h, w) or (b, n) -> (b, 3, H, W) floats in [0, 1]
    loss, metrics = tokenizer(images, step, **schedule_values)   # one training step's loss

For guidance by a differentiable score (CLIP-guided generation), every tokenizer also exposes its
continuous side: `free_latent(images)` is what the encoder produces before the discrete choice,
`snap(free)` turns such a tensor into the quantised decoder input with straight-through gradients
(plus the chosen ids), `embed_ids(ids)` is the decoder input of given codes, and `decode_latent(latent)`
renders a decoder input differentiably. `encode(x)` equals `snap(free_latent(x))[1]`.

The shape of this interface (ids in, [0, 1] images out, the same range for every kind) follows the
lesson of DALLE-pytorch, whose tokenizers disagree on output ranges.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import nn

from .losses import RECON_LOSSES


class VAEError(ValueError):
    """A problem a user can cause (bad hyper-parameter, wrong input, missing or corrupt file)."""


class ImageTokenizer(nn.Module, metaclass=abc.ABCMeta):
    """Abstract base: a discrete autoencoder from images to a grid of codebook ids and back.

    Subclasses set `kind` and `self.kwargs` (the constructor arguments, enough to rebuild the model).
    Calling the module runs `training_step_loss`, so DDP / accelerate wrappers see a forward pass.
    """

    kind: str = ""

    def __init__(self, codebook_size: int, factor: int, hidden: int, res_blocks: int, code_dim: int, recon_loss: str):
        super().__init__()
        check_hyperparameters(codebook_size, factor, hidden, res_blocks, code_dim, recon_loss)
        self.num_codes = codebook_size
        self.group_sizes: tuple[int, ...] = (codebook_size,)  # product codes (`vae.product`): the dVAE's option
        self.factor = factor
        self.recon_loss = recon_loss
        self.kwargs: dict[str, Any] = {}

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return self.num_codes

    @property
    def groups(self) -> int:
        """How many codes make one id (1 unless the tokenizer uses product codes)."""
        return len(self.group_sizes)

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """The (h, w) grid of codes for images of side `image_size` (or (H, W))."""
        size_h, size_w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if size_h % self.factor or size_w % self.factor:
            raise VAEError(
                f"image size {size_h}x{size_w} is not a multiple of the tokenizer's factor {self.factor}; "
                "resize the images or use a tokenizer with a smaller factor"
            )
        return size_h // self.factor, size_w // self.factor

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images must be floats (b, 3, H, W) with H and W multiples of the factor."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise VAEError(
                f"images must be a float tensor (batch, 3, height, width) in [0, 1], got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        self.grid((images.shape[2], images.shape[3]))
        return images

    def check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w), or (b, n) with n a square, in [0, codebook_size) -> (b, h, w)."""
        if ids.is_floating_point() or ids.ndim not in (2, 3):
            raise VAEError(
                f"ids must be an integer tensor (batch, h, w) or (batch, n), got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.ndim == 2:
            side = math.isqrt(ids.shape[1])
            if side * side != ids.shape[1]:
                raise VAEError(f"{ids.shape[1]} ids per image do not form a square grid; pass them as (batch, h, w)")
            ids = ids.reshape(ids.shape[0], side, side)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise VAEError(
                f"ids must lie in [0, {self.codebook_size}), got values from {int(ids.min())} to {int(ids.max())}; "
                "image ids from a transformer must have the text vocabulary offset removed"
            )
        return ids.long()

    # -- the discrete interface ---------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] -> code ids (b, h, w) int64; deterministic."""
        return self.snap(self.free_latent(self.check_images(images)))[1]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids (b, h, w) or (b, n) -> images (b, 3, H, W) float32 in [0, 1]."""
        return self.decode_latent(self.embed_ids(self.check_ids(ids)))

    @torch.no_grad()
    def nearest_codes(self, k: int) -> torch.Tensor:
        """(codebook_size, k) ids: each code's k nearest codes by the Euclidean distance of their decoder inputs
        (`embed_ids`), nearest first and itself first of all; what relaxed speculative decoding groups. Codes
        whose decoder inputs are one-hot (OpenAI's dVAE) are all equally near, so their order is arbitrary."""
        device = next(self.parameters()).device
        vectors = self.embed_ids(torch.arange(self.codebook_size, device=device).view(1, 1, -1))[0, :, 0].T  # (K, d)
        vectors = vectors.float()
        k = min(k, self.codebook_size)
        rows = []
        for start in range(0, self.codebook_size, 1024):  # (1024, K) distances at a time: large codebooks fit
            part = torch.cdist(vectors[start : start + 1024], vectors)
            part[torch.arange(part.shape[0]), torch.arange(start, start + part.shape[0])] = -1.0  # itself first
            rows.append(part.topk(k, dim=-1, largest=False).indices)
        return torch.cat(rows)

    # -- the continuous interface (differentiable) -------------------------------------------------

    @abc.abstractmethod
    def free_latent(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's continuous output before the discrete choice (what `snap` takes)."""

    @abc.abstractmethod
    def snap(self, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A free latent -> (quantised decoder input with straight-through gradients, ids (b, h, w))."""

    @abc.abstractmethod
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (b, h, w) -> the decoder input (b, d, h, w) of those codes."""

    @abc.abstractmethod
    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Decoder input (b, d, h, w) -> images (b, 3, H, W) in [0, 1], differentiable."""

    def code_weights(self, free: torch.Tensor) -> torch.Tensor:
        """A free latent -> the one-hot of each group's snapped code (b, K_1 + .. + K_G, h, w), straight-through
        to a softmax over the codes: what a prior over the codes (the transformer) reads differentiably."""
        raise VAEError(f"{type(self).__name__} gives no code weights; a prior over its codes needs a dVAE or a VQ")

    # -- training ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def training_step_loss(
        self, images: torch.Tensor, step: int = 0, **schedule_values: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's loss on images in [0, 1] and its metrics (0-dim detached tensors, plus `ids`)."""

    def forward(
        self, images: torch.Tensor, step: int = 0, **schedule_values: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.training_step_loss(images, step, **schedule_values)

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments: `vae.build(self.kind, **self.hyperparameters())` rebuilds the model."""
        return dict(self.kwargs)


def check_hyperparameters(
    codebook_size: int, factor: int, hidden: int, res_blocks: int, code_dim: int, recon_loss: str
) -> None:
    """Reject hyper-parameters that cannot build a model, in one sentence each."""
    if not isinstance(factor, int) or factor < 2 or factor & (factor - 1):
        raise VAEError(f"factor must be a power of two such as 4, 8 or 16, got {factor!r}")
    for name, value, low in (("codebook_size", codebook_size, 2), ("hidden", hidden, 4), ("code_dim", code_dim, 1)):
        if not isinstance(value, int) or value < low:
            raise VAEError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(res_blocks, int) or res_blocks < 0:
        raise VAEError(f"res_blocks must be an integer >= 0, got {res_blocks!r}")
    if recon_loss not in RECON_LOSSES:
        raise VAEError(f"recon_loss must be one of {', '.join(RECON_LOSSES)}, got {recon_loss!r}")
