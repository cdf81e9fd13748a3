"""Image tokenizers: DALL-E's Gumbel-softmax dVAE and a VQGAN-style quantiser, behind one interface.

This package stands alone: it imports only torch, einops, numpy, safetensors and the standard library,
so a saved tokenizer loads without the rest of the project.

    import vae
    model = vae.build("dvae", codebook_size=512, factor=4, hidden=64, res_blocks=1)
    for step, images in enumerate(loader):                      # images (b, 3, H, W) in [0, 1]
        values = vae.schedules.values_at(step, temperature_start=1.0, temperature_end=1 / 16,
                                         temperature_steps=3000, kl_weight=1e-4, kl_warmup_steps=1000)
        loss, metrics = model(images, step, **values)           # metrics["ids"] feeds vae.CodeUsage
    vae.save_pretrained(model, "out/vae")
    ids = vae.load_pretrained("out/vae").encode(images)         # (b, h, w) int64
    images = model.decode(ids)                                  # (b, 3, H, W) in [0, 1]
"""

from . import schedules
from .base import ImageTokenizer, VAEError
from .dvae import DiscreteVAE
from .io import (
    KINDS,
    SCHEDULE_FIELDS,
    build,
    constructor_fields,
    load_pretrained,
    load_weights,
    model_kwargs,
    read_pretrained_config,
    save_pretrained,
)
from .metrics import CodeUsage, perplexity, psnr
from .vq import VQ

__all__ = [
    "KINDS",
    "SCHEDULE_FIELDS",
    "CodeUsage",
    "DiscreteVAE",
    "ImageTokenizer",
    "VAEError",
    "VQ",
    "build",
    "constructor_fields",
    "load_pretrained",
    "load_weights",
    "model_kwargs",
    "perplexity",
    "psnr",
    "read_pretrained_config",
    "save_pretrained",
    "schedules",
]
