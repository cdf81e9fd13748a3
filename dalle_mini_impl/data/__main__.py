"""`python -m dalle_mini_impl.data {grid,stats}`: look at a data source before training on it.

    python -m dalle_mini_impl.data grid --out shapes_grid.png --n 16                   # examples with captions
    python -m dalle_mini_impl.data stats --data DATA/emoji-noto --split validation      # n and skipped, as JSON

Both read the source through `ExampleStream` (`streams.py`), so they count exactly what training would
skip; `--config`, `--set`, `--data` and `--split` work as on every command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time

from ..config import add_config_args, config_from_args
from ..errors import UserError, run_cli
from ..files import check_out_file, said_if_unwritable
from .images import save_grid
from .streams import ExampleStream, collate, is_endless

# a grid of more examples than this is too small to read, and the shapes stream would render them without end
MAX_GRID = 1024


def _first_of(cfg) -> None:
    """For a command that reads the first examples alone: a data set's files are streamed (loaded whole, a parquet
    or tar split is first converted into `datasets`' cache in full, minutes and gigabytes for 16 examples of a
    large one); the same records, read and skipped as training reads them."""
    if cfg.data.source != "shapes":  # drawn, not read
        cfg.data.streaming = True


def _grid(cfg, args) -> int:
    if not args.out:
        raise UserError("grid needs --out FILE.png, the image to write")
    if not 1 <= args.n <= MAX_GRID:
        raise UserError(f"--n {args.n} must be 1 to {MAX_GRID} examples; look at more with several grids or data stats")
    check_out_file(args.out, "--out", "grid.png")
    _first_of(cfg)
    stream = ExampleStream(cfg.data, cfg.data.split, train=False, seed=cfg.seed)
    examples = list(itertools.islice(stream, args.n))
    batch = collate(examples)
    with said_if_unwritable(args.out):
        path = save_grid(batch["image"], args.out, nrow=math.ceil(math.sqrt(len(examples))), captions=batch["caption"])
    print(f"wrote {path} ({len(examples)} examples of {cfg.data.source}, split {cfg.data.split})")
    return 0


def _stats(cfg, args) -> int:
    if args.n is not None and args.n < 1:
        raise UserError(f"--n {args.n} must be at least 1")
    if args.n is None and is_endless(cfg.data, cfg.data.split):
        raise UserError("the shapes training stream is endless; pass --n N or set data.shapes.train_size")
    if args.n is not None:
        _first_of(cfg)
    stream = ExampleStream(cfg.data, cfg.data.split, train=False, seed=cfg.seed)
    t0 = time.perf_counter()
    n, chars, captions = 0, 0, set()
    for example in itertools.islice(stream, args.n):
        n += 1
        chars += len(example["caption"])
        captions.add(example["caption"])
    summary = {
        "source": cfg.data.source,
        "split": cfg.data.split,
        "n": n,
        "skipped": stream.n_skipped,
        "skipped_by_reason": dict(sorted(stream.skipped.items())),
        "image_size": cfg.data.image_size,
        "unique_captions": len(captions),
        "mean_caption_chars": round(chars / max(n, 1), 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle_mini_impl.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    grid = commands.add_parser("grid", help="write a PNG grid of examples with their captions")
    add_config_args(grid)
    grid.add_argument("--n", type=int, default=16, help="number of examples (default 16)")
    stats = commands.add_parser("stats", help="read one pass of a split and print counts as JSON")
    add_config_args(stats)
    stats.add_argument("--n", type=int, default=None, help="stop after N examples (default: the whole split)")
    for action in grid._actions:
        if action.dest == "out":
            action.help = "the PNG file to write"
    for action in stats._actions:
        if action.dest == "out":  # stats prints its JSON; a run folder means nothing to it
            action.help = argparse.SUPPRESS
    args = parser.parse_args(argv)
    if args.command == "stats" and args.out is not None:  # accepted and ignored once
        raise UserError("data stats prints its JSON and writes no file; leave out --out (redirect the output instead)")
    out = args.out
    args.out = None  # --out names this command's output file, not a run folder
    cfg = config_from_args(args)
    args.out = out
    return _grid(cfg, args) if args.command == "grid" else _stats(cfg, args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_cli(main)
