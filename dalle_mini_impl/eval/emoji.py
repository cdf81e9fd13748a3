"""Does a text-to-image model draw what a caption asks, on real artwork? Graded by a CLIP that is not its own.

    python -m dalle_mini_impl.eval emoji --model emoji --data DATA/emoji-styles --split test \
        --candidates 8 --seed 0 [--judge JUDGE] [--n 130] [--set sample.guidance_scale=2] [--grid grid.png]
        [--method unclip]                    # candidates from DALL-E 2's prior and decoder instead

Captions are `NAME, STYLE style` (the emoji-styles data set: `pizza, openmoji style`). For each caption
of the split (or `--n` of them, drawn with the seed) the model samples N candidates (seed + the
caption's index), and two are judged: its reranker's top-1 (`reranked`) and the first candidate
(`first`, no reranking); every candidate is judged too (`every`), and for each caption the best of its
candidates by the judge itself (`judge_best`). The judge is an evaluation CLIP trained apart from the model
(`python -m train.judge`), so reranking cannot simply please it: the one shipped in the package (`--judge
emoji`, the default: the same yardstick on every machine) or a folder train.judge wrote. With the judge's
unit-normalised embeddings, per judged image:

  style_acc         the caption's style wins among the eight captions `NAME, S style` (every style S of train)
  name_r1, name_r5  R-precision (AttnGAN's protocol): the true caption ranked among 100 captions, itself and
                    99 other names drawn with the seed from DIR/train (never the true name), all in the true
                    style; a hit at rank 1 / within 5 (a tie counts against the true caption)
  both              style right and name at rank 1
  cmmd              CLIP maximum mean discrepancy (Jayasumana et al. 2024, "Rethinking FID"): Gaussian kernel
                    sigma 10, the biased estimator, times 1000, between the judged images and the real images
                    of the same captions

`judge_best` has no cmmd: per caption, whether any of its N candidates gets the style, the name at rank 1 or
within 5, and both at once (one candidate); the ceiling of any reranker of these candidates (shapes' "any of 8"),
so that reranked against judge_best says how much a better reranker could add, and judge_best against real how
much only a better sampler can.

The same keys for three references that need no model: `real` (the captions' real images: the
ceiling), `same_style_random` (a random training image of the caption's style, another caption's) and
`copy_other_style` (the same name drawn in another style, from train: right name, wrong style; only
for captions whose name train has in another style, counted by its `n`). A fourth needs the model's image
tokenizer alone: `reconstructed`, the real images encoded and decoded by it, what a transformer drawing each
caption's own codes would reach (reconstruction FID in VQGAN's and LlamaGen's tables; not a bound on a measure a
sampled image can win by drawing other codes than the caption's own image). Prints one JSON object;
`--grid PNG` also draws the first eight captions' reranked images above their real ones. DIR needs only
`train` and the graded split. `judge_learned_from_split` says whether the judge trained on that split
(true for `train`, the seen cells: its numbers on real images are then not a ceiling on unseen ones).

`--references-only` loads no model and samples nothing: it prints the three references alone and the
styles the judge picks for the real images (`real_style_picks`), which is how a judge is compared with
another (a minute, where sampling takes several).

`--seed 0 1 2` runs the whole evaluation once per seed (sampling, `--n`'s draw and R-precision's names all
move with it) and prints each seed's numbers under `per_seed`, their mean under `mean` and their smallest and
largest under `range`: on 130 captions a seed moves a generated image's name R@1 by up to 9 points, so two
models are compared over several seeds, not one.
"""

from __future__ import annotations

import argparse
import bisect
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import EVAL_OWN_SETTINGS, DataConfig, RunConfig
from ..data.images import distinct_first, from_uint8, save_grid, to_uint8
from ..data.streams import split_parts
from ..errors import UserError
from ..files import check_out_file, said_if_unwritable
from . import (
    RefinedColumns,
    add_guided_arguments,
    add_method_argument,
    check_method,
    require_reranker,
    sample_settings,
    sample_uses,
    set_sampling,
    write_result,
)

