"""Train the sentencepiece text tokenizer on the captions of the configured training split.

    python -m train.tokenizer --config configs/shapes.toml [--set text.vocab_size=512] [--data SOURCE] [--out DIR]

Reads up to `text.max_train_captions` captions of `data.split` (captions only: no image is decoded),
trains `dalle_mini_impl.text.tokenizer.TextTokenizer` (BPE with byte fallback, see that module), and writes
OUT/text.model and the resolved config OUT/config.json, OUT being `out_dir` (or --out). Prints one line
of JSON. The first stage of the pipeline: everything after it reads text ids from this model.

With `--init-from BUNDLE_OR_RUN` it trains nothing: it copies that model's text.model (fine-tuning keeps the
tokenizer whose ids the model's weights read; train.finetune).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dalle_mini_impl.config import RunConfig, add_config_args, config_from_args
from dalle_mini_impl.data.streams import iter_captions
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.pipeline.bundle import load_text_tokenizer, record_stage_config
from dalle_mini_impl.text.tokenizer import TextTokenizer
from train.common import process_state


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.tokenizer", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument(
        "--init-from", default=None, metavar="BUNDLE_OR_RUN", help="copy this model's text.model instead of training"
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    state = process_state()  # under `accelerate launch`, the main process writes text.model while the others wait
    if state.is_main_process:
        summary = copy_tokenizer(cfg, args.init_from) if args.init_from else train_tokenizer(cfg)
        print(json.dumps(summary))
    state.wait_for_everyone()
    return 0


def train_tokenizer(cfg: RunConfig) -> dict:
    """Train and write `cfg.out_dir`/text.model; returns the summary `main` prints."""
    out = Path(cfg.out_dir)
    if cfg.text.max_train_captions < 1:
        raise UserError(
            f"config key 'text.max_train_captions' is {cfg.text.max_train_captions}; read at least 1 caption "
            "(the default 200000)"
        )
    t0 = time.perf_counter()
    skipped: Counter = Counter()
    captions = list(iter_captions(cfg.data, cfg.data.split, cfg.text.max_train_captions, skipped))
    if not captions and (cfg.data.include or cfg.data.exclude):
        raise UserError(
            f"data.include / data.exclude keep no caption of split '{cfg.data.split}' of '{cfg.data.source}'; loosen "
            "them"
        )
    tok = TextTokenizer.train(captions, cfg.text, out / "text.model")
    record_stage_config(cfg, out, "tokenizer")
    summary = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": cfg.text.vocab_size,
        "captions": len(captions),
        "captions_skipped": dict(sorted(skipped.items())),  # by reason: empty_caption, bad_caption, ...
        "source": cfg.data.source,
        "split": cfg.data.split,
        "lowercase": tok.lowercase,
        "path": str(out / "text.model"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return summary


def copy_tokenizer(cfg: RunConfig, init_from: str) -> dict:
    """Fine-tuning keeps the source's tokenizer: copy its text.model into `cfg.out_dir`; returns the summary."""
    from train.finetune import adopt_text_tokenizer, checked_source

    source = checked_source(init_from)
    if source.resolve() != Path(cfg.out_dir).resolve():
        (Path(cfg.out_dir) / "text.model").unlink(missing_ok=True)  # replaced, as training would
    adopt_text_tokenizer(source, cfg)
    tok = load_text_tokenizer(cfg.out_dir, cfg)
    return {"vocab_size": tok.vocab_size, "copied_from": str(source), "path": str(Path(cfg.out_dir) / "text.model")}


if __name__ == "__main__":
    run_cli(main)
