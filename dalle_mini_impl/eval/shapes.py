"""Does the model draw what the prompt says? The shapes judge over a fixed, seeded prompt set.

    python -m dalle_mini_impl.eval shapes --model RUN --n 300 --seed 0 [--candidates 8] [--guided 0]
        [--method unclip]                    # candidates from DALL-E 2's prior and decoder instead
        [--set sample.guidance_scale=3]    # sample with other settings than the bundle's

The prompt set (`prompt_set`) is a pure function of (n, seed, held-out combinations):
  - half are one-object prompts cycling through all 8 mixes of stated and omitted size, color and
    position (the shape is always stated), never a held-out color-shape combination;
  - a quarter are two-object prompts (both colors stated, sizes stated at random);
  - a quarter name only held-out color-shape combinations (`data.shapes.held_out` of the bundle),
    one- and two-object, so generalisation to unseen combinations is measured.
For each prompt the model samples `--candidates` images (the bundle's sampling settings, seed + prompt
index). Reported, per kind and per attribute (the judge's `summarize`): `random`, the first candidate
(candidates are independent draws, so the first is a random one); `clip_top1_of_8`, CLIP's best of the
first 8; `judge_best_of_8`, a candidate the judge itself accepts if any of the first 8 does (the
ceiling of any reranker of 8: how often the sampler draws a right image at all); and, with
`--candidates 32`, `clip_top1_of_32`. `--guided K` also refines CLIP's best of 8
with CLIP-guided optimisation (VQGAN+CLIP) for the first K prompts and reports `clip_guided`.
`--method unclip` draws every candidate through unCLIP's prior (a CLIP image embedding per candidate) and
decoder, with the same prompts, seeds and reranking, so its columns compare with the default method's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dalle_mini_impl.data.images import distinct_first, to_uint8
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.files import check_out_file
from dalle_mini_impl.shapes.generator import COLORS, RELATIONS, SHAPES, SIZES, WHERES, format_caption, parse_held_out
from dalle_mini_impl.shapes.judge import judge, summarize

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

NO_RERANKER = "this model has no CLIP (clip.safetensors) to rerank with; eval shapes judges CLIP's top-1"
KINDS = ("one", "two", "heldout")


def _combos(held_out: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(seen, held-out) color-shape pairs."""
    held = {tuple(h.split()) for h in held_out}
    every = [(c, s) for c in COLORS for s in SHAPES]
    return [p for p in every if p not in held], [p for p in every if p in held]


def prompt_set(n: int, seed: int, held_out: list[str]) -> list[tuple[str, str]]:
    """(kind, prompt) pairs: n prompts, half one-object, a quarter two-object, a quarter held-out."""
    rng = np.random.default_rng([seed, 7])
    seen, held = _combos(held_out)
    n_held = n // 4 if held else 0
    n_two = n // 4
    n_one = n - n_two - n_held
    out = []
    for i in range(n_one):
        mix = i % 8  # bits: size, color, where stated
        color, shape = seen[rng.integers(len(seen))]
        obj = {"size": rng.choice(SIZES) if mix & 1 else None, "color": color if mix & 2 else None, "shape": shape}
        where = str(rng.choice(WHERES)) if mix & 4 else None
        out.append(("one", format_caption({"kind": "one", "objects": [_str(obj)], "where": where})))
    for i in range(n_two + n_held):
        pool = seen if i < n_two else held
        if i >= n_two and i % 2 == 0:  # half the held-out prompts are one-object
            color, shape = pool[rng.integers(len(pool))]
            obj = {"size": rng.choice(SIZES) if rng.random() < 0.5 else None, "color": color, "shape": shape}
            where = str(rng.choice(WHERES)) if rng.random() < 0.5 else None
            out.append(("heldout", format_caption({"kind": "one", "objects": [_str(obj)], "where": where})))
            continue
        while True:
            (c1, s1), (c2, s2) = pool[rng.integers(len(pool))], pool[rng.integers(len(pool))]
            if c1 != c2:
                break
            if len({c for c, _ in pool}) < 2:  # every held-out pair shares one color: one-object only
                c2 = None
                break
        if c2 is None:
            obj = {"size": None, "color": c1, "shape": s1}
            out.append(("heldout", format_caption({"kind": "one", "objects": [obj], "where": None})))
            continue
        objs = [
            {"size": rng.choice(SIZES) if rng.random() < 0.5 else None, "color": c, "shape": s}
            for c, s in ((c1, s1), (c2, s2))
        ]
        caption = format_caption({"kind": "two", "objects": [_str(o) for o in objs], "relation": rng.choice(RELATIONS)})
        out.append(("two" if i < n_two else "heldout", caption))
    return out


