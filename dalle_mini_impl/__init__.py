"""dalle-mini-impl: a from-scratch DALL-E-style text-to-image research codebase.

The library layer: config, data (Hugging Face `datasets` + the procedural `shapes` set), the text
tokenizer, the transformer and its sampler, CLIP, evaluation and bundle I/O. It imports `vae` and
never `train` or `sample`. Import submodules directly (`from dalle_mini_impl.config import ...`):
this file stays empty so that `python -m sample` pays only for what it uses.
"""

__version__ = "0.1.0"
