"""Train the evaluation CLIP that grades generated images: `python -m train.judge --config configs/emoji.toml
--data DIR --out JUDGE`.

A judge must not be the model it grades: a bundle's own CLIP reranks its candidates, so a metric read
off that CLIP would reward reranking for pleasing it. The judge is a CLIP of its own, built from the
preset's `[judge]` section: its own text tokenizer (`judge.vocab_size`), its own seed, its own size and
steps (`judge.clip`, `judge.train`; a larger image tower, trained longer, than the reranker's; on emoji-styles its
text tower is a bag of words, which grades held-out name-style pairs best), trained on `judge.splits`
(`train+validation`) and never on a split it grades: a split named `test` is refused, and no other
split is opened. Its in-training retrieval numbers are on the last of its splits, which it has seen; its
ceiling on unseen images is what `python -m dalle_mini_impl.eval emoji` reports for the real images.

JUDGE (default: the run folder with `-judge` appended, never the run folder itself) then holds
config.json, text.model and clip.safetensors, as a bundle's CLIP does (`pipeline.bundle.load_clip`).
Rerunning the command resumes from the last checkpoint, as every stage does. Prints the tokenizer's
JSON line, then the training's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from dalle_mini_impl.config import RunConfig, read_config_json
from dalle_mini_impl.data.streams import split_parts
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.pipeline.bundle import JUDGE_SUFFIX
from dalle_mini_impl.text.tokenizer import MAX_VOCAB
from train import loop
from train.clip import check_config as check_clip_config
from train.clip import train_clip
from train.common import process_state
from train.tokenizer import train_tokenizer

GRADED_SPLIT = "test"  # what `eval emoji` grades; the judge never learns from it


def is_judge(cfg: RunConfig) -> bool:
    """Whether a config is a judge's (`judge_config`'s), not a pipeline run's."""
    return cfg.name.endswith(JUDGE_SUFFIX)


# where the preset keeps the judge's CLIP and training settings, which its config holds as clip and train.clip
JUDGE_SECTION, JUDGE_KEY = "judge.clip", "judge.train."


def judge_config(cfg: RunConfig, out: str) -> RunConfig:
    """The run config of the judge: the preset's data and text settings with the `[judge]` section in place."""
    j = cfg.judge
    if cfg.data.source == "shapes":
        raise UserError(
            "train.judge trains an evaluation CLIP for captioned images (eval emoji); shapes is graded by its own "
            "rule-based judge (eval shapes): pass --data with an emoji-styles folder and --config configs/emoji.toml"
        )
    parts = split_parts(j.splits)
    # as a folder name: "test/" and "./test" open DIR/test too
    if GRADED_SPLIT in {os.path.normpath(part.strip()) for part in parts}:
        raise UserError(
            f"config key 'judge.splits' is '{j.splits}'; the judge grades the {GRADED_SPLIT} split and must never "
            "learn from it: use train+validation"
        )
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}{JUDGE_SUFFIX}",
        out_dir=out,
        seed=j.seed,
        data=dataclasses.replace(cfg.data, split=j.splits, val_split=parts[-1]),
        text=dataclasses.replace(cfg.text, vocab_size=j.vocab_size),
        clip=j.clip,
        train=dataclasses.replace(cfg.train, clip=j.train),
    )


def check_judge(jcfg: RunConfig) -> None:
    """The judge CLIP's settings, checked as `train.clip` checks a run's, named as the preset names them
    (`judge.clip.*`, `judge.train.*`: the judge's config holds them as `clip.*`, `train.clip.*`)."""
    check_clip_config(jcfg, JUDGE_SECTION)
    loop.check_training_values(jcfg.train.clip, JUDGE_KEY)
    if not 1 <= jcfg.text.vocab_size <= MAX_VOCAB:  # the tokenizer would name text.vocab_size, not the judge's key
        raise UserError(
            f"config key 'judge.vocab_size' is {jcfg.text.vocab_size}; use a positive size up to {MAX_VOCAB:,}"
        )


def main(argv: list[str] | None = None) -> int:
    cfg, args = loop.parse_args(argv, __doc__, refused=("split", "init_from"))
    if args.split:
        raise UserError("train.judge reads the splits of judge.splits; set those instead of --split")
    if args.init_from:
        raise UserError("train.judge trains a CLIP of its own, never from a model's weights; leave out --init-from")
    out = args.out or f"{cfg.out_dir.rstrip('/')}-judge"
    for part in ("vae.safetensors", "transformer.safetensors"):
        if (Path(out) / part).is_file():
            raise UserError(f"--out '{out}' holds a model ({part}); give the judge a folder of its own")
    if (Path(out) / "config.json").is_file() and not is_judge(read_config_json(Path(out) / "config.json")):
        # a pipeline run's folder: its text tokenizer would pass for the judge's own, and its config be written over
        raise UserError(f"--out '{out}' is another run's folder (its config.json is no judge's); give the judge one")
    jcfg = judge_config(cfg, out)
    check_judge(jcfg)  # before the tokenizer trains: a bad judge.* setting stopped the run only after it
    state = process_state()  # the main process trains the tokenizer while the others wait, then all train the CLIP
    if state.is_main_process and not (Path(out) / "text.model").is_file():  # a resumed run keeps its tokenizer
        print(json.dumps(train_tokenizer(jcfg)))
    state.wait_for_everyone()
    train_clip(jcfg, args, key=JUDGE_KEY, section=JUDGE_SECTION)
    return 0


if __name__ == "__main__":
    run_cli(main)
