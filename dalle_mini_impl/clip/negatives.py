"""Hard negatives for CLIP on any captioned data: a caption made false by swapping one of a set of phrases.

NegCLIP (Yuksekgonul et al. 2023) trains CLIP with captions made false in one place as extra negatives, so
that it must read that place. On shapes the caption grammar decides what to make false
(`dalle_mini_impl.shapes.negatives`); elsewhere `clip.swap_phrases` lists phrases of which a caption holds
one, and that one is swapped for another: on emoji-styles its eight styles (", noto style", ...), so that
CLIP must tell a name's styles apart and not only its names. `clip.swaps_per_caption` swaps it for that many
others, each one extra negative: with all seven, every image is scored against its caption in every style,
which is the choice `eval emoji`'s style_acc grades. `clip.rest_swaps` makes negatives the other way round: the
caption's phrase kept and the rest taken from another caption of the batch (emoji-styles: the same style,
another name, the choice `eval emoji`'s name R-precision grades).

`clip.swaps_seen_only` keeps the swaps to captions that some training image has (`seen`): a caption that only
ever appears as a false one teaches the text tower that it matches no image, and on emoji-styles the held-out
`test` cells' captions are such captions ("pizza, openmoji style" made from "pizza, noto style"). The shapes
negatives never name a held-out pair for the same reason.
"""

from __future__ import annotations

import random
from collections.abc import Collection


def swap_phrase(
    caption: str, phrases: list[str], rng: random.Random, seen: Collection[str] | None = None
) -> str | None:
    """`caption` with the longest of `phrases` it holds replaced by another of them, drawn; None if it holds none
    (or, with `seen`, if no other phrase makes a caption in `seen`).

    The longest first: of " flat style" and ", fluent flat style", a caption holding the second is swapped
    whole, not inside it.
    """
    made = every_swap(caption, phrases, seen)
    return None if not made else made[rng.randrange(len(made))]


def every_swap(caption: str, phrases: list[str], seen: Collection[str] | None = None) -> list[str]:
    """Every caption `caption` becomes with its phrase swapped for another, in `phrases`' order; with `seen`, only
    those in it."""
    held = _held(caption, phrases)
    if held is None:
        return []
    made = [caption.replace(held, p, 1) for p in phrases if p != held]
    return made if seen is None else [m for m in made if m in seen]


def _held(caption: str, phrases: list[str]) -> str | None:
    """The longest of `phrases` that `caption` holds, or None."""
    return max((p for p in phrases if p in caption), key=len, default=None)


def swapped_captions(
    caption: str, phrases: list[str], count: int, rng: random.Random, seen: Collection[str] | None = None
) -> list[str]:
    """`count` distinct false captions of `caption`, each with its phrase swapped for another, drawn ([] if it
    holds none); with `seen`, only captions in it, so fewer where fewer are. One is `swap_phrase`'s, drawn the
    same way."""
    if count == 1:
        made = swap_phrase(caption, phrases, rng, seen)
        return [] if made is None else [made]
    made = every_swap(caption, phrases, seen)
    return rng.sample(made, min(count, len(made)))


def rest_swapped_captions(
    captions: list[str], phrases: list[str], count: int, rng: random.Random, seen: Collection[str] | None = None
) -> list[str]:
    """For each caption holding one of `phrases`, up to `count` false captions that keep its phrase and take the
    rest from other captions of the batch: another caption with its own phrase replaced by this one's
    ("apple, noto style" for "pizza, openmoji style" gives "apple, openmoji style"). Never a caption of the
    batch (that is some image's own), never the same one twice for a caption; fewer when the batch has too few
    others; with `seen`, only captions in it. The donors are drawn in an order shuffled by `rng`."""
    if count < 1:
        return []
    held = [_held(c, phrases) for c in captions]
    truth = set(captions)
    donors = [j for j, p in enumerate(held) if p is not None]
    out: list[str] = []
    for phrase in held:
        if phrase is None:
            continue
        order = donors.copy()
        rng.shuffle(order)
        made: list[str] = []
        for j in order:
            false = captions[j].replace(held[j], phrase, 1)
            if false not in truth and false not in made and (seen is None or false in seen):
                made.append(false)
                if len(made) == count:
                    break
        out += made
    return out
