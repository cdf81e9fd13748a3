"""`shapes`, the procedural data set that every stage is tested and judged on (docs/shapes.md).

    generator.py  the caption grammar, scene sampling, rendering, and the stream of (image, caption) pairs
    judge.py      does an image satisfy its caption? Finds the objects and checks every stated attribute
    negatives.py  captions made false by one word (hard negatives for CLIP), by the same grammar
"""
