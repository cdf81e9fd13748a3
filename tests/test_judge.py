"""The shapes judge: accepts every clean or lightly blurred render, rejects every wrong attribute."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dalle_mini_impl.config import ShapesConfig
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.eval.judge import main as judge_main
from dalle_mini_impl.shapes.generator import (
    COLORS,
    SHAPES,
    WHERES,
    CaptionError,
    Obj,
    Scene,
    cell_of,
    format_caption,
    render,
    sample_scene,
)
from dalle_mini_impl.shapes.judge import find_objects, judge, judge_rows, label_components, summarize

N = 500
OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def blur(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=0.6)))


def truth(scene: Scene, S: int) -> dict:
    """The scene's caption with every attribute stated."""
    stated = copy.deepcopy(scene.stated)
    stated["objects"] = [{"size": o.size, "color": o.color, "shape": o.shape} for o in scene.objects]
    if stated["kind"] == "one":
        stated["where"] = cell_of(scene.objects[0].cx, scene.objects[0].cy, S)
    return stated


@pytest.fixture(scope="module", params=[32, 64])
def rendered(request):
    S = request.param
    cfg = ShapesConfig(omit_p=0.3)
    scenes = [sample_scene(np.random.default_rng([11, i]), S, cfg, "validation") for i in range(N)]
    return S, scenes, [render(s, S) for s in scenes]


def test_accepts_every_clean_and_blurred_render(rendered):
    S, scenes, images = rendered
    for scene, img in zip(scenes, images):
        full = format_caption(truth(scene, S))
        # The full caption states every attribute, so passing it implies passing the sampled caption too.
        for image, prompt in ((img, scene.caption), (img, full), (blur(img), full)):
            v = judge(image, prompt)
            assert v.ok, (S, prompt, v)
            assert v.n_objects == len(scene.objects)


def wrong_captions(scene: Scene, S: int) -> dict[str, str]:
    """One caption per attribute, each with exactly that attribute made false."""
    good = truth(scene, S)
    first = good["objects"][0]
    used = {o.color for o in scene.objects}
    out = {}
    for attr in ("shape", "color", "size", "position", "relation"):
        bad = copy.deepcopy(good)
        obj = bad["objects"][0]
        if attr == "shape":
            obj["shape"] = SHAPES[(SHAPES.index(first["shape"]) + 1) % 3]
        elif attr == "color":
            obj["color"] = next(c for c in COLORS if c not in used)
        elif attr == "size":
            obj["size"] = "large" if first["size"] == "small" else "small"
        elif attr == "position" and good["kind"] == "one":
            bad["where"] = WHERES[(WHERES.index(good["where"]) + 4) % 9]
        elif attr == "relation" and good["kind"] == "two":
            bad["relation"] = OPPOSITE[good["relation"]]
        else:
            continue
        out[attr] = format_caption(bad)
    return out


def test_rejects_each_wrong_attribute(rendered):
    S, scenes, images = rendered
    seen = set()
    for scene, img in zip(scenes[:200], images[:200]):
        for attr, prompt in wrong_captions(scene, S).items():
            v = judge(img, prompt)
            assert not v.ok and v.attributes[attr] is False, (prompt, v)
            if not (v.kind == "two" and attr == "color"):  # a missing object gets every attribute wrong
                assert all(ok for a, ok in v.attributes.items() if a != attr), (prompt, v)
            seen.add((v.kind, attr))
    assert seen == {("one", a) for a in ("shape", "color", "size", "position")} | {
        ("two", a) for a in ("shape", "color", "size", "relation")
    }


def test_object_count_decides_even_when_attributes_match():
    S = 32
    two = Scene([Obj("red", "circle", "small", 8, 8), Obj("blue", "square", "small", 24, 24)], "", {})
    v = judge(render(two, S), "a red circle")
    assert not v.ok and v.n_objects == 2 and v.attributes == {"color": True, "shape": True}
    one = Scene([Obj("red", "circle", "small", 8, 8)], "", {})
    v = judge(render(one, S), "a red circle above a blue square")
    assert not v.ok and v.n_objects == 1 and v.attributes["color"] is False
    blank = np.full((S, S, 3), 255, np.uint8)
    assert find_objects(blank) == [] and not judge(blank, "a circle").ok


