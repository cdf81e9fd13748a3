"""dalle-mini-impl: a from-scratch DALL-E-style text-to-image research codebase.

The library, one subpackage per part of the pipeline (captions and images in, ranked images out):

    text/      the sentencepiece text tokenizer
    data/      (image, caption) streams from any source, image tensors, token shards
    model/     the DALL-E transformer and its sampler
    clip/      CLIP trained here: reranking, zero-shot labels, image search
    pipeline/  bundles (a trained model as a folder), the sample-then-rerank pipeline, guided refinement
    shapes/    the procedural data set and its judge
    eval/      `python -m dalle_mini_impl.eval {shapes,emoji,recon,clip,judge,unclip,edit,compare,runs}`
    bench/     speed benchmarks (tools, not library)

The image tokenizers live beside this package in `vae/`. The public API is named here and imported on
first use, so that `import dalle_mini_impl` stays cheap:

    from dalle_mini_impl import Pipeline
    pipe = Pipeline.from_pretrained()                       # the shapes bundle shipped in the package
    kept = pipe.generate("a red circle", num_images=4)[0]   # the prompt's Results, best first: kept[0].image (PIL)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    # from a prompt to images
    "Pipeline": "dalle_mini_impl.pipeline.pipeline",
    "Result": "dalle_mini_impl.pipeline.pipeline",
    # bundles: a trained model as a folder
    "SHIPPED_MODEL": "dalle_mini_impl.pipeline.bundle",
    "read_bundle_config": "dalle_mini_impl.pipeline.bundle",
    "load_text_tokenizer": "dalle_mini_impl.pipeline.bundle",
    "load_vae": "dalle_mini_impl.pipeline.bundle",
    "load_transformer": "dalle_mini_impl.pipeline.bundle",
    "load_clip": "dalle_mini_impl.pipeline.bundle",
    # the tokenizers and the transformer
    "TextTokenizer": "dalle_mini_impl.text.tokenizer",
    "DALLE": "dalle_mini_impl.model.transformer",
    "TransformerConfig": "dalle_mini_impl.model.transformer",
    "generate": "dalle_mini_impl.model.generate",
    # configuration
    "RunConfig": "dalle_mini_impl.config",
    "load_config": "dalle_mini_impl.config",
    "UserError": "dalle_mini_impl.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'dalle_mini_impl' has no attribute '{name}'")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
