"""unCLIP's uses on shapes, judged by the shapes judge: variations, text diffs, interpolations.

    python -m dalle_mini_impl.eval unclip --model shapes --n 300 --seed 0 [--diffs 100] [--pairs 50]
        [--text-diff-scales 0.2,0.3,0.4]      # text diffs at each scale (default: the bundle's)

Sources are renders of scenes from the `validation` split (one- and two-object in the spec's mix, whatever
mix the bundle was trained on), half drawn by this project's renderer (antialiased, `shapes.generator.render`)
and half by an independent one (PIL's ImageDraw: hard edges, the spec's geometry), so the numbers do not rest
on one renderer's pixels.

  variations     each of n sources: `--num-images` (4) variations, the best of `--candidates` (8) by CLIP
                 image similarity. Reported: the judge's acceptance of the top-1 and of every kept
                 variation under the source's caption; the mean share of a variation's codes that differ
                 from the source's own encoding (a copy has 0); the sources whose kept variations are all
                 identical; and, as reference points, the judge on the sources themselves (the ceiling), on
                 a variation of another source (the floor: an image of the data that ignores its source),
                 and how often CLIP's embedding of a two-object source (as given; the decoder reads it as the
                 image tokenizer draws it, which CLIP reads within a few points the same) is nearer its
                 caption than the same caption with the relation flipped (`clip_prefers_true_relation`: what
                 the embedding knows of which object is where; 50 is chance), how often it is nearer its
                 caption than every caption with one object's shape swapped (`clip_prefers_true_shapes`), and
                 the two-object top-1 on the sources where it is and where it is not
                 (`two_top1_by_clip_shapes`: whether CLIP or the decoder loses a shape); and the top-1 on the
                 sources that show a held-out color-shape pair (`shapes.held_out`: every part of the bundle
                 trained without it; the `validation` split draws it) and on the others (`top1_by_held_out_pair`).
                 A bundle with `unclip.grid` also gives the decoder CLIP's spatial features of the source
                 (`Pipeline.variations`).
  text diffs     `--diffs` one-object sources whose caption states the color: the image's embedding turned
                 toward text(caption with another color) - text(caption), at each scale; the top-1 judged
                 under the edited caption (and, for reference, under the source's).
  interpolations `--pairs` pairs of one-object sources, 5 steps: the top-1 at each step judged under the
                 nearer end's caption (either at the middle).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from dalle_mini_impl.config import ShapesConfig
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.eval import check_counts, set_sampling, write_result
from dalle_mini_impl.files import check_out_file
from dalle_mini_impl.shapes.generator import (
    COLORS,
    extent,
    format_caption,
    parse_caption,
    parse_held_out,
    render,
    sample_scene,
)
from dalle_mini_impl.shapes.judge import judge
from dalle_mini_impl.shapes.negatives import every_edit

STEPS = 5
OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def render_pil(scene, S: int) -> np.ndarray:
    """The scene drawn by PIL's ImageDraw with hard edges: the spec's shapes, sizes and colors, another rasteriser."""
    im = Image.new("RGB", (S, S), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        h = extent(o.size, S) / 2
        box = (o.cx - h, o.cy - h, o.cx + h - 1, o.cy + h - 1)
        color = tuple(COLORS[o.color])
        if o.shape == "circle":
            draw.ellipse(box, fill=color)
        elif o.shape == "square":
            draw.rectangle(box, fill=color)
        else:  # apex up, base as wide as the triangle is tall
            draw.polygon([(o.cx, o.cy - h), (o.cx + h, o.cy + h), (o.cx - h, o.cy + h)], fill=color)
    return np.asarray(im)


def sources(
    n: int, seed: int, held_out: list[str], S: int, one_object_with_color: bool = False
) -> list[tuple[str, np.ndarray, str]]:
    """n (caption, uint8 image, renderer) of validation scenes; alternately rendered by ours and PIL's.

    A function of (n, seed, held-out pairs, S) alone, like `eval shapes`' prompts: the spec's scene mix, not
    the one a bundle was trained on (a decoder trained on more two-object scenes is graded on the same sources).
    """
    cfg = ShapesConfig(held_out=list(held_out))
    out, i = [], 0
    while len(out) < n:
        scene = sample_scene(np.random.default_rng([seed, 31, i]), S, cfg, "validation")
        i += 1
        if one_object_with_color and (scene.stated["kind"] != "one" or scene.stated["objects"][0]["color"] is None):
            continue
        which = "ours" if len(out) % 2 == 0 else "pil"
        out.append((scene.caption, render(scene, S) if which == "ours" else render_pil(scene, S), which))
    return out


def _share(flags: list[bool]) -> float | None:
    """The percentage of true flags; None over none (a group no source fell in), as `eval shapes` reports it."""
    return round(100.0 * sum(flags) / len(flags), 1) if flags else None


def _by_renderer(flags: list[bool], renderers: list[str]) -> dict:
    return {"all": _share(flags)} | {
        r: _share([f for f, w in zip(flags, renderers) if w == r]) for r in ("ours", "pil")
    }


def variations(pipe, srcs, settings: dict, progress: bool) -> dict:
    h, w = pipe.grid
    pils = [Image.fromarray(img) for _, img, _ in srcs]
    kept = pipe.variations(pils, progress=progress, **settings)
    captions, renderers = [c for c, _, _ in srcs], [r for _, _, r in srcs]
    top1 = [judge(np.asarray(k[0].image), c).ok for k, c in zip(kept, captions)]
    every = [judge(np.asarray(r.image), c).ok for k, c in zip(kept, captions) for r in k]
    floor = [judge(np.asarray(kept[(i + 1) % len(kept)][0].image), c).ok for i, c in enumerate(captions)]
    read = [judge(img, c) for c, img, _ in srcs]  # the sources themselves: the ceiling, and what they show
    ceiling = [v.ok for v in read]
    # a source showing a color-shape pair the bundle never trained on (shapes.held_out; "validation" draws them)
    held_pairs = set(parse_held_out(pipe.cfg.data.shapes.held_out))
    unseen = [any((o.color, o.shape) in held_pairs for o in v.objects) for v in read]
    changed, identical = [], 0
    for pil, k in zip(pils, kept):
        own = pipe.encode_image(pil).view(-1)
        changed += [float((r.ids.view(-1) != own).float().mean()) for r in k]
        identical += len(k) > 1 and all(torch.equal(r.ids, k[0].ids) for r in k)
    kinds = ["one" if parse_caption(c)["kind"] == "one" else "two" for c in captions]
    two = [(c, p) for c, p, k in zip(captions, pils, kinds) if k == "two"]
    relation, shapes = [], []
    if two:
        emb = pipe.image_embeddings([p for _, p in two])  # (m, e)
        texts = pipe.clip.embed_texts([c for c, _ in two] + [flip_relation(c) for c, _ in two]).view(2, len(two), -1)
        true = (emb * texts[0]).sum(-1)  # (m,)
        relation = (true > (emb * texts[1]).sum(-1)).tolist()
        # every shape stated, so four swaps per caption (two objects, two other shapes each), in one batch
        swapped = pipe.clip.embed_texts([x for c, _ in two for x in swap_shapes(c)]).view(len(two), 4, -1)
        shapes = (true > torch.einsum("me,mke->mk", emb, swapped).amax(-1)).tolist()
    top1_two = [f for f, k in zip(top1, kinds) if k == "two"]
    return {
        "n": len(srcs),
        "top1": _by_renderer(top1, renderers)
        | {kind: _share([f for f, k in zip(top1, kinds) if k == kind]) for kind in ("one", "two")},
        "every_kept": _share(every),
        "codes_changed_percent": round(100.0 * float(np.mean(changed)), 1),
        "sources_with_identical_variations": int(identical),
        "ceiling_sources": _by_renderer(ceiling, renderers),
        "floor_other_sources_variation": _share(floor),
        "clip_prefers_true_relation": _share(relation),
        "clip_prefers_true_shapes": _share(shapes),
        "top1_by_held_out_pair": {
            verdict: {
                "n": sum(u == shows for u in unseen),
                "top1": _share([f for f, u in zip(top1, unseen) if u == shows]),
            }
            for verdict, shows in (("shown", True), ("not_shown", False))
        },
        "two_top1_by_clip_shapes": {
            verdict: {
                "n": sum(s == right for s in shapes),
                "top1": _share([f for f, s in zip(top1_two, shapes) if s == right]),
            }
            for verdict, right in (("right", True), ("wrong", False))
        },
    }


def flip_relation(caption: str) -> str:
    """A two-object caption with its relation turned around ("to the left of" -> "to the right of", ...)."""
    stated = parse_caption(caption)
    return format_caption(dict(stated, relation=OPPOSITE[stated["relation"]]))


def swap_shapes(caption: str) -> list[str]:
    """A caption with one object's shape word changed to another shape, every way (two per object): the hard
    negatives' shape edits (`shapes.negatives.every_edit`)."""
    return every_edit(caption, kinds=["shape"])


