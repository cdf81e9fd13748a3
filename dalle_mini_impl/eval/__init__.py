"""Evaluation commands: `python -m dalle_mini_impl.eval {judge,recon,clip,shapes,emoji,unclip,edit,compare,runs} ...`,
each printing JSON."""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict
from pathlib import Path

from ..errors import UserError
from ..files import said_if_unwritable, write_atomic


def check_counts(**counts: tuple[int | None, int]) -> None:
    """Each option=(value, least) that is below its least, in one sentence naming it (None: not given)."""
    for option, (value, least) in counts.items():
        if value is not None and value < least:
            raise UserError(f"--{option.replace('_', '-')} is {value}; use at least {least}")


def check_finite(stream, limit: int | None) -> None:
    """One sentence for an endless split read with no limit (the shapes stream with data.shapes.train_size 0): the
    evaluation would read it until memory ran out."""
    from ..data.streams import is_endless

    if not limit and is_endless(stream.cfg, stream.split):
        raise UserError(
            f"the shapes split '{stream.split}' is endless (data.shapes.train_size is 0); pass --limit N, or "
            "--set data.shapes.train_size=N, or evaluate --split validation"
        )


# the `data` keys an evaluation does not read, and what to do instead
EVAL_UNREAD_DATA = {
    "data.split": "it reads the split --split names; use --split",
    "data.val_split": "it reads the split --split names; use --split",
    "data.max_examples": "that is train.encode's; use --limit",
    "data.random_crop": "an evaluation center-crops every image",
    "data.shuffle_buffer": "an evaluation reads the split in order",
    "data.encode_flip": "that is train.encode's",
    "data.encode_flip_exclude": "that is train.encode's",
    "data.encode_shard_size": "that is train.encode's",
}


def check_data_overrides(overrides: list[str], command: str) -> None:
    """`eval clip` and `eval recon` read the data through --set (data.*); the model's own settings come from its
    bundle's files, so any other key would be ignored: refused instead, as are the data keys no evaluation reads
    (EVAL_UNREAD_DATA)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("data."):
            raise UserError(
                f"--set {key}: eval {command} changes only the data it reads (data.*); the model's settings are "
                "its bundle's"
            )
        if key in EVAL_UNREAD_DATA:
            raise UserError(f"--set {key}: eval {command} does not read it; {EVAL_UNREAD_DATA[key]}")


def write_result(path: str | Path, write, option: str = "--out") -> None:
    """`write_atomic(path, write)` with a failure (no room, no permission) said in one sentence."""
    with said_if_unwritable(path, option):
        write_atomic(path, write)


def set_sampling(pipe, overrides: list[str], own: dict[str, str], uses: set[str]) -> None:
    """An evaluation's `--set sample.KEY=VALUE` on its pipeline's config (`config.apply_sample_overrides`), the
    settings then checked as the config keys they are: `--set sample.temperature=0` was refused as "--temperature
    is 0.0" at the first prompt, a flag no evaluation has."""
    from ..config import apply_sample_overrides
    from ..pipeline.pipeline import check_settings

    apply_sample_overrides(pipe.cfg, overrides, own, uses)
    if overrides:
        check_settings(pipe.cfg.sample, "--set")


def sample_uses(method: str, guided: int) -> set[str]:
    """What a text-to-image evaluation does with the sampler (config.SAMPLE_USES): unCLIP's prior with
    `--method unclip`, refinement with `--guided K`."""
    uses = set()
    if method == "unclip":
        uses.add("unclip")
    if guided:
        uses.add("guided")
    return uses


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    """`--method {ar,unclip}`: where a text-to-image evaluation's candidates come from."""
    parser.add_argument(
        "--method", default="ar", choices=["ar", "unclip"], help="ar: the transformer; unclip: the prior and decoder"
    )


GUIDED_STARTS = {"both": ("samples", "random"), "pick": ("samples",), "random": ("random",)}


def add_guided_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """`--guided K` (VQGAN+CLIP on the first K of `what`) and `--guided-from` (which starts it refines)."""
    parser.add_argument("--guided", type=int, default=0, help=f"refine with CLIP guidance for the first K {what}")
    parser.add_argument(
        "--guided-from",
        default="both",
        choices=list(GUIDED_STARTS),
        help="--guided's starts: the reranked pick, random codes (Pixray's start), or both (default); "
        "the pick's columns are the same with 'pick' as with 'both'",
    )


