"""CLIP trained here, and what it is used for: reranking samples, zero-shot labels, image search.

    model.py     the model (ViT + text transformer), the contrastive loss with global negatives,
                 the caption-safe augmentation
    uses.py      `ClipScorer`: score / classify / embed; CLIPScore; an image index and search
    openclip.py  the same `ClipScorer` interface over pretrained OpenAI / open_clip weights (optional)
    negatives.py hard negatives on any captioned data: a caption with one of `clip.swap_phrases` swapped
    __main__.py  `python -m dalle_mini_impl.clip {classify,index,search} ...`

A bundle's CLIP loads with `dalle_mini_impl.pipeline.bundle.load_clip(bundle)`, as a `ClipScorer`.
"""
