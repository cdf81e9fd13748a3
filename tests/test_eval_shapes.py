"""The shapes evaluation (`python -m dalle_mini_impl.eval shapes`): its fixed prompt set and its columns.

A tiny random bundle (tests/bundle_factory.py) samples the images; the judge and CLIP are real.
"""

from __future__ import annotations

import json

import pytest

from dalle_mini_impl.errors import UserError
from dalle_mini_impl.eval.shapes import evaluate, main, prompt_set
from dalle_mini_impl.pipeline.pipeline import Pipeline
from dalle_mini_impl.shapes.generator import parse_caption
from tests.bundle_factory import make_tiny_bundle, tiny_config

HELD_OUT = ["purple triangle", "yellow square"]


pytestmark = pytest.mark.usefixtures("one_thread")


def bundle_for(folder):
    cfg = tiny_config()
    cfg.text.text_len = 40  # room for the longest two-object prompt, so none is truncated
    return make_tiny_bundle(folder, cfg=cfg)


def pairs(caption: str) -> set[str]:
    return {f"{o['color']} {o['shape']}" for o in parse_caption(caption)["objects"] if o["color"]}


def test_the_prompt_set_is_fixed_by_its_seed_and_keeps_held_out_pairs_to_its_own_quarter():
    prompts = prompt_set(40, 0, HELD_OUT)
    assert prompts == prompt_set(40, 0, HELD_OUT) and prompts != prompt_set(40, 1, HELD_OUT)
    kinds = [k for k, _ in prompts]
    assert (kinds.count("one"), kinds.count("two"), kinds.count("heldout")) == (20, 10, 10)
    for kind, caption in prompts:
        named = pairs(caption)
        if kind == "heldout":
            assert named and named <= set(HELD_OUT), caption
        else:
            assert not named & set(HELD_OUT), caption
        if kind != "heldout":  # held-out prompts are of both kinds
            assert parse_caption(caption)["kind"] == kind, caption
    # the one-object prompts cycle through every mix of stated size, color and position
    one = [parse_caption(c) for k, c in prompts if k == "one"][:8]
    stated = {
        (o["objects"][0]["size"] is not None, o["objects"][0]["color"] is not None, o["where"] is not None) for o in one
    }
    assert len(stated) == 8
    assert [k for k, _ in prompt_set(40, 0, [])].count("heldout") == 0


def test_the_judges_best_of_8_bounds_every_pick_of_8(tmp_path):
    pipe = Pipeline.from_pretrained(bundle_for(tmp_path / "bundle"), device="cpu")
    out = evaluate(pipe, prompt_set(8, 0, HELD_OUT), candidates=8, guided=0, progress=False)
    assert set(out) == {"random", "clip_top1_of_8", "judge_best_of_8", "every_of_8", "distinct_of_8"}
    assert 1 / 8 <= out["distinct_of_8"] <= 1
    for kind in ("all", "one", "two", "heldout"):
        best = out["judge_best_of_8"][kind]["accuracy"]
        assert out["random"][kind]["accuracy"] <= best and out["clip_top1_of_8"][kind]["accuracy"] <= best
        assert out["random"][kind]["n"] == out["judge_best_of_8"][kind]["n"] > 0
        # every one of the 8 is judged: 8 times the prompts, and no better than the judge's best of them
        assert out["every_of_8"][kind]["n"] == 8 * out["random"][kind]["n"]
        assert out["every_of_8"][kind]["accuracy"] <= best


