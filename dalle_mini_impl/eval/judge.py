"""`python -m dalle_mini_impl.eval judge FILE.jsonl`: the shapes judge over saved images.

Each line of FILE.jsonl is {"prompt": "a small red circle above a blue square", "path": "img/0.png"};
a relative path is read from the jsonl's folder. Prints one JSON object: n, overall accuracy, accuracy
on one-object and two-object prompts, and per-attribute accuracy (color, shape, size, position,
relation) over the prompts that state the attribute. The rules are the spec's (docs/shapes.md),
implemented in `dalle_mini_impl.shapes.judge`.

Library use: `judge_rows([(prompt, uint8_image), ...])` or `summarize(verdicts)` give the same dict.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dalle_mini_impl.errors import UserError
from dalle_mini_impl.shapes.generator import CaptionError
from dalle_mini_impl.shapes.judge import Verdict, judge, judge_rows, summarize

_ROW_HELP = 'each line must be an object like {"prompt": "a red circle", "path": "0.png"}'


def load_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3); transparent pixels are composited onto white, the shapes background."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _utf8_lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of an open text file, a file that is not UTF-8 refused in one sentence."""
    lineno = 0
    try:
        for lineno, line in enumerate(f, start=1):
            yield lineno, line
    except UnicodeDecodeError:
        raise UserError(f"line {lineno + 1} of '{path}' is not UTF-8 text; {_ROW_HELP}") from None


def read_rows(path: str | Path) -> Iterator[tuple[int, str, np.ndarray]]:
    """Yield (line number, prompt, image) for each non-blank line, with one-sentence errors."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"judge file '{path}' is a folder; give the .jsonl file in it ({_ROW_HELP})")
    if not path.is_file():
        raise UserError(
            f"judge file '{path}' does not exist; give a .jsonl file with one "
            '{"prompt": ..., "path": ...} object per line'
        )
    with path.open(encoding="utf-8") as f:
        for lineno, line in _utf8_lines(f, path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"line {lineno} of '{path}' is not valid JSON ({e.msg}); {_ROW_HELP}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "path" not in row:
                raise UserError(f"line {lineno} of '{path}' lacks a string 'prompt' or a 'path'; {_ROW_HELP}")
            image_path = Path(str(row["path"]))
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            try:
                image = load_image(image_path)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                reason = "it does not exist" if not image_path.is_file() else f"{type(e).__name__}: {e}"
                raise UserError(
                    f"image '{image_path}' on line {lineno} of '{path}' cannot be read ({reason}); "
                    "fix the path or re-save the image as PNG"
                ) from None
            if image.shape[0] != image.shape[1]:
                h, w = image.shape[:2]
                raise UserError(
                    f"image '{image_path}' on line {lineno} of '{path}' is {w}x{h}; the judge reads square images"
                )
            yield lineno, row["prompt"], image


def judge_file(path: str | Path) -> dict:
    """Judge every row of a jsonl file and summarize; bad prompts are reported with their line."""
    verdicts: list[Verdict] = []
    for lineno, prompt, image in read_rows(path):
        try:
            verdicts.append(judge(image, prompt))
        except CaptionError as e:
            raise UserError(f"line {lineno} of '{path}': {e}") from None
    if not verdicts:
        raise UserError(f"judge file '{path}' has no rows; {_ROW_HELP}")
    return summarize(verdicts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle_mini_impl.eval judge", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help='a .jsonl file of {"prompt", "path"} rows')
    args = parser.parse_args(argv)
    print(json.dumps(judge_file(args.file), indent=2))
    return 0


__all__ = ["judge_file", "judge_rows", "load_image", "main", "read_rows", "summarize"]


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