def test_a_color_needs_enough_pixels_and_geometry_comes_from_its_largest_component():
    S = 32  # an object needs >= 0.3 * 0.5 * 8^2 = 9.6 pixels
    img = np.full((S, S, 3), 255, np.uint8)
    img[2:5, 2:5] = COLORS["green"]  # 9 pixels: below the threshold
    assert find_objects(img) == []
    img[20:28, 20:28] = COLORS["green"]  # a square, plus the stray 3x3 patch elsewhere
    (found,) = find_objects(img)
    assert (found.color, found.shape, found.size, found.bbox, found.pixels) == (
        "green",
        "square",
        "small",
        (20, 20, 28, 28),
        64,
    )
    assert (found.cx, found.cy, found.where) == (24.0, 24.0, "in the bottom right corner")
    off = img.copy()
    off[20:28, 20:28] = (140, 140, 140)  # gray is farther than 80 from every palette color
    assert find_objects(off) == []


def test_components_are_four_connected():
    classes = np.array(
        [
            [0, 0, -1, 1],
            [-1, -1, 0, 1],
            [2, -1, 0, -1],
            [2, 2, -1, 0],
        ]
    )
    labels = label_components(classes)
    assert labels[0, 0] == labels[0, 1] == 0
    assert labels[1, 2] == labels[2, 2] == 6  # diagonal neighbours (0,1)-(1,2) are not joined
    assert labels[0, 3] == labels[1, 3] == 3 and labels[2, 0] == labels[3, 0] == labels[3, 1] == 8
    assert labels[3, 3] == 15 and (labels[classes < 0] == -1).all()


def test_summarize_counts_per_kind_and_attribute():
    S = 32
    red = render(Scene([Obj("red", "circle", "small", 8, 8)], "", {}), S)
    pair = render(Scene([Obj("red", "circle", "small", 8, 8), Obj("blue", "square", "small", 24, 24)], "", {}), S)
    out = judge_rows(
        [
            ("a small red circle in the top left corner", red),
            ("a red square", red),
            ("a red circle above a blue square", pair),
            ("a red circle to the right of a blue square", pair),
        ]
    )
    assert out == {
        "n": 4,
        "accuracy": 0.5,
        "one": {"n": 2, "accuracy": 0.5},
        "two": {"n": 2, "accuracy": 0.5},
        "attributes": {
            "color": {"n": 4, "accuracy": 1.0},
            "shape": {"n": 4, "accuracy": 0.75},
            "size": {"n": 1, "accuracy": 1.0},
            "position": {"n": 1, "accuracy": 1.0},
            "relation": {"n": 2, "accuracy": 0.5},
        },
    }
    assert summarize([])["accuracy"] is None


def test_judge_rejects_bad_inputs():
    with pytest.raises(CaptionError, match="blob"):
        judge(np.full((32, 32, 3), 255, np.uint8), "a red blob")
    with pytest.raises(ValueError, match="uint8"):
        find_objects(np.ones((32, 32, 3)))
    with pytest.raises(ValueError, match="square"):
        find_objects(np.full((32, 48, 3), 255, np.uint8))


def write_rows(tmp_path, rows):
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i, (prompt, img) in enumerate(rows):
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"prompt": prompt, "path": f"img/{i}.png"}))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_judge_command_prints_the_summary(tmp_path, capsys):
    S = 64
    img = render(Scene([Obj("yellow", "triangle", "large", 32.5, 32.5)], "", {}), S)
    path = write_rows(tmp_path, [("a large yellow triangle in the center", img), ("a yellow circle", img)])
    assert judge_main([str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and out["accuracy"] == 0.5 and out["one"] == {"n": 2, "accuracy": 0.5}
    assert out["two"] == {"n": 0, "accuracy": None}
    assert out["attributes"]["shape"] == {"n": 2, "accuracy": 0.5}
    assert out["attributes"]["position"] == {"n": 1, "accuracy": 1.0}


def test_eval_judge_command_errors_name_the_file_and_line(tmp_path):
    img = np.full((32, 32, 3), 255, np.uint8)
    path = write_rows(tmp_path, [("a red circle", img)])
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match="line 2 of .* is not valid JSON"):
        judge_main([str(path)])
    path.write_text(json.dumps({"prompt": "a red circle", "path": "img/missing.png"}) + "\n")
    with pytest.raises(UserError, match="line 1 .* does not exist"):
        judge_main([str(path)])
    path.write_text(json.dumps({"prompt": "a red blob", "path": "img/0.png"}) + "\n")
    with pytest.raises(UserError, match="line 1 .*blob"):
        judge_main([str(path)])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path.write_text(json.dumps({"prompt": "a red circle", "path": str(tmp_path / "bad.png")}) + "\n")
    with pytest.raises(UserError, match="line 1 .*cannot be read"):
        judge_main([str(path)])


def test_eval_judge_missing_file_is_one_sentence_on_stderr(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "dalle_mini_impl.eval", "judge", str(missing)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and str(missing) in lines[0]
