"""The DALL-E transformer and its sampler.

    transformer.py  `DALLE`: one decoder-only stream over [text ; image] ids, its config and size registry
    generate.py     `generate`: image ids for text ids (KV cache, top-k/top-p, classifier-free guidance,
                    speculative Jacobi decoding)
"""
