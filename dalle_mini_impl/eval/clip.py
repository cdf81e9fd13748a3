"""CLIP evaluation: text<->image retrieval recall@1/5/10, and zero-shot color/shape/position on shapes.

    python -m dalle_mini_impl.eval clip --model runs/shapes --data shapes --split validation
        [--set data.shapes.val_size=500] [--limit N]

prints one JSON object. Retrieval follows CLIP's and open_clip's evaluation: every image of the split
against every caption of the split, by cosine similarity. Captions repeat among renders ("a red
circle" describes many images), so a retrieved item whose caption equals the query's caption counts
as a hit ("hit_rule": "same caption"), not only the query's own pair. On shapes it also prints
"t2i_R@1_ceiling", the R@1 an ideal scorer would reach under that rule (`same_caption_ceiling`: an
image with another caption may satisfy the query too), and zero-shot accuracy (Radford et al. 2021,
prompt ensembling) on one-object scenes of the split: color, shape and 3x3 position, each label
embedded under templates that name the other attributes.

`retrieval_metrics` and `zero_shot_shapes` are the library functions the training loop calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from ..config import ShapesConfig, apply_overrides
from ..data.images import from_uint8
from ..errors import UserError, run_cli
from ..shapes.generator import COLORS, SHAPES, WHERES, Obj, cell_of, render, sample_scene, split_seed
from . import check_counts, check_data_overrides, check_finite

KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


def _recalls(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """Fraction of queries (n, e) with a same-label key among their top-k keys (n, e), per k."""
    n = queries.shape[0]
    top = min(max(ks), keys.shape[0])
    hits = torch.zeros(len(ks))
    for start in range(0, n, 1024):  # (1024, n) similarities at a time: memory stays flat in n
        sims = queries[start : start + 1024] @ keys.T
        best = sims.topk(top, dim=1).indices  # (q, top)
        same = labels[best] == labels[start : start + 1024, None]  # (q, top)
        hits += torch.stack([same[:, :k].any(1).float().sum() for k in ks])
    return (hits / max(n, 1)).tolist()


def retrieval_metrics(
    image_feats: torch.Tensor, text_feats: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall@k both ways over pairs (image_feats[i], text_feats[i], captions[i]), features normalised.

    A retrieved item is a hit when its caption equals the query's. Returns flat scalars:
    {"t2i_R@1", ..., "i2t_R@1", ..., "n"}.
    """
    if not (image_feats.shape[0] == text_feats.shape[0] == len(captions)):
        raise ValueError(
            f"retrieval_metrics needs one caption per pair: {image_feats.shape[0]} images, "
            f"{text_feats.shape[0]} texts, {len(captions)} captions"
        )
    _, inverse = np.unique(np.asarray(list(captions), dtype=object).astype(str), return_inverse=True)
    labels = torch.from_numpy(inverse.reshape(-1))  # (n,) caption ids
    image_feats, text_feats = image_feats.float(), text_feats.float()
    out: dict[str, float] = {}
    for name, queries, keys in (("t2i", text_feats, image_feats), ("i2t", image_feats, text_feats)):
        for k, r in zip(ks, _recalls(queries, keys, labels, ks)):
            out[f"{name}_R@{k}"] = r
    out["n"] = float(len(captions))
    return out


def same_caption_ceiling(images: torch.Tensor, captions: Sequence[str]) -> float:
    """The text->image R@1 of an ideal scorer on shapes pairs, under the same-caption hit rule.

    Captions do not pin an image down: "A to the left of B" may also show A above B, so an image with
    another caption can satisfy the query as well as the query's own. An ideal scorer ranks every image
    that the shapes judge accepts for the query alike; its R@1 is then, averaged over queries, the
    share of those images that carry the query's caption. images (n, 3, S, S) in [0, 1].
    """
    return ceiling_of(objects_in(images), captions, images.shape[-1])


def objects_in(images: torch.Tensor) -> list:
    """The shapes judge's objects found in each image (n, 3, S, S) in [0, 1]."""
    from ..shapes.judge import find_objects

    pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # (n, S, S, 3)
    return [find_objects(image) for image in pixels]


def ceiling_of(found: list, captions: Sequence[str], S: int) -> float:
    """`same_caption_ceiling` from the objects found in each image (`objects_in`), which a pass over a split
    collects batch by batch instead of keeping its images."""
    from ..shapes.generator import parse_caption
    from ..shapes.judge import judge_found

    counts = Counter(captions)
    accepted = {}
    for caption in counts:
        stated = parse_caption(caption)  # once per distinct caption, not per image
        accepted[caption] = sum(judge_found(stated, f, S).ok for f in found)
    ceiling = sum(counts[c] / max(accepted[c], counts[c]) for c in captions)
    return ceiling / max(len(captions), 1)


# ----------------------------------------------------------------------------------------------
# Zero-shot on shapes
# ----------------------------------------------------------------------------------------------


