"""The README's and docs' links to a heading land on one: an entry renamed in docs/RESULTS.md breaks every link to it
without a sound, and the README's links are how a reader finds where a number came from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]*?)#([^)\s]+)\)")  # [text](file.md#anchor) or [text](#anchor)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercased, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)  # no code blocks
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_slug_follows_githubs_rule():
    assert slug("2026-12-06 emoji-styles: the VQ's critic (neither shipped)") == (
        "2026-12-06-emoji-styles-the-vqs-critic-neither-shipped"
    )
    assert slug("`eval emoji`'s new `reconstructed` reference") == "eval-emojis-new-reconstructed-reference"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_to_a_heading_lands_on_one(page):
    broken = []
    for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://")):
            continue
        linked = page if not target else (page.parent / target).resolve()
        if not linked.is_file():
            broken.append(f"{target}#{anchor} (no such file)")
        elif anchor not in anchors(linked):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{page.name} links to headings that do not exist: {broken}"
