"""From a prompt to images: bundles, the sample-then-rerank pipeline, and CLIP-guided refinement.

    bundle.py    a trained model as a folder (config.json, text.model, one safetensors file per stage)
    pipeline.py  `Pipeline`: sample candidates with the transformer, decode them, rerank with CLIP
    guided.py    VQGAN+CLIP: refine a sample's codes by gradient ascent on CLIP's score
    edit.py      masked editing and outpainting: the cells a mask or an extended canvas redraws
"""