def one_object_scenes(cfg: ShapesConfig, image_size: int, split: str, n: int) -> tuple[torch.Tensor, list[Obj]]:
    """The first n one-object scenes of a shapes split: images (n, 3, S, S) in [0, 1] and their objects.

    Scene i is the split's example i (the same seed rule as `dalle_mini_impl.shapes.generator`); two-object
    scenes are passed over. The objects carry every attribute, including what the caption left out.
    """
    seed = split_seed(cfg, split)
    images, objects = [], []
    index = 0
    while len(objects) < n and index < 50 * n + 100:
        scene = sample_scene(np.random.default_rng([seed, index]), image_size, cfg, split)
        index += 1
        if len(scene.objects) == 1:
            images.append(from_uint8(render(scene, image_size)))
            objects.append(scene.objects[0])
    if not objects:
        raise UserError(f"shapes split '{split}' has no one-object scenes; set data.shapes.two_object_p below 1")
    return torch.stack(images), objects


def _accuracy(probs: torch.Tensor, labels: Sequence[str], truth: Sequence[str]) -> float:
    predicted = [labels[i] for i in probs.argmax(1).tolist()]
    return sum(p == t for p, t in zip(predicted, truth)) / max(len(truth), 1)


def zero_shot_shapes(scorer, images: torch.Tensor, objects: Sequence[Obj]) -> dict[str, float]:
    """Zero-shot accuracy of a `ClipScorer` on one-object shapes images: {"color", "shape", "position", "n"}.

    Each attribute's labels are ensembled over templates that fill in the other attributes, e.g.
    color: "a {} circle" | "a {} square" | "a {} triangle".
    """
    S = images.shape[-1]
    colors, shapes, wheres = list(COLORS), list(SHAPES), list(WHERES)
    tasks = {
        "color": (colors, [f"a {{}} {s}" for s in shapes], [o.color for o in objects]),
        "shape": (shapes, ["a {}"] + [f"a {c} {{}}" for c in colors], [o.shape for o in objects]),
        "position": (wheres, [f"a {s} {{}}" for s in shapes], [cell_of(o.cx, o.cy, S) for o in objects]),
    }
    out = {}
    for name, (labels, templates, truth) in tasks.items():
        out[name] = _accuracy(scorer.classify(images, labels, templates), labels, truth)
    out["n"] = float(len(objects))
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dalle_mini_impl.eval clip", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="a shipped bundle's name or a folder with config.json, text.model, clip.safetensors",
    )
    p.add_argument("--data", default=None, help="data source (default: the bundle's data.source)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the bundle's data.val_split)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N pairs only")
    p.add_argument("--zero-shot", type=int, default=300, metavar="N", help="one-object scenes on shapes (0: off)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..data.streams import ExampleStream
    from ..pipeline.bundle import load_clip, read_bundle_config

    args = _parser().parse_args(argv)
    if args.limit is not None and args.limit < 2:
        raise UserError(f"--limit is {args.limit}; retrieval needs at least 2 pairs")
    check_counts(batch_size=(args.batch_size, 1), zero_shot=(args.zero_shot, 0))  # -1 was taken as off
    check_data_overrides(args.overrides, "clip")
    cfg = apply_overrides(read_bundle_config(args.model), args.overrides)
    if args.data is not None:
        cfg.data.source = args.data
    split = args.split or cfg.data.val_split
    scorer = load_clip(args.model, device=args.device)
    scorer.batch_size = args.batch_size
    # the split's images are embedded a batch at a time and let go (all of them were held as floats, and stacked
    # again); on shapes, the judge's objects in them are kept for the ceiling
    shapes = cfg.data.source == "shapes"
    embedded, found, captions, buffer = [], [], [], []

    def flush() -> None:
        batch = torch.stack(buffer)
        embedded.append(scorer.embed_images(batch))
        found.extend(objects_in(batch) if shapes else [])
        buffer.clear()

    stream = ExampleStream(cfg.data, split, train=False, seed=cfg.seed)
    check_finite(stream, args.limit)
    for example in stream:
        if args.limit is not None and len(captions) >= args.limit:
            break
        buffer.append(example["image"])
        captions.append(example["caption"])
        if len(buffer) == args.batch_size:
            flush()
    if buffer:
        flush()
    if len(captions) < 2:
        raise UserError(f"split '{split}' of '{cfg.data.source}' has {len(captions)} pairs; retrieval needs at least 2")
    result: dict = {"model": str(args.model), "data": cfg.data.source, "split": split, "hit_rule": "same caption"}
    result.update(retrieval_metrics(torch.cat(embedded), scorer.embed_texts(captions), captions))
    result["n"] = len(captions)
    if shapes:
        result["t2i_R@1_ceiling"] = ceiling_of(found, captions, cfg.data.image_size)
    if shapes and args.zero_shot > 0:
        zs_images, objects = one_object_scenes(cfg.data.shapes, scorer.image_size, split, args.zero_shot)
        zero_shot = zero_shot_shapes(scorer, zs_images, objects)
        result["zero_shot"] = {k: round(v, 4) for k, v in zero_shot.items()} | {"n": len(objects)}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
