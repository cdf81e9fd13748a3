"""Masked editing on shapes, judged by the shapes judge: redraw the half of a render that holds one object.

    python -m dalle_mini_impl.eval edit --model shapes --n 200 --seed 0 [--weights 0,0.5,1,2]

Sources are two-object renders from the `validation` split whose objects are both clear of the image's
middle line, half drawn by this project's renderer and half by an independent one (PIL's ImageDraw, as in
`eval unclip`), every relation equally often. The half that holds the second object is masked (the right
half for "to the left of", the left for "to the right of", the bottom for "above", the top for "below") and
the prompt is the caption with the second object's color or shape changed (never to a held-out pair), so a
good edit redraws that object as asked and keeps the first one and the relation. Each edit draws
`--candidates` (8) candidates once (`Pipeline.edit_candidates`); for each likelihood weight w the top-1 by
CLIP + w x the transformer's mean log-likelihood of the kept cells after the first redrawn one is judged
under the new caption, so every weight ranks the same candidates. Reported beside them: a random
candidate (the first drawn), and as reference points the source under its own caption (the ceiling: the
kept half is pasted back exactly) and under the new caption (the floor: an edit that changed nothing).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dalle_mini_impl.config import ShapesConfig
from dalle_mini_impl.data.images import to_uint8
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.eval import check_counts, set_sampling
from dalle_mini_impl.eval.unclip import _by_renderer, _share, render_pil
from dalle_mini_impl.shapes.generator import (
    COLORS,
    SHAPES,
    extent,
    format_caption,
    parse_caption,
    render,
    sample_scene,
)
from dalle_mini_impl.shapes.judge import judge

# the half that holds the second object of "A RELATION B", as (left, top, right, bottom) in halves of the image
SECOND_HALF = {
    "to the left of": (1, 0, 2, 2),
    "to the right of": (0, 0, 1, 2),
    "above": (0, 1, 2, 2),
    "below": (0, 0, 2, 1),
}


def clear_of_middle(scene, S: int) -> bool:
    """Both objects lie wholly inside their own half of the image, on either side of its middle line."""
    axis = "cx" if scene.stated["relation"] in ("to the left of", "to the right of") else "cy"
    a, b = scene.objects
    half = [extent(o.size, S) / 2 for o in (a, b)]
    lo, hi = sorted([(getattr(a, axis), half[0]), (getattr(b, axis), half[1])])
    return lo[0] + lo[1] <= S / 2 <= hi[0] - hi[1]


def edit_caption(stated: dict, rng: np.random.Generator, held_out: list[str]) -> str:
    """The two-object caption with the second object's color or its shape changed (never to a held-out pair,
    never to the first object's color)."""
    first, second = stated["objects"]
    options = [dict(second, color=c) for c in COLORS if c not in (first["color"], second["color"])]
    options += [dict(second, shape=s) for s in SHAPES if s != second["shape"]]
    options = [o for o in options if f"{o['color']} {o['shape']}" not in held_out]
    return format_caption(dict(stated, objects=[first, options[int(rng.integers(len(options)))]]))


