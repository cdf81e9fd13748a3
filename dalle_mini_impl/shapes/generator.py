"""The procedural `shapes` data set: captioned scenes of colored circles, squares and triangles.

Implements the shapes spec (docs/shapes.md, spec v1) exactly: six palette colors on white, three filled
shapes in two sizes, one-object scenes placed in a 3x3 grid and two-object scenes in a spatial
relation, with canonical captions that `parse_caption` reads back. Because every image comes from a
known scene, `dalle_mini_impl.shapes.judge` can decide whether an image satisfies a caption.

Every example is a pure function of (the split's seed, its index): example i is
`render(sample_scene(np.random.default_rng([split_seed(cfg, split), i]), S, cfg, split), S)`, the idea
behind counter-based generators (so captions alone can be drawn without rendering). So the stream is
deterministic, sharding (`i % num_shards == shard`) and resuming (`start=i`) are exact, and any single
example can be regenerated without replaying the ones before it.

Usage:
    from dalle_mini_impl.config import ShapesConfig
    from dalle_mini_impl.shapes.generator import iter_shapes
    for ex in iter_shapes(ShapesConfig(), 32, "validation", size=4):
        ex["image"], ex["caption"], ex["index"]   # uint8 (32, 32, 3), "a small red circle at the top", 0

Splits: "train" never draws a held-out combination (`ShapesConfig.held_out`, e.g. "purple triangle")
for any object; "validation" draws from the full distribution; "heldout" draws only scenes whose every
object is a held-out combination, so generalisation to unseen combinations can be measured.

Choices the spec leaves open, made so that every clean or lightly blurred render passes the judge:
- Object centers are placed so bounding-box edges fall on pixel boundaries (still within the
  spec's jitter range); a triangle's center is the center of its bounding box.
- Two objects' bounding boxes are kept at least S/16 apart, not merely disjoint.
- A heldout-split caption always states the color, so it names the unseen combination.
- Images may be as small as 16 pixels, but the judge reads scenes reliably only from S = 32 up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..config import ShapesConfig
from ..errors import UserError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "black": (30, 30, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Row-major over the 3x3 grid: WHERES[row * 3 + col].
WHERES: tuple[str, ...] = (
    "in the top left corner",
    "at the top",
    "in the top right corner",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left corner",
    "at the bottom",
    "in the bottom right corner",
)
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "validation", "heldout")
WHITE = (255, 255, 255)

_SPLIT_SEED_OFFSET = {"train": 0, "validation": 1_000_003, "heldout": 2_000_003}
_MIN_IMAGE_SIZE = 16
_SUPERSAMPLE = 4  # coverage is measured on a 4x4 grid of samples per pixel (antialiased edges)
_MAX_PLACEMENT_ROUNDS = 1000


@dataclass
class Obj:
    """One drawn object; (cx, cy) is the center of its bounding box in pixels (x right, y down)."""

    color: str
    shape: str
    size: str
    cx: float
    cy: float


@dataclass
class Scene:
    """Objects to draw, the caption, and what the caption states (`parse_caption(caption) == stated`)."""

    objects: list[Obj]
    caption: str
    stated: dict = field(default_factory=dict)


class CaptionError(UserError, ValueError):
    """A caption that is not in the shapes grammar; the message names the offending word."""


# ----------------------------------------------------------------------------------------------
# Geometry shared with the judge
# ----------------------------------------------------------------------------------------------


def extent(size: str, S: int) -> int:
    """Diameter, side, or triangle base and height of an object of `size` in an S x S image."""
    return round(0.25 * S) if size == "small" else round(0.45 * S)


def cell_of(x: float, y: float, S: int) -> str:
    """The `where` phrase of the 3x3 grid cell holding the point (x, y) (pixel coordinates)."""
    col = min(2, max(0, math.floor(3 * x / S)))
    row = min(2, max(0, math.floor(3 * y / S)))
    return WHERES[row * 3 + col]


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def _noun_phrase(obj: dict) -> str:
    return " ".join(w for w in (obj.get("size"), obj.get("color"), obj["shape"]) if w)


def format_caption(stated: dict) -> str:
    """The canonical caption of a stated dict (the inverse of `parse_caption`)."""
    objects = stated["objects"]
    if stated["kind"] == "two":
        return f"a {_noun_phrase(objects[0])} {stated['relation']} a {_noun_phrase(objects[1])}"
    where = stated.get("where")
    return f"a {_noun_phrase(objects[0])}" + (f" {where}" if where else "")


_TWO_RE = re.compile(r"^a (.+?) (" + "|".join(RELATIONS) + r") a (.+)$")
_GRAMMAR = (
    "write 'a [small|large] [color] circle|square|triangle [where]' "
    "or 'a [size] color shape to the left of|to the right of|above|below a [size] color shape'"
)


def _parse_noun_phrase(words: list[str], caption: str) -> tuple[dict, list[str]]:
    """Read `[size] [color] shape` from the front of `words`; return it and the words after it."""
    obj: dict = {"size": None, "color": None, "shape": None}
    i = 0
    if i < len(words) and words[i] in SIZES:
        obj["size"] = words[i]
        i += 1
    if i < len(words) and words[i] in COLORS:
        obj["color"] = words[i]
        i += 1
    if i >= len(words):
        raise CaptionError(f"caption '{caption}' names no shape; {_GRAMMAR}")
    if words[i] not in SHAPES:
        raise CaptionError(f"caption '{caption}' has the unknown word '{words[i]}' where a shape belongs; {_GRAMMAR}")
    obj["shape"] = words[i]
    return obj, words[i + 1 :]


def parse_caption(caption: str) -> dict:
    """Read a shapes caption into what it states.

    Returns {"kind": "one"|"two", "objects": [{"size", "color", "shape"}, ...], "where", "relation"},
    with None for anything the caption leaves out. Case, surrounding spaces and a final period are
    forgiven; any other departure from the grammar raises `CaptionError` (a ValueError).
    """
    text = " ".join(str(caption).lower().strip().rstrip(".").split())
    if text.split()[:1] != ["a"]:
        raise CaptionError(f"caption '{caption}' does not start with 'a'; {_GRAMMAR}")
    two = _TWO_RE.match(text)
    if two:
        first, rest_a = _parse_noun_phrase(two.group(1).split(), caption)
        second, rest_b = _parse_noun_phrase(two.group(3).split(), caption)
        if rest_a or rest_b:
            extra = " ".join(rest_a or rest_b)
            raise CaptionError(f"caption '{caption}' has the unexpected words '{extra}'; {_GRAMMAR}")
        if first["color"] is None or second["color"] is None:
            raise CaptionError(f"caption '{caption}' must state the color of both objects; {_GRAMMAR}")
        if first["color"] == second["color"]:
            raise CaptionError(f"caption '{caption}' gives both objects the same color; the two must differ")
        return {"kind": "two", "objects": [first, second], "where": None, "relation": two.group(2)}
    obj, rest = _parse_noun_phrase(text.split()[1:], caption)
    where = " ".join(rest) or None
    if where is not None and where not in WHERES:
        raise CaptionError(f"caption '{caption}' has the unknown place '{where}'; use one of: {', '.join(WHERES)}")
    return {"kind": "one", "objects": [obj], "where": where, "relation": None}


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _inside(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, e: float) -> np.ndarray:
    """Boolean mask of sample points (xs (1, w), ys (h, 1)) inside the shape."""
    h = e / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    # Isosceles, apex up at (cx, cy - h), base on y = cy + h: width at depth d below the apex is d.
    return (ys <= cy + h) & (np.abs(xs - cx) <= (ys - (cy - h)) / 2)


def render(scene: Scene, S: int) -> np.ndarray:
    """Draw a scene as uint8 (S, S, 3): white background, exact palette colors inside each shape.

    Edge pixels are antialiased by the fraction of a 4x4 grid of samples that falls inside the
    shape, computed analytically so interior pixels keep the palette's exact values.
    """
    img = np.full((S, S, 3), 255.0, dtype=np.float32)
    k = _SUPERSAMPLE
    for o in scene.objects:
        e = extent(o.size, S)
        x0, x1 = max(0, math.floor(o.cx - e / 2)), min(S, math.ceil(o.cx + e / 2))
        y0, y1 = max(0, math.floor(o.cy - e / 2)), min(S, math.ceil(o.cy + e / 2))
        w, h = x1 - x0, y1 - y0
        xs = x0 + (np.arange(w * k, dtype=np.float64) + 0.5) / k
        ys = y0 + (np.arange(h * k, dtype=np.float64) + 0.5) / k
        inside = _inside(o.shape, xs[None, :], ys[:, None], o.cx, o.cy, e)
        cover = inside.reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)[..., None]  # (h, w, 1)
        region = img[y0:y1, x0:x1]
        region += (np.asarray(COLORS[o.color], dtype=np.float32) - region) * cover
    return np.rint(img).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown shapes split '{split}'; choose one of: {', '.join(SPLITS)}")


def parse_held_out(held_out: list[str]) -> list[tuple[str, str]]:
    """["purple triangle", ...] -> [("purple", "triangle"), ...]; anything else is a one-sentence UserError."""
    combos = []
    for item in held_out:
        words = item.lower().split()
        if len(words) != 2 or words[0] not in COLORS or words[1] not in SHAPES:
            raise UserError(
                f"held-out combination '{item}' is not '<color> <shape>'; use e.g. 'purple triangle' "
                f"with colors {', '.join(COLORS)} and shapes {', '.join(SHAPES)}"
            )
        combos.append((words[0], words[1]))
    return combos


def _combos(cfg: ShapesConfig, split: str) -> list[tuple[str, str]]:
    """The (color, shape) combinations a split may draw, in a fixed order."""
    _check_split(split)
    every = [(c, s) for c in COLORS for s in SHAPES]
    held = set(parse_held_out(cfg.held_out))
    if split == "train":
        combos = [x for x in every if x not in held]
        if not combos:
            raise UserError("shapes.held_out holds out every color-shape combination; leave some for training")
    elif split == "heldout":
        combos = [x for x in every if x in held]
        if not combos:
            raise UserError("the heldout split is empty because shapes.held_out is empty; list combinations in it")
    else:
        combos = every
    return combos


def _aligned(v: float, lo: float, hi: float, e: int) -> float:
    """The center nearest v in [lo, hi] whose bounding box edges (center -/+ e/2) fall on pixel boundaries.

    Why: an 8-pixel disc whose edges fall mid-pixel digitises into a near-square (fill > 0.88) that the
    judge reads as a square; with aligned edges every circle, square and triangle reads back unambiguously.
    """
    edge = min(max(round(v - e / 2), math.ceil(lo - e / 2 - 1e-9)), math.floor(hi - e / 2 + 1e-9))
    return edge + e / 2


def _place_one(rng: np.random.Generator, S: int, e: int) -> tuple[float, float, int]:
    """A grid cell, then its center plus a uniform jitter in [-S/24, S/24], clamped so the shape stays
    inside and aligned to the pixel grid (staying within the jitter range)."""
    cell = int(rng.integers(9))
    row, col = divmod(cell, 3)
    jitter = rng.uniform(-S / 24, S / 24, size=2)
    center = []
    for base, j in zip(((col + 0.5) * S / 3, (row + 0.5) * S / 3), jitter):
        lo, hi = (min(max(base + d, e / 2), S - e / 2) for d in (-S / 24, S / 24))
        center.append(_aligned(min(max(base + j, e / 2), S - e / 2), lo, hi, e))
    return center[0], center[1], cell


def _place_two(rng: np.random.Generator, S: int, ea: int, eb: int, relation: str) -> tuple[float, float, float, float]:
    """Rejection-sample two pixel-aligned centers: the relation holds by >= S/3 and the bounding boxes
    do not meet (candidates are drawn 64 at a time; the first that qualifies is kept).

    The boxes are kept S/16 apart rather than merely disjoint: where two colors touch, blur or
    antialiasing mixes them (red and blue average to nearly purple) and the judge would see a third object.
    """
    reach = (ea + eb) / 2 + S / 16
    for _ in range(_MAX_PLACEMENT_ROUNDS):
        a = rng.integers(0, S - ea + 1, size=(64, 2)) + ea / 2  # (64, 2) centers (x, y)
        b = rng.integers(0, S - eb + 1, size=(64, 2)) + eb / 2
        dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
        along = {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[relation]
        good = (along >= S / 3) & ((np.abs(dx) >= reach) | (np.abs(dy) >= reach))
        if good.any():
            i = int(good.argmax())
            return float(a[i, 0]), float(a[i, 1]), float(b[i, 0]), float(b[i, 1])
    raise RuntimeError(f"could not place two objects at S={S}")  # unreachable for the spec's sizes


def _sample_one(rng, S, cfg, combos, force_color) -> Scene:
    color, shape = combos[int(rng.integers(len(combos)))]
    size = SIZES[int(rng.integers(2))]
    cx, cy, cell = _place_one(rng, S, extent(size, S))
    omit_size, omit_color, omit_where = rng.random(3) < cfg.omit_p
    stated = {
        "kind": "one",
        "objects": [
            {
                "size": None if omit_size else size,
                "color": None if omit_color and not force_color else color,
                "shape": shape,
            }
        ],
        "where": None if omit_where else WHERES[cell],
        "relation": None,
    }
    return Scene([Obj(color, shape, size, cx, cy)], format_caption(stated), stated)


def _sample_two(rng, S, cfg, combos) -> Scene:
    ca, sa = combos[int(rng.integers(len(combos)))]
    others = [x for x in combos if x[0] != ca]
    cb, sb = others[int(rng.integers(len(others)))]
    size_a, size_b = (SIZES[int(i)] for i in rng.integers(2, size=2))
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    ax, ay, bx, by = _place_two(rng, S, extent(size_a, S), extent(size_b, S), relation)
    omit_a, omit_b = rng.random(2) < cfg.omit_p
    stated = {
        "kind": "two",
        "objects": [
            {"size": None if omit_a else size_a, "color": ca, "shape": sa},
            {"size": None if omit_b else size_b, "color": cb, "shape": sb},
        ],
        "where": None,
        "relation": relation,
    }
    objects = [Obj(ca, sa, size_a, ax, ay), Obj(cb, sb, size_b, bx, by)]
    return Scene(objects, format_caption(stated), stated)


def _sample(rng: np.random.Generator, S: int, cfg: ShapesConfig, split: str, combos) -> Scene:
    # Two objects need two combinations of different colors; a held-out list with one color has none.
    can_pair = len({c for c, _ in combos}) >= 2
    if rng.random() < cfg.two_object_p and can_pair:
        return _sample_two(rng, S, cfg, combos)
    # A held-out scene's caption always names its color: "a triangle" would not test the unseen pair.
    return _sample_one(rng, S, cfg, combos, force_color=split == "heldout")


def sample_scene(rng: np.random.Generator, S: int, cfg: ShapesConfig, split: str = "train") -> Scene:
    """Draw one scene of `split` from `rng` (see the module docstring for what each split draws)."""
    return _sample(rng, S, cfg, split, _combos(cfg, split))


# ----------------------------------------------------------------------------------------------
# The data set
# ----------------------------------------------------------------------------------------------


def split_seed(cfg: ShapesConfig, split: str) -> int:
    """The seed of a split's stream: train cfg.seed, validation +1_000_003, heldout +2_000_003."""
    _check_split(split)
    if cfg.seed < 0:
        raise UserError(f"shapes seed {cfg.seed} is negative; use a seed >= 0")
    return cfg.seed + _SPLIT_SEED_OFFSET[split]