def _str(obj: dict) -> dict:
    return {k: (None if v is None else str(v)) for k, v in obj.items()}


def _by_kind(verdicts: list, kinds: list[str]) -> dict:
    out = {"all": summarize(verdicts)}
    for kind in KINDS:
        chosen = [v for v, k in zip(verdicts, kinds) if k == kind]
        if chosen:
            out[kind] = summarize(chosen)
    return out


def evaluate(
    pipe,
    prompts: list[tuple[str, str]],
    candidates: int,
    guided: int,
    progress: bool = True,
    method: str = "ar",
    guided_from: str = "both",
) -> dict:
    """Judge the random candidate, CLIP's top-1 of 8 (and of 32), and optionally CLIP-guided refinement of that
    top-1 for the first `guided` prompts: by CLIP alone (`clip_guided`) and, when the settings'
    guided_prior_weight is above 0, with the transformer's prior too (`clip_guided_prior`), beside the
    unrefined top-1 on the same prompts (`top1_of_8_same_prompts`); and generation from random codes
    (`random_codes_guided`, `random_codes_guided_prior`); guided_from ("both", "pick", "random") keeps the
    top-1's columns or the random codes' alone. With them `clip_score` (CLIP's mean score of each column's
    images) and `refined_moved` (the share of each column's refinements whose codes left their start's)."""
    from tqdm.auto import tqdm

    if pipe.clip is None:
        raise UserError(NO_RERANKER)
    s = pipe.settings(candidates=candidates, num_images=1)
    columns: dict[str, list] = {"random": [], "clip_top1_of_8": [], "judge_best_of_8": [], "every_of_8": []}
    if candidates >= 32:
        columns["clip_top1_of_32"] = []
    guided_kinds, distinct = [], []
    refined = RefinedColumns("top1_of_8_same_prompts")  # verdicts of the refined images, per column
    kinds = [k for k, _ in prompts]
    for i, (kind, prompt) in enumerate(tqdm(prompts, desc="eval shapes", disable=None if progress else True)):
        generator = torch.Generator().manual_seed(s.seed + i)
        ids, images, scores = pipe.candidates(
            [(prompt, 1.0)], s, generator, method=method
        )  # (m, n), (m, 3, S, S), (m,)
        pixels = to_uint8(images)  # (m, S, S, 3)
        distinct.append(len(distinct_first(images[:8])) / len(images[:8]))
        first8 = [judge(image, prompt) for image in pixels[:8]]
        columns["random"].append(first8[0])
        columns["every_of_8"].extend(first8)  # all 8, unranked: the sampler's own accuracy over 8x the prompts
        columns["judge_best_of_8"].append(next((v for v in first8 if v.ok), first8[0]))
        best8 = int(scores[:8].argmax())
        columns["clip_top1_of_8"].append(first8[best8])
        if "clip_top1_of_32" in columns:
            columns["clip_top1_of_32"].append(judge(pixels[int(scores[:32].argmax())], prompt))
        if i < guided:
            guided_kinds.append(kind)
            refined.add(
                pipe, ids[best8 : best8 + 1], float(scores[best8]), prompt, s, generator, guided_from,
                grade=lambda image, prompt=prompt: judge(to_uint8(image), prompt),
            )  # fmt: skip
    out = {name: _by_kind(verdicts, kinds) for name, verdicts in columns.items() if name != "every_of_8"}
    out["every_of_8"] = _by_kind(columns["every_of_8"], [k for k in kinds for _ in range(8)])
    out["distinct_of_8"] = sum(distinct) / len(distinct)  # the mean share of a prompt's first 8 images that differ
    if guided_kinds:
        out["top1_of_8_same_prompts"] = _by_kind(columns["clip_top1_of_8"][: len(guided_kinds)], guided_kinds)
        for name, verdicts in refined.graded.items():
            out[name] = _by_kind(verdicts, guided_kinds)
        out.update(refined.means())
    return out


