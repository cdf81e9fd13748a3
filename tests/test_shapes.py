"""The procedural shapes data set: determinism, sharding, held-out splits, captions, rendering."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dalle_mini_impl.config import ShapesConfig
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.shapes.generator import (
    COLORS,
    RELATIONS,
    SHAPES,
    WHERES,
    CaptionError,
    Obj,
    Scene,
    cell_of,
    extent,
    format_caption,
    iter_shapes,
    parse_caption,
    render,
    sample_scene,
    shapes_example,
    shapes_length,
    split_seed,
)


def scenes(cfg: ShapesConfig, split: str, n: int, S: int = 32, seed: int = 0) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i]), S, cfg, split) for i in range(n)]


def combos(scene: Scene) -> set[str]:
    return {f"{o.color} {o.shape}" for o in scene.objects}


def test_constants_are_the_spec_values():
    assert COLORS == {
        "red": (220, 30, 30),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (235, 205, 20),
        "purple": (140, 50, 180),
        "black": (30, 30, 30),
    }
    assert WHERES[0] == "in the top left corner" and WHERES[4] == "in the center" and WHERES[7] == "at the bottom"
    assert (extent("small", 32), extent("large", 32), extent("small", 64), extent("large", 64)) == (
        8,
        14,
        16,
        29,
    )
    assert cell_of(1, 1, 32) == WHERES[0] and cell_of(31, 16, 32) == "on the right" and cell_of(16, 31, 32) == WHERES[7]


def test_stream_is_deterministic_and_seeded():
    cfg = ShapesConfig(seed=3)
    a = list(iter_shapes(cfg, 32, "train", size=20))
    b = list(iter_shapes(cfg, 32, "train", size=20))
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert [x["index"] for x in a] == list(range(20))
    assert a[0]["image"].dtype == np.uint8 and a[0]["image"].shape == (32, 32, 3)
    other = list(iter_shapes(ShapesConfig(seed=4), 32, "train", size=20))
    assert [x["caption"] for x in other] != [x["caption"] for x in a]
    val = list(iter_shapes(cfg, 32, "validation", size=20))
    assert [x["caption"] for x in val] != [x["caption"] for x in a]


def test_shards_and_start_give_exactly_the_corresponding_examples():
    cfg = ShapesConfig()
    full = list(iter_shapes(cfg, 32, "validation", size=13))
    shards = [list(iter_shapes(cfg, 32, "validation", shard=k, num_shards=3, size=13)) for k in range(3)]
    assert sorted(x["index"] for s in shards for x in s) == list(range(13))
    for s in shards:
        for x in s:
            assert x["caption"] == full[x["index"]]["caption"]
            assert np.array_equal(x["image"], full[x["index"]]["image"])
    resumed = list(iter_shapes(cfg, 32, "validation", start=4, shard=1, num_shards=3, size=13))
    assert [x["index"] for x in resumed] == [4, 7, 10]
    assert [x["caption"] for x in resumed] == [full[i]["caption"] for i in (4, 7, 10)]
    assert [x["index"] for x in iter_shapes(cfg, 32, "validation", start=5, shard=0, num_shards=3, size=13)] == [
        6,
        9,
        12,
    ]
    # example i is render(sample_scene(default_rng([split seed, i]))): callers may draw captions alone
    scene = sample_scene(np.random.default_rng([split_seed(cfg, "validation"), 9]), 32, cfg, "validation")
    assert scene.caption == full[9]["caption"] and np.array_equal(render(scene, 32), full[9]["image"])
    direct = shapes_example(cfg, 32, "validation", 9)
    assert direct["caption"] == full[9]["caption"] and np.array_equal(direct["image"], full[9]["image"])


def test_lengths_endless_fixed_and_overridden():
    cfg = ShapesConfig(train_size=0, val_size=7)
    assert shapes_length(cfg, "train") is None
    assert len(list(itertools.islice(iter_shapes(cfg, 32, "train"), 50))) == 50
    assert shapes_length(cfg, "validation") == shapes_length(cfg, "heldout") == 7
    assert len(list(iter_shapes(cfg, 32, "heldout"))) == 7
    fixed = ShapesConfig(train_size=5)
    assert shapes_length(fixed, "train") == 5 and len(list(iter_shapes(fixed, 32, "train"))) == 5
    assert len(list(iter_shapes(cfg, 32, "validation", size=3))) == 3
    assert list(iter_shapes(cfg, 32, "validation", start=7)) == []


def test_user_errors_are_raised_at_the_call():
    cfg = ShapesConfig()
    with pytest.raises(UserError, match="train, validation, heldout"):
        iter_shapes(cfg, 32, "test")
    with pytest.raises(UserError, match="held-out combination 'pink triangle'"):
        iter_shapes(ShapesConfig(held_out=["pink triangle"]), 32)
    with pytest.raises(UserError, match="heldout split is empty"):
        iter_shapes(ShapesConfig(held_out=[]), 32, "heldout")
    with pytest.raises(UserError, match="shard 3 of 3"):
        iter_shapes(cfg, 32, shard=3, num_shards=3)
    with pytest.raises(UserError, match="too small"):
        iter_shapes(cfg, 8)
    with pytest.raises(UserError, match="negative"):
        iter_shapes(ShapesConfig(seed=-1), 32)


def test_train_never_draws_a_held_out_combination_and_validation_does():
    cfg = ShapesConfig(held_out=["purple triangle", "yellow square"])
    held = set(cfg.held_out)
    train = scenes(cfg, "train", 2000)
    assert not any(combos(s) & held for s in train)
    assert any(len(s.objects) == 2 for s in train)
    val = scenes(cfg, "validation", 2000)
    assert sum(bool(combos(s) & held) for s in val) > 100  # about 2/18 of objects, so well above 100


def test_heldout_split_draws_only_held_out_combinations_and_names_them():
    cfg = ShapesConfig(held_out=["purple triangle", "yellow square"], omit_p=0.5)
    drawn = scenes(cfg, "heldout", 500)
    assert all(combos(s) <= set(cfg.held_out) for s in drawn)
    assert {len(s.objects) for s in drawn} == {1, 2}
    assert all(o["color"] is not None for s in drawn for o in s.stated["objects"])
    # one held-out color: no two-object scene is possible, so every scene has one object
    single = scenes(ShapesConfig(held_out=["purple triangle", "purple circle"]), "heldout", 200)
    assert all(len(s.objects) == 1 and s.objects[0].color == "purple" for s in single)


@pytest.mark.parametrize("S", [32, 64])
def test_captions_are_canonical_parse_back_and_describe_the_scene(S):
    cfg = ShapesConfig(omit_p=0.3)
    for s in scenes(cfg, "validation", 1000, S=S):
        cap = s.caption
        assert cap == cap.lower().strip() and not cap.endswith(".") and "  " not in cap
        assert parse_caption(cap) == s.stated and format_caption(s.stated) == cap
        for obj, said in zip(s.objects, s.stated["objects"]):
            assert said["shape"] == obj.shape
            assert said["color"] in (None, obj.color) and said["size"] in (None, obj.size)
            e = extent(obj.size, S)
            assert e / 2 <= obj.cx <= S - e / 2 and e / 2 <= obj.cy <= S - e / 2
        if s.stated["kind"] == "one":
            o = s.objects[0]
            assert s.stated["where"] in (None, cell_of(o.cx, o.cy, S))
        else:
            a, b = s.objects
            assert a.color != b.color and None not in (
                s.stated["objects"][0]["color"],
                s.stated["objects"][1]["color"],
            )
            dx, dy = b.cx - a.cx, b.cy - a.cy
            along = {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[s.stated["relation"]]
            assert along >= S / 3
            reach = (extent(a.size, S) + extent(b.size, S)) / 2
            assert abs(dx) >= reach or abs(dy) >= reach  # bounding boxes do not overlap


def test_one_object_center_is_cell_center_plus_bounded_jitter():
    S = 64
    for s in scenes(ShapesConfig(omit_p=0.0, two_object_p=0.0), "validation", 500, S=S):
        o = s.objects[0]
        row, col = divmod(WHERES.index(s.stated["where"]), 3)
        e = extent(o.size, S)
        for c, k in ((o.cx, col), (o.cy, row)):
            lo = min(max((k + 0.5) * S / 3 - S / 24, e / 2), S - e / 2)
            hi = min(max((k + 0.5) * S / 3 + S / 24, e / 2), S - e / 2)
            assert lo - 1e-9 <= c <= hi + 1e-9


def test_omission_probability_controls_what_captions_state():
    none_left_out = scenes(ShapesConfig(omit_p=0.0, two_object_p=0.0), "train", 100)
    assert all(len(s.caption.split()) >= 5 for s in none_left_out)  # a size color shape + a place
    all_left_out = scenes(ShapesConfig(omit_p=1.0, two_object_p=0.0), "train", 100)
    assert {s.caption for s in all_left_out} == {f"a {shape}" for shape in SHAPES}
    two = scenes(ShapesConfig(omit_p=1.0, two_object_p=1.0), "train", 50)
    assert all(s.stated["relation"] in RELATIONS for s in two)
    assert all(o["size"] is None and o["color"] is not None for s in two for o in s.stated["objects"])


def test_parse_caption_reads_the_grammar_and_rejects_the_rest():
    assert parse_caption("A small red circle above a large blue square.") == {
        "kind": "two",
        "objects": [
            {"size": "small", "color": "red", "shape": "circle"},
            {"size": "large", "color": "blue", "shape": "square"},
        ],
        "where": None,
        "relation": "above",
    }
    assert parse_caption("a triangle on the right") == {
        "kind": "one",
        "objects": [{"size": None, "color": None, "shape": "triangle"}],
        "where": "on the right",
        "relation": None,
    }
    for bad, word in [
        ("a red blob", "blob"),
        ("a red circle in the middle", "in the middle"),
        ("a circle above a red square", "both objects"),
        ("two red circles", "start"),
        ("a red circle below a red square", "same color"),
    ]:
        with pytest.raises(CaptionError, match=word) as err:
            parse_caption(bad)
        assert isinstance(err.value, ValueError)


def test_render_draws_exact_colors_and_the_spec_geometry():
    S = 64
    scene = Scene([Obj("red", "square", "large", 16.5, 16.5), Obj("blue", "triangle", "large", 46.5, 46.5)], "", {})
    img = render(scene, S)
    assert img.dtype == np.uint8 and img.shape == (S, S, 3)
    assert (img[0, -1] == 255).all() and (img[-1, 0] == 255).all()
    red = (img == COLORS["red"]).all(-1)
    assert red.sum() == 29 * 29  # edges on pixel boundaries: every pixel fully inside, exact color
    blue = (img != 255).any(-1) & (np.arange(S)[None, :] >= 32)  # the triangle, edge pixels included
    widths = blue.sum(1)[blue.any(1)]
    assert widths[0] < widths[-1] / 5  # apex up, base at the bottom
    assert widths[-1] == 29 and len(widths) == 29  # base width = height = extent
    circle = render(Scene([Obj("black", "circle", "large", 32.5, 32.5)], "", {}), S)
    dark = (255 - circle.astype(float)).mean(-1).sum() / (255 - 30)  # coverage-weighted area
    assert abs(dark - math.pi * 14.5**2) < 0.02 * math.pi * 14.5**2
