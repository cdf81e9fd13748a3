"""CLIP trained here, and what it is used for: reranking samples, zero-shot labels, image search.

    model.py     the model (ViT + text transformer), the contrastive loss with global negatives,
                 the caption-safe augmentation
    uses.py      `load_clip(bundle)` -> `ClipScorer`: score / classify / embed; CLIPScore; an image index
    openclip.py  the same `ClipScorer` interface over pretrained OpenAI / open_clip weights (optional)
    __main__.py  `python -m dalle_mini_impl.clip {classify,index,search} ...`

Import the submodule you need (`from dalle_mini_impl.clip.uses import load_clip`).
"""