def sources(n: int, seed: int, held_out: list[str], S: int) -> list[dict]:
    """n edits of validation renders, the relations in turn: {caption, edit, image (uint8), mask (PIL), renderer}.

    A function of (n, seed, held-out pairs, S) alone: the spec's scene mix, not the one a bundle was trained on.
    """
    cfg = ShapesConfig(held_out=list(held_out))
    rng = np.random.default_rng([seed, 53])
    relations = list(SECOND_HALF)
    out, i = [], 0
    while len(out) < n:
        scene = sample_scene(np.random.default_rng([seed, 51, i]), S, cfg, "validation")
        i += 1
        if scene.stated["kind"] != "two" or scene.stated["relation"] != relations[len(out) % 4]:
            continue
        if not clear_of_middle(scene, S):
            continue
        which = "ours" if len(out) // 4 % 2 == 0 else "pil"
        left, top, right, bottom = (v * S // 2 for v in SECOND_HALF[scene.stated["relation"]])
        mask = Image.new("L", (S, S), 0)
        mask.paste(255, (left, top, right, bottom))
        out.append(
            {
                "caption": scene.caption,
                "edit": edit_caption(scene.stated, rng, cfg.held_out),
                "image": render(scene, S) if which == "ours" else render_pil(scene, S),
                "mask": mask,
                "renderer": which,
            }
        )
    return out


def evaluate(pipe, edits: list[dict], weights: list[float], s, progress: bool = True) -> dict:
    """The judge's acceptance under the new caption of each weight's top-1, of a random candidate, and the
    reference points; by renderer."""
    renderers = [e["renderer"] for e in edits]
    top1 = {w: [] for w in weights}
    first, ceiling, floor = [], [], []
    for i, e in enumerate(tqdm(edits, desc="eval edit", disable=None if progress else True)):
        source = pipe.edit_source(Image.fromarray(e["image"]), e["mask"])
        generator = torch.Generator().manual_seed(s.seed + i)
        _, images, terms = pipe.edit_candidates(e["edit"], source, s, generator)
        ok = [judge(image, e["edit"]).ok for image in to_uint8(images)]
        for w in weights:
            top1[w].append(ok[int((terms[:, 0] + w * terms[:, 1]).argmax())])
        first.append(ok[0])
        ceiling.append(judge(e["image"], e["caption"]).ok)
        floor.append(judge(e["image"], e["edit"]).ok)
    relations = [parse_caption(e["caption"])["relation"] for e in edits]
    return {
        "top1_by_likelihood_weight": {f"{w:g}": _by_renderer(top1[w], renderers) for w in weights},
        # the bottom half ("above") has no kept cell after it: the term cannot change its ranking there
        "top1_by_relation": {
            f"{w:g}": {r: _share([f for f, x in zip(top1[w], relations) if x == r]) for r in SECOND_HALF}
            for w in weights
        },
        "random_candidate": _by_renderer(first, renderers),
        "source_under_its_caption": _by_renderer(ceiling, renderers),
        "source_under_the_new_caption": _by_renderer(floor, renderers),
    }


def main(argv: list[str] | None = None) -> int:
    from dalle_mini_impl.config import EVAL_OWN_SETTINGS
    from dalle_mini_impl.pipeline.pipeline import Pipeline

    parser = argparse.ArgumentParser(
        prog="python -m dalle_mini_impl.eval edit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="a shipped bundle's name or a bundle folder (default: shapes)")
    parser.add_argument("--n", type=int, default=200, help="edits (the four relations in turn)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sources and of sampling")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per edit")
    parser.add_argument(
        "--weights", default=None, help="comma list of likelihood weights (default: 0 and the bundle's)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="sample.KEY=VALUE")
    args = parser.parse_args(argv)
    check_counts(n=(args.n, 1), candidates=(args.candidates, 1))
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    if pipe.cfg.data.source != "shapes":
        raise UserError(f"model '{args.model}' was not trained on shapes; the judge only reads shapes images")
    set_sampling(pipe, args.overrides, EVAL_OWN_SETTINGS, {"edit"})
    s = pipe.settings(candidates=args.candidates, seed=args.seed)
    weights = sorted({0.0, s.edit_likelihood_weight})
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise UserError(f"--weights '{args.weights}' is not a comma list of numbers") from None
        if not all(math.isfinite(w) and w >= 0 for w in weights):  # as sample.edit_likelihood_weight is checked
            raise UserError(f"--weights '{args.weights}' has a weight that is negative or not finite; give 0 or more")
    t0 = time.perf_counter()
    edits = sources(args.n, args.seed, pipe.cfg.data.shapes.held_out, pipe.cfg.data.image_size)
    result = {"model": str(args.model or "shipped"), "seed": args.seed, "n": len(edits), "candidates": s.candidates}
    result |= {k: getattr(s, k) for k in ("guidance_scale", "guidance_until", "temperature")}
    result |= evaluate(pipe, edits, weights, s)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