NO_RERANKER = "this model has no CLIP to rerank with; eval emoji judges its reranked pick"
R_PRECISION_POOL = 100  # the true caption and 99 others
CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0
GRID_COLUMNS = 8  # --grid: the first eight judged captions


def parse_caption(caption: str) -> tuple[str, str]:
    """`NAME, STYLE style` -> (NAME, STYLE)."""
    name, sep, style = caption.rpartition(", ")
    if not sep or not name or not style.endswith(" style") or style == " style":
        raise UserError(f"caption '{caption}' is not of the form 'NAME, STYLE style'; eval emoji reads emoji-styles")
    return name, style.removesuffix(" style")


def style_caption(name: str, style: str) -> str:
    return f"{name}, {style} style"


# ----------------------------------------------------------------------------------------------
# The metrics
# ----------------------------------------------------------------------------------------------


def rprecision_names(true_name: str, names: Sequence[str], seed: int, index: int) -> list[str]:
    """The 99 other names caption `index` is ranked against: drawn from `names` with (seed, index), never the
    true one, each once."""
    return _draw_names(true_name, sorted(set(names)), seed, index)


def _draw_names(true_name: str, pool: list[str], seed: int, index: int) -> list[str]:
    """`rprecision_names` from the sorted distinct names `pool` (sorted once for every caption: sorting the train
    split's names again per caption grew with captions times names): the same draw from the pool without
    `true_name`, whose names after it move down one place."""
    at = bisect.bisect_left(pool, true_name)
    skip = at < len(pool) and pool[at] == true_name
    others = len(pool) - skip
    if others < R_PRECISION_POOL - 1:
        raise UserError(
            f"train has {others + 1} names; R-precision ranks each caption among {R_PRECISION_POOL}, "
            f"so it needs at least {R_PRECISION_POOL} names"
        )
    rng = np.random.default_rng([seed, index])
    return [pool[j + (skip and j >= at)] for j in rng.choice(others, R_PRECISION_POOL - 1, replace=False)]


