"""Hard negative captions for contrastive training: a caption with one word changed so that it turns false.

After NegCLIP (Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"):
a batch rarely holds "a red square to the right of a blue circle" as a negative for the image of "a red
square to the left of a blue circle", so a plain CLIP learns little about word order, relations or
positions. `perturb` edits one word of a caption: a spatial word to its opposite (left/right,
top/bottom, above/below), a size to the other, or a color or a shape word to another one of the
shapes data set's; `perturbations` makes several edits of one caption, each of another kind while the
caption allows one. `train.clip` (with `clip.hard_negatives = true`, and `clip.swaps_per_caption` edits a
caption) adds the edited captions' text features as extra negatives of every image
(`dalle_mini_impl.clip.model.contrastive_loss`).

    rng = random.Random(0)
    perturb("a small red circle to the left of a blue square", rng)  # e.g. "... to the right of ..."
    perturb("a smiling face", rng)                                    # None: no word to edit
    perturb("a red triangle", rng, avoid=["purple triangle"])         # never "a purple triangle"
    perturbations("a red circle above a blue square", rng, 3)         # a relation, a color, a shape edited

`avoid` keeps held-out combinations out of the negatives too: a caption that names one only ever as a
false one teaches the text encoder that the phrase matches no image at all, the opposite of what the
held-out test asks of it (generalising to the unseen pair from its seen parts).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from .generator import COLORS, SHAPES

# the kinds of edit, each a word -> its possible replacements
EDITS: dict[str, dict[str, tuple[str, ...]]] = {
    "spatial": {
        "left": ("right",),
        "right": ("left",),
        "top": ("bottom",),
        "bottom": ("top",),
        "above": ("below",),
        "below": ("above",),
    },
    "size": {"small": ("large",), "large": ("small",)},
    "color": {c: tuple(o for o in COLORS if o != c) for c in COLORS},
    "shape": {s: tuple(o for o in SHAPES if o != s) for s in SHAPES},
}
_WORD = re.compile(r"[a-z]+")
AVOID_TRIES = 20


def perturb(caption: str, rng: random.Random, avoid: Sequence[str] = ()) -> str | None:
    """`caption` with one editable word replaced so that it no longer holds; None if it has none.

    `rng` picks the kind of edit first, uniformly among the kinds the caption allows, then a word of
    that kind and its replacement: a two-object caption names two colors but one relation, and a
    choice among words would flip its relation only one time in seven. Matching is on lower-case
    whole words; the rest of the caption is kept as it was. An edit that would name a phrase of `avoid`
    (whole words, e.g. "purple triangle") the caption did not name is drawn again, up to
    `AVOID_TRIES` times, then None.
    """
    edits = perturbations(caption, rng, 1, avoid)
    return edits[0] if edits else None


def perturbations(caption: str, rng: random.Random, count: int, avoid: Sequence[str] = ()) -> list[str]:
    """Up to `count` different edits of `caption` as `perturb` makes them, each of a kind of edit that the ones
    before have not used while the caption allows one: with `count` = 4 a two-object caption gets its relation
    flipped and a color and a shape swapped (and a size, if it names one). With the kinds used up, the rest are
    drawn from every kind; an edit already made is not kept twice. `count` = 1 draws exactly what `perturb` draws.
    """
    words = list(_WORD.finditer(caption.lower()))
    kinds = [table for table in EDITS.values() if any(w.group() in table for w in words)]
    banned = _patterns(avoid)
    unused, edits = list(kinds), []
    for _ in range(count if kinds else 0):
        table = None
        for _ in range(AVOID_TRIES if banned else 1):
            table = rng.choice(unused or kinds)
            spot = rng.choice([w for w in words if w.group() in table])
            new = rng.choice(table[spot.group()])
            edited = caption[: spot.start()] + new + caption[spot.end() :]
            if _allowed(edited, caption, banned):
                if edited not in edits:
                    edits.append(edited)
                break
        if table in unused:
            unused.remove(table)
    return edits


def every_edit(caption: str, avoid: Sequence[str] = (), kinds: Sequence[str] = tuple(EDITS)) -> list[str]:
    """Every caption `perturb` can make of `caption` (each editable word, each replacement) with an edit of one of
    `kinds` (keys of EDITS), in word order, never one that names a phrase of `avoid` the caption did not name."""
    banned = _patterns(avoid)
    out = []
    for spot in _WORD.finditer(caption.lower()):
        for table in (EDITS[k] for k in kinds):
            for new in table.get(spot.group(), ()):
                edited = caption[: spot.start()] + new + caption[spot.end() :]
                if _allowed(edited, caption, banned):
                    out.append(edited)
    return out


def _patterns(avoid: Sequence[str]) -> list[re.Pattern]:
    return [re.compile(rf"\b{re.escape(a.lower())}\b") for a in avoid if a]


def _allowed(edited: str, caption: str, banned: list[re.Pattern]) -> bool:
    """Whether `edited` names no avoided phrase that `caption` did not name already."""
    return not any(b.search(edited.lower()) and not b.search(caption.lower()) for b in banned)


__all__ = ["AVOID_TRIES", "EDITS", "every_edit", "perturb", "perturbations"]