def sample_settings(s, guided_from: str) -> dict:
    """The bundle's sampling and refinement settings a text-to-image evaluation ran with (`s`: its SampleConfig,
    overrides applied), as `eval shapes` and `eval emoji` print them."""
    return {
        "guidance_scale": s.guidance_scale,
        "guidance_until": s.guidance_until,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "guided_prior_weight": s.guided_prior_weight,
        "guided_contrast_weight": s.guided_contrast_weight,
        "guided_contrast_guard": s.guided_contrast_guard,
        "guided_from": guided_from,
        "guided_optimizer": s.guided_optimizer,
        "guided_steps": s.guided_steps,
        "guided_lr": s.guided_lr,
        "guided_jacobi_lr": s.guided_jacobi_lr,
        "guided_cutouts": s.guided_cutouts,
        "decode": s.decode,
        "speculative_relax": s.speculative_relax,
        "speculative_neighbours": s.speculative_neighbours,
    }


def require_reranker(model: str, says: str) -> None:
    """One sentence (`says`), before the bundle loads, for a bundle folder without clip.safetensors: loading it
    would first warn that its candidates stay unranked, which the evaluation then refuses."""
    from ..pipeline.bundle import FILES, bundle_path

    path = bundle_path(model)
    if path.is_dir() and not (path / FILES["clip"]).is_file():
        raise UserError(says)


def check_method(pipe, method: str, guided: int, guided_from: str = "both") -> None:
    """One sentence when `method` needs parts the bundle lacks, or is asked beside `--guided` refinement, or
    when `--guided` is negative or `--guided-from` comes without it."""
    if guided < 0:
        raise UserError(f"--guided is {guided}; refine the first K >= 0 prompts (0: none)")
    if guided_from != "both" and not guided:
        raise UserError(f"--guided-from {guided_from} chooses what --guided refines; add --guided K, e.g. --guided 40")
    if method == "unclip":
        pipe.require_unclip("--method unclip", prior=True)
        if guided:
            raise UserError("--guided refines the default method's top-1; leave it out with --method unclip")


def refined_columns(
    pipe, start, prompt: str, s, generator, starts: str = "both"
) -> list[tuple[str, object, float, bool]]:
    """`--guided` of the text-to-image evaluations: one start (1, h, w) refined, then random codes (Pixray's
    start) generated, each by CLIP alone (Adam; `clip_guided`, `random_codes_guided`) and, when the settings'
    guided_prior_weight is above 0, with the transformer's prior (`clip_guided_prior`,
    `random_codes_guided_prior`; the settings' optimiser): (column, image (3, S, S) in [0, 1], CLIP score,
    whether its codes differ from the start's), in that order. `starts` ("both", "pick", "random") keeps the
    start's columns, the random codes' or both. The random codes are drawn from `generator` after the start's
    refinements (so the start's columns are the same with "pick" as with "both"; the random codes depend on
    what those refinements drew), or first with "random"."""
    from ..pipeline.guided import random_codes

    if starts not in GUIDED_STARTS:
        raise UserError(f"--guided-from is '{starts}'; use {', '.join(GUIDED_STARTS)}")
    out = []
    for name, init in (("clip_guided", "samples"), ("random_codes_guided", "random")):
        if init not in GUIDED_STARTS[starts]:
            continue
        if init == "random":
            start = random_codes(pipe.image_tokenizer.codebook_size, 1, *pipe.grid, generator)
        start = start.view(-1, *pipe.grid)
        for column, weight in ((name, 0.0), (f"{name}_prior", s.guided_prior_weight)):
            if column == name or weight > 0:
                settings = dataclasses.replace(s, guided_prior_weight=weight)
                ids, images, scores = pipe.refine(start, [(prompt, 1.0)], settings, generator, init=init)
                out.append((column, images[0], float(scores[0]), bool((ids[0] != start[0]).any())))
    return out


class RefinedColumns:
    """What `--guided` gathers per column, prompt by prompt: what is graded (images or verdicts), CLIP's score of
    the images and whether refinement moved their codes off the start's."""

    def __init__(self, unrefined: str):
        self.unrefined = unrefined  # the column of the unrefined starts, scored beside the refined ones
        self.graded: dict[str, list] = defaultdict(list)
        self.scores: dict[str, list[float]] = defaultdict(list)
        self.moved: dict[str, list[bool]] = defaultdict(list)

    def add(self, pipe, start, start_score: float, prompt: str, s, generator, starts: str, grade) -> None:
        """Refine `start` (1, h, w), whose CLIP score is `start_score`, as `refined_columns` does; `grade`: image
        (3, S, S) -> what the evaluation keeps of it."""
        self.scores[self.unrefined].append(start_score)
        for column, image, score, moved in refined_columns(pipe, start, prompt, s, generator, starts):
            self.graded[column].append(grade(image))
            self.scores[column].append(score)
            self.moved[column].append(moved)

    def means(self) -> dict:
        """`clip_score` (CLIP's mean score of each column's images, the unrefined one's too) and `refined_moved`
        (the share of each refined column's images whose codes left their start's)."""
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        return {
            "clip_score": {name: mean(v) for name, v in self.scores.items()},
            "refined_moved": {name: mean(v) for name, v in self.moved.items()},
        }
