"""What every imported tokenizer shares: the interface without a training step."""

from __future__ import annotations

import torch

from ..base import ImageTokenizer, VAEError


class ImportedTokenizer(ImageTokenizer):
    """A tokenizer whose weights come from elsewhere (`vae.convert`): it encodes and decodes, never trains."""

    def code_weights(self, free: torch.Tensor) -> torch.Tensor:
        raise VAEError(
            f"the {self.kind} tokenizer picks the nearest code and gives no code weights; guidance through the "
            "prior needs a tokenizer with code logits (dvae, vq, openai_dvae or a Gumbel taming_vqgan)"
        )

    def training_step_loss(
        self, images: torch.Tensor, step: int = 0, **schedule_values: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise VAEError(
            f"the {self.kind} tokenizer is imported and frozen here; train a 'dvae' or 'vq' tokenizer instead"
        )