# rows of the kernel matrix summed at once: the whole matrix grows with the square of the set
CMMD_CHUNK = 1024


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD between embeddings x (m, e) and y (n, e): scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)),
    k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), diagonals included (the biased estimator). The kernel's rows are
    summed `CMMD_CHUNK` at a time (up to that many, in one piece, as always)."""
    x, y = x.double(), y.double()
    gamma = 1.0 / (2 * sigma**2)

    def mean_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b_sq = (b * b).sum(1)[None, :]

        def kernel(rows: torch.Tensor) -> torch.Tensor:
            sq = (rows * rows).sum(1)[:, None] + b_sq - 2 * rows @ b.T
            return torch.exp(-gamma * sq.clamp_min(0))

        if len(a) <= CMMD_CHUNK:
            return kernel(a).mean()
        return sum(kernel(rows).sum() for rows in a.split(CMMD_CHUNK)) / (len(a) * len(b))

    return float(scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y)))


class Grader:
    """The judge's view of one caption set: text embeddings cached, images graded against their captions."""

    def __init__(self, judge, captions: Sequence[str], styles: Sequence[str], train_names: Sequence[str], seed: int):
        self.judge = judge
        self.parsed = [parse_caption(c) for c in captions]
        self.styles = list(styles)
        pool = sorted(set(train_names))
        self.pools = [_draw_names(name, pool, seed, i) for i, (name, _) in enumerate(self.parsed)]
        self._text: dict[str, torch.Tensor] = {}

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._text]
        if new:
            self._text.update(zip(new, self.judge.embed_texts(new)))
        return torch.stack([self._text[t] for t in texts])

    def style_picks(self, emb: torch.Tensor, rows: Sequence[int]) -> list[str]:
        """The style the judge picks for image embedding emb[j] among the eight `NAME, S style` of caption rows[j]."""
        picks = []
        for j, i in enumerate(rows):
            name = self.parsed[i][0]
            by_style = self._embed_texts([style_caption(name, s) for s in self.styles]) @ emb[j]
            picks.append(self.styles[int(by_style.argmax())])
        return picks

    def confusion(self, emb: torch.Tensor, rows: Sequence[int]) -> dict[str, dict[str, int]]:
        """{true style: {picked style: count}} over image embeddings emb (m, e), image j of caption rows[j]."""
        picks = self.style_picks(emb, rows)
        table: dict[str, dict[str, int]] = {s: {} for s in sorted({self.parsed[i][1] for i in rows})}
        for pick, i in zip(picks, rows):
            counts = table[self.parsed[i][1]]
            counts[pick] = counts.get(pick, 0) + 1
        return table

    def outcomes(self, emb: torch.Tensor, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per image embedding emb[j] (of caption rows[j]): whether the judge picks its style (bool), and the rank
        of its caption among R-precision's 100 (1 = first; a tie counts against it)."""
        picks = self.style_picks(emb, rows)
        style_ok, ranks = [], []
        for j, i in enumerate(rows):
            name, style = self.parsed[i]
            style_ok.append(picks[j] == style)
            pool = [style_caption(name, style)] + [style_caption(other, style) for other in self.pools[i]]
            sims = self._embed_texts(pool) @ emb[j]
            ranks.append(1 + int((sims[1:] >= sims[0]).sum()))
        return np.array(style_ok, dtype=bool), np.array(ranks)

    def grade(self, images: torch.Tensor, rows: Sequence[int], real: torch.Tensor) -> dict[str, float]:
        """Metrics of images (m, 3, S, S), image j drawn for caption rows[j]; `real`: the real images' embeddings."""
        if not len(rows):
            return {"n": 0}
        return self.grade_embedded(self.judge.embed_images(images), rows, real)

    def grade_embedded(self, emb: torch.Tensor, rows: Sequence[int], real: torch.Tensor) -> dict[str, float]:
        """`grade` of images the judge has embedded (emb: (m, e))."""
        style_ok, ranks = self.outcomes(emb, rows)
        return {
            "n": len(rows),
            "style_acc": float(style_ok.mean()),
            "name_r1": float((ranks == 1).mean()),
            "name_r5": float((ranks <= 5).mean()),
            "both": float((style_ok & (ranks == 1)).mean()),
            "cmmd": cmmd(emb, real),
        }

    def best_of(self, emb: torch.Tensor, rows: Sequence[int], candidates: int) -> dict[str, float]:
        """The judge's "any of N" over each caption's `candidates` consecutive embeddings (emb: (m * candidates, e),
        rows repeating each caption's index that often): the share of captions with any candidate whose style is
        right, name at rank 1, within 5, and both in one candidate. No CMMD: no one image per caption is chosen."""
        style_ok, ranks = self.outcomes(emb, rows)
        style_ok, ranks = style_ok.reshape(-1, candidates), ranks.reshape(-1, candidates)  # (m, N)
        return {
            "n": len(style_ok),
            "style_acc": float(style_ok.any(1).mean()),
            "name_r1": float((ranks == 1).any(1).mean()),
            "name_r5": float((ranks <= 5).any(1).mean()),
            "both": float((style_ok & (ranks == 1)).any(1).mean()),
        }


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def read_split(data: str, split: str, image_size: int) -> tuple[list[str], torch.Tensor]:
    """Captions and uint8 images (m, S, S, 3) of one split of an imagefolder, in order."""
    from ..data.streams import ExampleStream

    stream = ExampleStream(DataConfig(source=data, image_size=image_size), split, train=False)
    captions, images = [], []
    for example in stream:
        captions.append(example["caption"])
        images.append(to_uint8(example["image"]))
    if not captions:
        raise UserError(f"split '{split}' of '{data}' has no readable example")
    return captions, torch.from_numpy(np.stack(images))


def references(
    captions: Sequence[str], train_captions: Sequence[str], seed: int
) -> tuple[list[int | None], list[int | None]]:
    """Per caption, the train index of `same_style_random` and of `copy_other_style` (None where train has none)."""
    by_style, by_name = defaultdict(list), defaultdict(list)
    for k, caption in enumerate(train_captions):
        name, style = parse_caption(caption)
        by_style[style].append(k)
        by_name[name].append((style, k))
    same, other = [], []
    for i, caption in enumerate(captions):
        name, style = parse_caption(caption)
        rng = np.random.default_rng([seed, i, 1])
        pool = [k for k in by_style[style] if train_captions[k] != caption]
        same.append(pool[rng.integers(len(pool))] if pool else None)
        elsewhere = [k for s, k in by_name[name] if s != style]
        other.append(elsewhere[rng.integers(len(elsewhere))] if elsewhere else None)
    return same, other


class GradedSplit:
    """The captions of one split (all, or n drawn with the seed), their real images and the judge's grader."""

    def __init__(self, judge, data: str, split: str, n: int | None, seed: int, image_size: int):
        self.seed = seed
        self.train_captions, self.train_images = read_split(data, "train", image_size)
        captions, images = (
            (self.train_captions, self.train_images) if split == "train" else read_split(data, split, image_size)
        )
        chosen = list(range(len(captions)))
        if n is not None:
            if not 1 <= n <= len(captions):
                raise UserError(
                    f"--n is {n}; split '{split}' has {len(captions)} captions, choose 1 to {len(captions)}"
                )
            chosen = sorted(np.random.default_rng([seed, 2]).choice(len(captions), n, replace=False).tolist())
        self.captions = [captions[i] for i in chosen]
        self.real = from_uint8(images[chosen])  # (m, 3, S, S)
        styles = sorted({parse_caption(c)[1] for c in self.train_captions})
        self.grader = Grader(judge, self.captions, styles, [parse_caption(c)[0] for c in self.train_captions], seed)
        self.real_emb = judge.embed_images(self.real)

    def references(self) -> dict[str, dict]:
        """The three references that need no model: real (the ceiling), same_style_random, copy_other_style."""
        rows = list(range(len(self.captions)))
        out = {"real": self.grader.grade(self.real, rows, self.real_emb)}
        picks_of = references(self.captions, self.train_captions, self.seed)
        for key, picks in zip(("same_style_random", "copy_other_style"), picks_of):
            kept = [i for i, k in enumerate(picks) if k is not None]
            images = from_uint8(self.train_images[[picks[i] for i in kept]])
            out[key] = self.grader.grade(images, kept, self.real_emb[kept])
        return out

    def shown(self) -> dict:
        return {"n": len(self.captions), "captions": self.captions[:3] + (["..."] if len(self.captions) > 3 else [])}


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(
    pipe,
    judge,
    data: str,
    split: str,
    n: int | None,
    seed: int,
    grid: str | None = None,
    progress: bool = True,
    guided: int = 0,
    method: str = "ar",
    guided_from: str = "both",
) -> dict:
    """Everything the command prints but its settings, for a loaded Pipeline and judge (a ClipScorer).

    grid: also write a PNG of the first eight captions' reranked images above their real ones.
    guided: also refine the reranked pick of the first `guided` captions with CLIP (VQGAN+CLIP), alone
        (`clip_guided`) and, when the settings' guided_prior_weight is above 0, with the transformer's prior
        (`clip_guided_prior`), graded beside the unrefined picks of the same captions (`reranked_same`); and
        generate from random codes the same two ways (`random_codes_guided`, `random_codes_guided_prior`);
        guided_from ("both", "pick", "random") keeps the pick's columns or the random codes' alone. With them
        `clip_score` (the reranker's mean score of each column's images) and `refined_moved` (the share of each
        column's refinements whose codes left their start's; refinement returns a dVAE's or VQ's start unchanged
        when no step improves its objective).
    method: "ar" (the transformer) or "unclip" (DALL-E 2's prior and decoder), as `python -m sample --method`.
    """
    from tqdm.auto import tqdm

    if pipe.clip is None:
        raise UserError(NO_RERANKER)
    split_data = GradedSplit(judge, data, split, n, seed, pipe.cfg.data.image_size)
    captions, real, real_emb, grader = split_data.captions, split_data.real, split_data.real_emb, split_data.grader

    s = pipe.settings(num_images=1)
    reranked, first, every, distinct = [], [], [], []
    refined = RefinedColumns("reranked_same")  # the refined images, per column
    for i, caption in enumerate(tqdm(captions, desc="eval emoji", disable=None if progress else True)):
        generator = torch.Generator().manual_seed(s.seed + i)
        # ids (N, n), images (N, 3, S, S), CLIP's scores (N,)
        ids, images, scores = pipe.candidates([(caption, 1.0)], s, generator, method=method)
        best = int(scores.argmax())
        if i < guided:
            refined.add(
                pipe, ids[best : best + 1], float(scores[best]), caption, s, generator, guided_from, grade=lambda x: x
            )
        reranked.append(images[best])
        first.append(images[0])
        every.append(images)
        distinct.append(len(distinct_first(images)) / len(images))
    if grid:
        k = min(GRID_COLUMNS, len(captions))
        images = torch.cat([torch.stack(reranked[:k]), real[:k]])
        with said_if_unwritable(grid, "--grid"):
            save_grid(images, grid, nrow=k, captions=captions[:k] + ["(real)"] * k)
    rows = list(range(len(captions)))
    every_rows = [i for i in rows for _ in range(s.candidates)]
    every_emb = judge.embed_images(torch.cat(every))  # (captions * N, e)
    out = {
        "reranked": grader.grade(torch.stack(reranked), rows, real_emb),
        "first": grader.grade(torch.stack(first), rows, real_emb),
        # every candidate, unranked: the sampler's own quality over N times the captions (decoders compared)
        "every": grader.grade_embedded(every_emb, every_rows, real_emb),
        "judge_best": grader.best_of(every_emb, every_rows, s.candidates),
        **split_data.references(),
        # the real images as the model's image tokenizer draws them (encode, decode): the most a transformer that
        # drew each caption's own codes could reach (LlamaGen's and VQGAN's reconstruction FID, here as CMMD)
        "reconstructed": grader.grade(pipe.as_drawn(real), rows, real_emb),
    }
    out["distinct"] = sum(distinct) / len(distinct)  # the mean share of a caption's candidates that differ
    if guided:
        rows = list(range(min(guided, len(captions))))
        out["reranked_same"] = grader.grade(torch.stack(reranked[: len(rows)]), rows, real_emb)
        for name, images in refined.graded.items():
            out[name] = grader.grade(torch.stack(images), rows, real_emb)
        out.update(refined.means())
    return {**out, **split_data.shown()}


def main(argv: list[str] | None = None) -> int:
    from ..pipeline.bundle import SHIPPED_JUDGE, bundle_path, load_clip
    from ..pipeline.pipeline import Pipeline, check_seed

    p = argparse.ArgumentParser(prog="python -m dalle_mini_impl.eval emoji", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="emoji", help="a shipped bundle's name or a bundle folder (default: emoji)")
    p.add_argument(
        "--judge",
        default=SHIPPED_JUDGE,
        help=f"an evaluation CLIP: a folder python -m train.judge wrote, or a shipped judge's name (default: "
        f"{SHIPPED_JUDGE})",
    )
    p.add_argument("--data", required=True, help="an emoji-styles folder: train/ and the graded split")
    p.add_argument("--split", default="test", help="the split whose captions are drawn (default: test)")
    p.add_argument("--candidates", type=int, default=8, help="samples per caption; the reranker keeps one")
    p.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="seed of sampling, of --n's draw and of R-precision's names; several: one run each, and their mean",
    )
    p.add_argument("--n", type=int, default=None, help="judge N captions of the split, drawn with the seed")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="sample.KEY=VALUE",
        help="sample with another setting than the bundle's, e.g. --set sample.guidance_scale=2 (repeatable)",
    )
    add_guided_arguments(p, "captions")
    add_method_argument(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="as python -m sample's")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument(
        "--grid",
        default=None,
        metavar="PNG",
        help="also draw the first 8 captions' picks above the real (first seed's)",
    )
    p.add_argument(
        "--references-only",
        action="store_true",
        help="grade only the real images and the two references (no model sampled): the judge's own numbers",
    )
    args = p.parse_args(argv)
    judge_dir, judge_cfg = check_judge(args.judge)
    for seed in args.seed:
        check_seed(seed)
    if len(set(args.seed)) < len(args.seed):
        raise UserError(f"--seed repeats a seed ({' '.join(map(str, args.seed))}); give each seed once")
    check_out_file(args.out)
    check_out_file(args.grid, "--grid", "grid.png")
    if args.references_only:
        ignored = [
            option
            for option, given in (
                ("--model", args.model != "emoji"),
                ("--candidates", args.candidates != 8),
                ("--set", bool(args.overrides)),
                ("--guided", bool(args.guided)),
                ("--guided-from", args.guided_from != "both"),
                ("--method", args.method != "ar"),
                ("--dtype", args.dtype != "fp32"),
                ("--grid", args.grid is not None),
            )
            if given
        ]
        if ignored:
            them = "it" if len(ignored) == 1 else "them"
            raise UserError(f"--references-only samples no model: {', '.join(ignored)} would do nothing; drop {them}")
        return print_references(args, judge_dir, judge_cfg)
    if args.candidates < 1:
        raise UserError(f"--candidates is {args.candidates}; sample at least 1 per caption")
    if Path(judge_dir).resolve() == bundle_path(args.model).resolve():
        raise UserError("--judge is the model itself; grade with an evaluation CLIP trained by python -m train.judge")
    require_reranker(args.model, NO_RERANKER)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    check_not_shapes(pipe.cfg, f"model '{args.model}'")
    check_method(pipe, args.method, args.guided, args.guided_from)
    set_sampling(pipe, args.overrides, EVAL_OWN_SETTINGS, sample_uses(args.method, args.guided))
    pipe.cfg.sample.candidates = args.candidates
    judge = load_clip(judge_dir, device=args.device)
    learned = split_parts(judge_cfg.data.split)
    if pipe.clip is not None and judge.fingerprint() == pipe.clip.fingerprint():
        raise UserError(
            f"--judge '{args.judge}' is the model's own CLIP; grade with one trained by python -m train.judge"
        )
    t0 = time.perf_counter()

    def run(seed: int) -> dict:
        pipe.cfg.sample.seed = seed
        grid = args.grid if seed == args.seed[0] else None  # the first seed's picks
        return evaluate(
            pipe,
            judge,
            args.data,
            args.split,
            args.n,
            seed,
            grid,
            guided=args.guided,
            method=args.method,
            guided_from=args.guided_from,
        )

    result = per_seed(args.seed, run)
    summary = {
        "model": str(args.model),
        "method": args.method,
        "judge": str(args.judge),
        "split": args.split,
        "candidates": args.candidates,
        "seed": seed_key(args.seed),
        "judge_learned_from_split": args.split in learned,
        **sample_settings(pipe.cfg.sample, args.guided_from),
        "dtype": args.dtype,
        "batch_size": pipe.cfg.sample.batch_size,
        "seconds": round(time.perf_counter() - t0, 1),
        **result,
    }
    return emit(summary, args.out)