def recolor(caption: str, rng: np.random.Generator, held_out: list[str]) -> str:
    """The one-object caption with its color word replaced by another color (never a held-out pair)."""
    stated = parse_caption(caption)
    obj = stated["objects"][0]
    options = [c for c in COLORS if c != obj["color"] and f"{c} {obj['shape']}" not in held_out]
    edited = dict(stated, objects=[dict(obj, color=str(rng.choice(options)))])
    return format_caption(edited)


def text_diffs(pipe, srcs, scales: list[float], settings: dict, seed: int, progress: bool) -> dict:
    rng = np.random.default_rng([seed, 41])
    held_out = pipe.cfg.data.shapes.held_out
    edits = [recolor(c, rng, held_out) for c, _, _ in srcs]
    out = {"n": len(srcs)}
    bar = tqdm(total=len(scales) * len(srcs), desc="text diffs", disable=None if progress else True)
    for scale in scales:
        edited_ok, source_ok = [], []
        for (caption, img, _), edit in zip(srcs, edits):
            kept = pipe.variations(
                [Image.fromarray(img)], text_diff=(caption, edit), text_diff_scale=scale, progress=False, **settings
            )[0]
            edited_ok.append(judge(np.asarray(kept[0].image), edit).ok)
            source_ok.append(judge(np.asarray(kept[0].image), caption).ok)
            bar.update()
        out[f"scale_{scale:g}"] = {"edited_caption": _share(edited_ok), "source_caption": _share(source_ok)}
    bar.close()
    return out


