"""The field's pretrained image tokenizers, rewritten here, behind this package's tokenizer interface.

Each file holds one architecture with the original's parameter names, so a converted checkpoint
(`python -m vae.convert`, see `vae.convert`) loads with `vae.load_pretrained` like any tokenizer
trained here:
- `openai`: OpenAI's DALL-E dVAE (Ramesh et al. 2021), kind "openai_dvae";
- `taming`: taming-transformers' VQGAN and Gumbel VQGAN (Esser et al. 2021), kind "taming_vqgan";
- `llamagen`: LlamaGen's VQ tokenizer (Sun et al. 2024), kind "llamagen_vq".

Value ranges follow the interface: images in [0, 1] in and out, whatever the original uses inside.
These tokenizers are frozen: they encode and decode, and training one is an error.
"""

from __future__ import annotations

from ..base import ImageTokenizer
from .common import ImportedTokenizer
from .llamagen import LlamaGenVQ
from .openai import OpenAIDVAE
from .taming import TamingVQGAN

IMPORTED_KINDS: dict[str, type[ImageTokenizer]] = {
    "openai_dvae": OpenAIDVAE,
    "taming_vqgan": TamingVQGAN,
    "llamagen_vq": LlamaGenVQ,
}

__all__ = ["IMPORTED_KINDS", "ImportedTokenizer", "LlamaGenVQ", "OpenAIDVAE", "TamingVQGAN"]