def judge_reconstructions(tokenizer, judge, judge_cfg, data: str, split: str, batch_size: int = 64) -> dict:
    """An image tokenizer alone, graded as `eval emoji` grades its `reconstructed` reference: every image of the
    split encoded and decoded (`reconstructed`) beside the real images (`real`), by the judge (a ClipScorer; its
    config `check_judge`'s), with R-precision's names drawn with seed 0. How two tokenizers are compared before any
    transformer is trained."""
    split_data = GradedSplit(judge, data, split, None, 0, judge_cfg.data.image_size)
    drawn = []
    with torch.inference_mode():
        for chunk in split_data.real.split(batch_size):
            drawn.append(tokenizer.decode(tokenizer.encode(chunk)).float().clamp(0, 1))
    rows = list(range(len(split_data.captions)))
    return {
        "reconstructed": split_data.grader.grade(torch.cat(drawn), rows, split_data.real_emb),
        "real": split_data.grader.grade(split_data.real, rows, split_data.real_emb),
        "judge_learned_from_split": split in split_parts(judge_cfg.data.split),
    }


def print_references(args, judge_dir: str, judge_cfg: RunConfig) -> int:
    """--references-only: the judge on the split's real images, same_style_random and copy_other_style, with
    the styles it picks for the real images (`real_style_picks`: {true style: {picked style: count}})."""
    from ..pipeline.bundle import load_clip

    judge = load_clip(judge_dir, device=args.device)
    t0 = time.perf_counter()

    def run(seed: int) -> dict:
        split_data = GradedSplit(judge, args.data, args.split, args.n, seed, judge_cfg.data.image_size)
        return {
            **split_data.references(),
            "real_style_picks": split_data.grader.confusion(split_data.real_emb, range(len(split_data.captions))),
            **split_data.shown(),
        }

    summary = {
        "judge": str(args.judge),
        "split": args.split,
        "seed": seed_key(args.seed),
        "judge_learned_from_split": args.split in split_parts(judge_cfg.data.split),
        **per_seed(args.seed, run),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return emit(summary, args.out)


def seed_key(seeds: Sequence[int]) -> int | list[int]:
    """The summary's `seed`: the seed itself for one (as before several were taken), else the list."""
    return seeds[0] if len(seeds) == 1 else list(seeds)


def per_seed(seeds: Sequence[int], run: Callable[[int], dict]) -> dict:
    """What the command prints for its --seed: run(seed)'s result for one, over_seeds' for several."""
    return run(seeds[0]) if len(seeds) == 1 else over_seeds(seeds, run)


def over_seeds(seeds: Sequence[int], run: Callable[[int], dict]) -> dict:
    """{"per_seed": {seed: run(seed)}, "mean": ..., "range": ...}: `mean` and `range` ([smallest, largest])
    are taken over every number at the same place in every result (the columns' metrics, `distinct`, counts),
    nested as in a result; what is not a number, or is not in every result (the styles picked for other
    captions), is left out."""
    results = [run(seed) for seed in seeds]

    def fold(values: list, how: Callable[[list[float]], object]):
        if all(isinstance(v, dict) for v in values):
            if any(v.keys() != values[0].keys() for v in values[1:]):
                return None
            folded = {key: fold([v[key] for v in values], how) for key in values[0]}
            return {key: value for key, value in folded.items() if value is not None and value != {}}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return how([float(v) for v in values])
        return None

    return {
        "per_seed": {str(seed): result for seed, result in zip(seeds, results)},
        "mean": fold(results, lambda v: sum(v) / len(v)),
        "range": fold(results, lambda v: [min(v), max(v)]),
    }


def check_judge(judge: str) -> tuple[str, RunConfig]:
    """The folder `--judge` names (a shipped judge's name resolved, `judge_path`) and its config, once the checks
    every command that grades with it makes have passed: the folder exists and its CLIP was not trained on
    shapes."""
    from ..pipeline.bundle import judge_path, read_bundle_config

    path = judge_path(judge)
    cfg = read_bundle_config(path)
    check_not_shapes(cfg, f"--judge '{judge}'")
    return str(path), cfg


def check_not_shapes(cfg, what: str) -> None:
    """A model or judge trained on shapes reads no emoji caption (its tokenizer and CLIP know the shapes grammar)."""
    if cfg.data.source == "shapes":
        raise UserError(
            f"{what} was trained on shapes; eval emoji grades with and for models of emoji-styles captions "
            "(grade a shapes model with python -m dalle_mini_impl.eval shapes)"
        )


def emit(summary: dict, out: str | None) -> int:
    """Print the summary as one JSON line and, with --out, write it indented too."""
    if out:
        write_result(out, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