def test_guided_refinement_is_judged_with_and_without_the_prior_beside_the_unrefined_top1(tmp_path):
    pipe = Pipeline.from_pretrained(bundle_for(tmp_path / "bundle"), device="cpu")
    pipe.cfg.sample.guided_steps, pipe.cfg.sample.guided_cutouts, pipe.cfg.sample.guided_prior_weight = 2, 2, 0.5
    out = evaluate(pipe, prompt_set(4, 0, HELD_OUT), candidates=8, guided=3, progress=False)
    keys = ("clip_guided", "clip_guided_prior", "top1_of_8_same_prompts")
    for key in (*keys, "random_codes_guided", "random_codes_guided_prior"):
        assert out[key]["all"]["n"] == 3, key  # the first 3 prompts
        assert -1 <= out["clip_score"][key] <= 1
    # --guided-from pick: the pick's columns alone, the same as beside the random codes (drawn after them)
    pick = evaluate(pipe, prompt_set(4, 0, HELD_OUT), candidates=8, guided=3, progress=False, guided_from="pick")
    assert set(pick["clip_score"]) == set(keys)
    for key in keys:
        assert pick[key] == out[key] and pick["clip_score"][key] == out["clip_score"][key], key
    assert "random_codes_guided" not in pick and "random_codes_guided_prior" not in pick
    alone = evaluate(pipe, prompt_set(4, 0, HELD_OUT), candidates=8, guided=3, progress=False, guided_from="random")
    assert set(alone["clip_score"]) == {"top1_of_8_same_prompts", "random_codes_guided", "random_codes_guided_prior"}
    # the share of refinements that left their start: every column but the unrefined one, a share of 3 prompts
    assert set(out["refined_moved"]) == set(out["clip_score"]) - {"top1_of_8_same_prompts"}
    assert all(share in (0, 1 / 3, 2 / 3, 1) for share in out["refined_moved"].values())
    pipe.cfg.sample.guided_steps = 0  # no step: every refinement returns its start
    still = evaluate(pipe, prompt_set(4, 0, HELD_OUT), candidates=8, guided=3, progress=False, guided_from="pick")
    assert still["refined_moved"] == {"clip_guided": 0, "clip_guided_prior": 0}
    assert still["clip_guided"] == still["clip_guided_prior"] == still["top1_of_8_same_prompts"]


def test_the_command_prints_json_and_refuses_too_few_prompts_or_candidates(tmp_path, capsys):
    bundle = bundle_for(tmp_path / "bundle")
    assert main(["--model", str(bundle), "--n", "4", "--candidates", "8", "--out", str(tmp_path / "e.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "e.json").read_text())
    assert printed["n"] == 4 and printed["held_out"] == HELD_OUT and "judge_best_of_8" in printed
    with pytest.raises(UserError, match="--n is 3"):
        main(["--model", str(bundle), "--n", "3"])
    with pytest.raises(UserError, match="--candidates is 4"):
        main(["--model", str(bundle), "--candidates", "4"])
    with pytest.raises(UserError, match="--guided is -1"):
        main(["--model", str(bundle), "--guided", "-1"])
    with pytest.raises(UserError, match="--guided-from pick chooses what --guided refines; add --guided K"):
        main(["--model", str(bundle), "--guided-from", "pick"])


def test_set_changes_the_sampling_settings_and_nothing_else(tmp_path, capsys):
    bundle = bundle_for(tmp_path / "bundle")
    args = ["--model", str(bundle), "--n", "4", "--candidates", "8"]
    assert main([*args, "--set", "sample.guidance_scale=3.5", "--set", "sample.temperature=0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["guidance_scale"], printed["temperature"]) == (3.5, 0.5)
    with pytest.raises(UserError, match="--set data.shapes.held_out=.*only sampling settings"):
        main([*args, "--set", "data.shapes.held_out=[]"])
    with pytest.raises(UserError, match="temperature"):
        main([*args, "--set", "sample.temperature=-1"])


def test_held_out_names_the_pairs_of_a_model_fine_tuned_on_every_pair(tmp_path, capsys):
    bundle = bundle_for(tmp_path / "bundle")
    args = ["--model", str(bundle), "--n", "4", "--candidates", "8"]
    assert main([*args, "--held-out", "green circle, Red Square"]) == 0
    assert json.loads(capsys.readouterr().out)["held_out"] == ["green circle", "red square"]
    with pytest.raises(UserError, match="'pink blob' is not '<color> <shape>'"):
        main([*args, "--held-out", "pink blob"])
    with pytest.raises(UserError, match="holds out no color-shape pair"):
        main([*args, "--held-out", " , "])
