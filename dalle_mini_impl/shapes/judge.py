"""The shapes judge: does an image satisfy its shapes prompt? Rules 1-6 of the spec, docs/shapes.md.

1. A pixel belongs to palette color c when its RGB distance to c is below 80 and c is the nearest of
   the six colors and white.
2. A color is an object when at least 0.3 * 0.5 * (0.25*S)^2 pixels belong to it; its geometry is read
   from its largest 4-connected component (bounding box, pixel count, centroid).
3. taper = mean width of the component's top third of rows / that of its bottom third; taper < 0.7 is
   a triangle, else fill = pixels / bounding-box area >= 0.88 is a square, else a circle. (A row's
   width is its number of component pixels; a third is round(h/3) rows of the h-row bounding box.)
4. Large when the bounding box's longer side is >= 0.35*S, else small.
5. Where: the 3x3 grid cell holding the centroid.
6. One-object prompts need exactly one object with every stated attribute; two-object prompts need
   exactly two objects of the two stated colors, their stated shapes and sizes, and the relation
   between centroids with a margin of S/8 (`A to the left of B`: cx_A + S/8 < cx_B).

Coordinates are continuous pixel coordinates (pixel (i, j) covers [j, j+1) x [i, i+1)), so a centroid
is the mean pixel index + 0.5 and reads back the center the renderer drew at.

Usage:
    from dalle_mini_impl.shapes.judge import judge, judge_rows
    judge(image_uint8_SxSx3, "a small red circle above a blue square").ok
    judge_rows([(prompt, image), ...])   # {"n", "accuracy", "one", "two", "attributes"}
The command line over a jsonl of {"prompt", "path"} rows is `python -m dalle_mini_impl.eval judge`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .generator import COLORS, cell_of, parse_caption

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE = np.array([*COLORS.values(), (255, 255, 255)], dtype=np.float32)  # (7, 3): six colors, white last
_PALETTE_KEY = 8 * (_PALETTE**2).sum(1, keepdims=True) + np.arange(7, dtype=np.float32)[:, None]  # (7, 1)
_MAX_DIST = 80
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "relation")


@dataclass
class Found:
    """An object the judge found: one palette color's largest 4-connected component.

    bbox is (x0, y0, x1, y1) in pixel indices with x1, y1 exclusive; (cx, cy) is the centroid.
    """

    color: str
    shape: str
    size: str
    where: str
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]
    pixels: int
    taper: float
    fill: float


@dataclass
class Verdict:
    """Whether an image satisfies a prompt, and which stated attributes it gets right.

    `attributes` has one entry per attribute the prompt states (color, shape, size, position,
    relation). They are read off the found objects even when the object count is wrong (then `ok` is
    False): a one-object prompt is compared with the found object of its stated color, or the largest
    object when its color is not found or not stated; a two-object prompt with the objects of its two
    stated colors (when one is missing, every attribute is wrong).
    """

    ok: bool
    kind: str  # "one" | "two"
    attributes: dict[str, bool]
    n_objects: int
    objects: list[Found] = field(default_factory=list)


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """int (S, S): the palette color index (into COLOR_NAMES) each pixel belongs to, -1 for none (rule 1)."""
    x = image.reshape(-1, 3).T.astype(np.float32)  # (3, S*S)
    # |x - p|^2 = |x|^2 + (|p|^2 - 2 x.p). The bracket, times 8, plus the color's index is one key whose
    # minimum over colors gives both the nearest color (key % 8, ties to the first) and its distance.
    # Every term is an integer below 2^24, so float32 is exact.
    key = (_PALETTE_KEY - 16 * (_PALETTE @ x)).min(0).astype(np.int64)  # (S*S,)
    nearest = key % 8
    d2 = key // 8 + (x * x).sum(0).astype(np.int64)
    near = d2 < _MAX_DIST**2
    return np.where(near & (nearest < len(COLOR_NAMES)), nearest, -1).reshape(image.shape[:2])


def label_components(classes: np.ndarray) -> np.ndarray:
    """int (H, W): 4-connected components of equal non-negative classes, each labelled by its first
    (smallest) flat pixel index; -1 where the class is negative.

    Min-label propagation with pointer jumping (a label is a pixel of the same component, so a label's
    own label is a valid, smaller one): a handful of vectorised passes instead of a Python BFS.
    """
    H, W = classes.shape
    out = np.full((H, W), -1, dtype=np.int64)
    rows, cols = np.nonzero(classes >= 0)
    if len(rows) == 0:
        return out
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = classes[r0:r1, c0:c1]  # only the foreground's bounding box needs passes
    h, w = crop.shape
    fg = crop >= 0
    big = h * w
    lab = np.where(fg, np.arange(big).reshape(h, w), big)
    same_x = fg[:, 1:] & (crop[:, 1:] == crop[:, :-1])  # (h, w-1): pixel joined to its right
    same_y = fg[1:, :] & (crop[1:, :] == crop[:-1, :])  # (h-1, w): pixel joined to the one below
    while True:
        new = lab.copy()
        np.minimum(new[:, :-1], np.where(same_x, lab[:, 1:], big), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(same_x, lab[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(same_y, lab[1:, :], big), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(same_y, lab[:-1, :], big), out=new[1:, :])
        flat = np.append(new.ravel(), big)  # index `big` (background) points to itself
        for _ in range(3):
            flat = flat[flat]
        new = flat[:-1].reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    # crop-local first pixel -> global flat index (row-major order is kept, so it is still the first)
    out[r0:r1, c0:c1] = np.where(fg, (r0 + lab // w) * W + c0 + lab % w, -1)
    return out


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("the judge reads uint8 images; convert with (x * 255).round().astype(np.uint8)")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"the judge reads square RGB images (S, S, 3), got shape {image.shape}")


def _measure(mask: np.ndarray, color: str, S: int) -> Found:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    w, h = x1 - x0, y1 - y0
    widths = np.bincount(ys - y0, minlength=h)  # component pixels per row
    third = max(1, round(h / 3))
    taper = float(widths[:third].mean() / widths[-third:].mean())
    fill = len(xs) / (w * h)
    if taper < 0.7:
        shape = "triangle"
    elif fill >= 0.88:
        shape = "square"
    else:
        shape = "circle"
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    return Found(
        color=color,
        shape=shape,
        size="large" if max(w, h) >= 0.35 * S else "small",
        where=cell_of(cx, cy, S),
        cx=cx,
        cy=cy,
        bbox=(x0, y0, x1, y1),
        pixels=int(len(xs)),
        taper=taper,
        fill=float(fill),
    )


def find_objects(image: np.ndarray) -> list[Found]:
    """The objects in a uint8 (S, S, 3) image, one per palette color that has enough pixels (rules 1-5)."""
    _check_image(image)
    S = image.shape[0]
    classes = classify_pixels(image)
    counts = np.bincount(classes[classes >= 0], minlength=len(COLOR_NAMES))
    min_pixels = 0.3 * 0.5 * (0.25 * S) ** 2
    present = [c for c in range(len(COLOR_NAMES)) if counts[c] >= min_pixels]
    if not present:
        return []
    labels = label_components(classes).ravel()
    sizes = np.bincount(labels[labels >= 0], minlength=S * S)  # component sizes, indexed by label
    roots = np.nonzero(sizes)[0]  # a label is its component's first pixel, so it has the component's color
    root_colors = classes.ravel()[roots]
    found = []
    for c in present:
        mine = roots[root_colors == c]
        best = mine[sizes[mine].argmax()]
        found.append(_measure((labels == best).reshape(S, S), COLOR_NAMES[c], S))
    return found


def relation_holds(relation: str, a: Found, b: Found, S: int) -> bool:
    """Whether `a {relation} b` holds between the centroids with a margin of S/8 (rule 6)."""
    m = S / 8
    if relation == "to the left of":
        return a.cx + m < b.cx
    if relation == "to the right of":
        return a.cx > b.cx + m
    if relation == "above":
        return a.cy + m < b.cy
    if relation == "below":
        return a.cy > b.cy + m
    raise ValueError(f"unknown relation '{relation}'")


def _judge_one(stated: dict, found: list[Found]) -> dict[str, bool]:
    want = stated["objects"][0]
    # Compare with the object of the stated color when there is one, else with the largest object.
    same_color = [f for f in found if f.color == want["color"]]
    obj = max(same_color or found, key=lambda f: f.pixels) if found else None
    attrs = {}
    for key in ("color", "shape", "size"):
        if want[key] is not None:
            attrs[key] = obj is not None and getattr(obj, key) == want[key]
    if stated["where"] is not None:
        attrs["position"] = obj is not None and obj.where == stated["where"]
    return attrs


def _judge_two(stated: dict, found: list[Found], S: int) -> dict[str, bool]:
    by_color = {f.color: f for f in found}
    pair = [by_color.get(w["color"]) for w in stated["objects"]]
    both = all(f is not None for f in pair)
    attrs = {"color": both}
    attrs["shape"] = both and all(f.shape == w["shape"] for f, w in zip(pair, stated["objects"]))
    sized = [(f, w) for f, w in zip(pair, stated["objects"]) if w["size"] is not None]
    if sized:
        attrs["size"] = both and all(f.size == w["size"] for f, w in sized)
    attrs["relation"] = both and relation_holds(stated["relation"], pair[0], pair[1], S)
    return attrs


def judge(image: np.ndarray, prompt: str) -> Verdict:
    """Decide whether a uint8 (S, S, 3) image satisfies a shapes prompt (rule 6).

    An unparseable prompt raises `dalle_mini_impl.shapes.generator.CaptionError`.
    """
    return judge_found(parse_caption(prompt), find_objects(image), image.shape[0])


def judge_found(stated: dict, found: list[Found], S: int) -> Verdict:
    """`judge` on a parsed prompt (`shapes.parse_caption`) and the objects found in an S x S image.

    For judging many prompts against one image (or one prompt against many) without finding the
    objects again each time.
    """
    want_n = 1 if stated["kind"] == "one" else 2
    if want_n == 1:
        attrs = _judge_one(stated, found)
    else:
        attrs = _judge_two(stated, found, S)
    ok = len(found) == want_n and all(attrs.values())
    return Verdict(ok=ok, kind=stated["kind"], attributes=attrs, n_objects=len(found), objects=found)


def _rate(hits: list[bool]) -> dict:
    return {"n": len(hits), "accuracy": sum(hits) / len(hits) if hits else None}


def summarize(verdicts: Iterable[Verdict]) -> dict:
    """Aggregate verdicts: overall, per prompt kind, and per attribute over the prompts that state it.

    {"n", "accuracy", "one": {"n", "accuracy"}, "two": {...}, "attributes": {name: {"n", "accuracy"}}};
    an accuracy over no prompts is None.
    """
    verdicts = list(verdicts)
    out = {"n": len(verdicts), "accuracy": _rate([v.ok for v in verdicts])["accuracy"]}
    for kind in ("one", "two"):
        out[kind] = _rate([v.ok for v in verdicts if v.kind == kind])
    out["attributes"] = {a: _rate([v.attributes[a] for v in verdicts if a in v.attributes]) for a in ATTRIBUTES}
    return out


def judge_rows(rows: Iterable[tuple[str, np.ndarray]]) -> dict:
    """Judge (prompt, uint8 image) pairs and `summarize` the verdicts."""
    return summarize(judge(image, prompt) for prompt, image in rows)


__all__ = [
    "ATTRIBUTES",
    "COLOR_NAMES",
    "Found",
    "Verdict",
    "classify_pixels",
    "find_objects",
    "judge",
    "judge_found",
    "judge_rows",
    "label_components",
    "relation_holds",
    "summarize",
]
