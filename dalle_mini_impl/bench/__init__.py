"""Benchmarks: tools that measure the library, not part of it.

    speed.py     `python -m dalle_mini_impl.bench`: training and sampling speed, MFU, peak memory, as JSON
    anchor.py    `python -m dalle_mini_impl.bench.anchor`: the same beside dalle-pytorch's own timing script,
                 interleaved run for run, as ratios
    gpu.py       `python -m dalle_mini_impl.bench.gpu`: the benchmark at DALL-E's 256 px geometry on one GPU
    app.py       `python -m dalle_mini_impl.bench.app`: the web app's page in headless Chromium, seconds from
                 pressing Generate to the first image (and the screenshot docs/ shows)
    anchor.json  the anchor's figures and the targets each comparison is checked against (`--figures`)
"""