def main(argv: list[str] | None = None) -> int:
    from dalle_mini_impl.config import EVAL_OWN_SETTINGS
    from dalle_mini_impl.pipeline.pipeline import Pipeline, check_seed

    parser = argparse.ArgumentParser(
        prog="python -m dalle_mini_impl.eval shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, help="a shipped bundle's name or a bundle or run folder (default: shapes)"
    )
    parser.add_argument("--n", type=int, default=300, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt set and of sampling")
    parser.add_argument("--candidates", type=int, default=8, help="samples per prompt: 8, or 32 for top-1 of 32")
    add_guided_arguments(parser, "prompts")
    add_method_argument(parser)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="sample.KEY=VALUE",
        help="sample with another setting than the bundle's, e.g. --set sample.guidance_scale=3 (repeatable)",
    )
    parser.add_argument(
        "--held-out",
        default=None,
        metavar="PAIRS",
        help="comma list of the color-shape pairs the held-out prompts name, e.g. 'purple triangle,yellow square' "
        "(default: the bundle's data.shapes.held_out; a model fine-tuned on every pair has none of its own)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="as python -m sample's")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    check_seed(args.seed)
    check_out_file(args.out)
    if args.n < 4:
        raise UserError(f"--n is {args.n}; use at least 4 prompts so every kind is drawn")
    if args.candidates < 8:
        raise UserError(f"--candidates is {args.candidates}; CLIP's top-1 of 8 needs at least 8")
    if args.guided > args.n:  # it refined all --n prompts and said nothing
        raise UserError(f"--guided is {args.guided}, more than the --n {args.n} prompts; give at most {args.n}")
    require_reranker(args.model, NO_RERANKER)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    check_method(pipe, args.method, args.guided, args.guided_from)
    if pipe.cfg.data.source != "shapes":
        raise UserError(f"model '{args.model}' was not trained on shapes; the judge only reads shapes images")
    set_sampling(pipe, args.overrides, EVAL_OWN_SETTINGS, sample_uses(args.method, args.guided))
    pipe.cfg.sample.seed = args.seed
    if args.held_out is not None:
        pairs = parse_held_out([pair for pair in args.held_out.split(",") if pair.strip()])  # one sentence if bad
        pipe.cfg.data.shapes.held_out = [f"{color} {shape}" for color, shape in pairs]
    if not pipe.cfg.data.shapes.held_out:
        raise UserError("this model holds out no color-shape pair; name those to test: --held-out 'purple triangle'")
    prompts = prompt_set(args.n, args.seed, pipe.cfg.data.shapes.held_out)
    t0 = time.perf_counter()
    result = evaluate(pipe, prompts, args.candidates, args.guided, method=args.method, guided_from=args.guided_from)
    summary = {
        "model": str(args.model or "shipped"),
        "n": len(prompts),
        "seed": args.seed,
        "candidates": args.candidates,
        "method": args.method,
        "held_out": pipe.cfg.data.shapes.held_out,
        **sample_settings(pipe.cfg.sample, args.guided_from),
        "dtype": args.dtype,
        "batch_size": pipe.cfg.sample.batch_size,
        "seconds": round(time.perf_counter() - t0, 1),
        **result,
    }
    text = json.dumps(summary)
    if args.out:
        write_result(args.out, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    print(text)
    return 0


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