def interpolations(pipe, srcs, settings: dict, progress: bool) -> dict:
    pairs = [(srcs[2 * i], srcs[2 * i + 1]) for i in range(len(srcs) // 2)]
    per_step = [[] for _ in range(STEPS)]
    for (ca, ia, _), (cb, ib, _) in tqdm(pairs, desc="interpolations", disable=None if progress else True):
        steps = pipe.interpolate(Image.fromarray(ia), Image.fromarray(ib), STEPS, progress=False, **settings)
        for k, kept in enumerate(steps):
            t, image = kept[0].t, np.asarray(kept[0].image)
            ok_a, ok_b = judge(image, ca).ok, judge(image, cb).ok
            per_step[k].append(ok_a if t < 0.5 else ok_b if t > 0.5 else ok_a or ok_b)
    return {
        "pairs": len(pairs),
        "nearer_end_by_step": {f"t={k / (STEPS - 1):.2f}": _share(v) for k, v in enumerate(per_step)},
        "ends": _share(per_step[0] + per_step[-1]),
    }


def main(argv: list[str] | None = None) -> int:
    from dalle_mini_impl.config import EVAL_OWN_SETTINGS
    from dalle_mini_impl.pipeline.pipeline import Pipeline, check_seed

    parser = argparse.ArgumentParser(
        prog="python -m dalle_mini_impl.eval unclip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="a shipped bundle's name or a bundle folder (default: shapes)")
    parser.add_argument("--n", type=int, default=300, help="variation sources")
    parser.add_argument("--diffs", type=int, default=100, help="text-diff sources (one-object, color stated)")
    parser.add_argument("--pairs", type=int, default=50, help="interpolation pairs (one-object)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sources and of sampling")
    parser.add_argument("--num-images", type=int, default=4, help="variations kept per source")
    parser.add_argument("--candidates", type=int, default=8, help="variations drawn per source, ranked by CLIP")
    parser.add_argument("--text-diff-scales", default=None, help="comma list of scales (default: the bundle's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="sample.KEY=VALUE")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    check_seed(args.seed)
    check_counts(n=(args.n, 0), diffs=(args.diffs, 0), pairs=(args.pairs, 0))
    if args.n == 1:
        raise UserError("--n is 1; use 0 or at least 2 sources (the floor grades a source against another's variation)")
    check_out_file(args.out)
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    if pipe.cfg.data.source != "shapes":
        raise UserError(f"model '{args.model}' was not trained on shapes; the judge only reads shapes images")
    pipe.require_unclip("eval unclip")  # before any work, naming this command (not the sample CLI's flags)
    own = {**EVAL_OWN_SETTINGS, "sample.num_images": "use --num-images"}
    set_sampling(pipe, args.overrides, own, {"variations", "text_diff"})
    scales = [pipe.cfg.sample.text_diff_scale]
    if args.text_diff_scales:
        try:
            scales = [float(x) for x in args.text_diff_scales.split(",")]
        except ValueError:
            raise UserError(f"--text-diff-scales '{args.text_diff_scales}' is not a comma list of numbers") from None
    S, held_out = pipe.cfg.data.image_size, pipe.cfg.data.shapes.held_out
    settings = dict(num_images=args.num_images, candidates=args.candidates, seed=args.seed)
    one = dict(settings, num_images=1)
    t0 = time.perf_counter()
    result = {"model": str(args.model or "shipped"), "seed": args.seed, **settings}
    result["guidance_scale"], result["temperature"] = pipe.cfg.sample.guidance_scale, pipe.cfg.sample.temperature
    result["variation_guidance_scale"] = pipe.cfg.sample.variation_guidance_scale or pipe.cfg.sample.guidance_scale
    if args.n:
        result["variations"] = variations(pipe, sources(args.n, args.seed, held_out, S), settings, progress=True)
    if args.diffs:
        srcs = sources(args.diffs, args.seed + 1, held_out, S, one_object_with_color=True)
        result["text_diffs"] = text_diffs(pipe, srcs, scales, one, args.seed, progress=True)
    if args.pairs:
        srcs = sources(2 * args.pairs, args.seed + 2, held_out, S, one_object_with_color=True)
        result["interpolations"] = interpolations(pipe, srcs, one, progress=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result)
    if args.out:
        write_result(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    print(text)
    return 0


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