def shapes_length(cfg: ShapesConfig, split: str) -> int | None:
    """Number of examples in a split; None for the endless training stream (train_size == 0)."""
    _check_split(split)
    if split == "train":
        return cfg.train_size or None
    return cfg.val_size


def _check_image_size(S: int) -> None:
    if S < _MIN_IMAGE_SIZE:
        raise UserError(f"shapes image size {S} is too small; use at least {_MIN_IMAGE_SIZE} (e.g. 32 or 64)")


def shapes_example(cfg: ShapesConfig, image_size: int, split: str, index: int) -> dict:
    """Example `index` of a split, regenerated directly: {"image", "caption", "index"}."""
    _check_image_size(image_size)
    combos = _combos(cfg, split)
    return _example(cfg, image_size, split, combos, split_seed(cfg, split), index)


def _example(cfg, S, split, combos, seed, index) -> dict:
    scene = _sample(np.random.default_rng([seed, index]), S, cfg, split, combos)
    return {"image": render(scene, S), "caption": scene.caption, "index": index}


def iter_shapes(
    cfg: ShapesConfig,
    image_size: int,
    split: str = "train",
    *,
    start: int = 0,
    shard: int = 0,
    num_shards: int = 1,
    size: int | None = None,
) -> Iterator[dict]:
    """Yield {"image": uint8 (S, S, 3), "caption": str, "index": int} for a split.

    Global indices run from `start` to the split's length (`size` overrides it; None for the endless
    training stream); this shard yields those with `index % num_shards == shard`.
    """
    _check_image_size(image_size)
    combos = _combos(cfg, split)
    seed = split_seed(cfg, split)
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise UserError(f"shard {shard} of {num_shards} is invalid; need num_shards >= 1 and 0 <= shard < num_shards")
    if start < 0 or (size is not None and size < 0):
        raise UserError(f"start ({start}) and size ({size}) must not be negative")
    length = shapes_length(cfg, split) if size is None else size
    first = start + (shard - start) % num_shards  # the first index >= start on this shard
    return _stream(cfg, image_size, split, combos, seed, first, num_shards, length)


def _stream(cfg, S, split, combos, seed, first, step, length) -> Iterator[dict]:
    index = first
    while length is None or index < length:
        yield _example(cfg, S, split, combos, seed, index)
        index += step


__all__ = [
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "WHERES",
    "CaptionError",
    "Obj",
    "Scene",
    "cell_of",
    "extent",
    "format_caption",
    "iter_shapes",
    "parse_caption",
    "parse_held_out",
    "render",
    "sample_scene",
    "shapes_example",
    "shapes_length",
    "split_seed",
]
