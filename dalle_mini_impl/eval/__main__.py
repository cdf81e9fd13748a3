"""`python -m dalle_mini_impl.eval COMMAND ...`: dispatch to one evaluation module.

    judge FILE.jsonl                         the shapes judge over rows {"prompt", "path"}
    recon --model DIR --data SRC --split S    image tokenizer PSNR / SSIM / codebook usage
    clip --model DIR --data SRC --split S     CLIP retrieval recall@1/5/10
    shapes --model DIR --n 300 --seed 0       judge accuracy of generated samples (--method unclip: DALL-E 2's)
    unclip --model DIR --n 300 --seed 0       judge accuracy of unCLIP's variations, text diffs, interpolations
    edit --model DIR --n 200 --seed 0         judge accuracy of masked edits (one object of two redrawn)
    emoji --model B --data DIR [--judge J]    text-to-image on emoji-styles, graded by an evaluation CLIP
    compare A.json B.json                     two evaluations' numbers paired by seed: B - A and its standard error
    runs RUN_A RUN_B                          two training runs' weights and logs: the same run, or where they part
"""

from __future__ import annotations

import importlib
import sys

from dalle_mini_impl.errors import UserError, run_cli

COMMANDS = {
    "judge": "dalle_mini_impl.eval.judge",
    "recon": "dalle_mini_impl.eval.recon",
    "clip": "dalle_mini_impl.eval.clip",
    "shapes": "dalle_mini_impl.eval.shapes",
    "emoji": "dalle_mini_impl.eval.emoji",
    "unclip": "dalle_mini_impl.eval.unclip",
    "edit": "dalle_mini_impl.eval.edit",
    "compare": "dalle_mini_impl.eval.compare",
    "runs": "dalle_mini_impl.eval.runs",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UserError(f"unknown eval command '{command}'; choose one of: {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    run_cli(main)
