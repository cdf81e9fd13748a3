"""Data: (image, caption) pairs from any source, images as tensors, and the token shards training reads.

    streams.py   `ExampleStream`: shapes, an imagefolder, parquet, webdataset tar or a hub data set as one
                 resumable, per-process stream; bad files are skipped and counted
    images.py    image <-> tensor conversions, resizing and cropping, PNG grids
    tokens.py    token shards: caption ids and image ids encoded once by `train.encode`, read by `train.dalle`
    __main__.py  `python -m dalle_mini_impl.data {grid,stats}`
"""
