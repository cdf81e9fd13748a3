"""`eval emoji` and `train.judge`: a tiny bundle graded by a tiny judge on a small emoji-styles-like folder.

The folder has 105 names in three styles (R-precision ranks each caption among 100 names), drawn as 16 px
squares whose color says the style and whose place and size say the name; four (name, style) cells are
kept out of train as the test split, as in emoji-styles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_mini_impl.config import config_to_dict, load_config
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.eval import emoji
from tests.bundle_factory import make_tiny_bundle, tiny_config
from tests.test_train import TINY, compiled_graphs, forget_compiled
from train import judge as train_judge

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [f"thing {k}" for k in range(105)]
STYLES = {"alpha": (220, 40, 40), "beta": (40, 160, 60), "gamma": (40, 60, 220)}
HELD_OUT = [(NAMES[k], "gamma") for k in range(4)]  # the test cells: their names are in train in two other styles
JUDGE_TINY = [
    "judge.vocab_size=320",
    "judge.train.steps=2",
    "judge.train.batch_size=8",
    "judge.train.checkpoint_every=2",
    *[item.replace("clip.", "judge.clip.", 1) for item in TINY if item.startswith("clip.")],
    "data.image_size=16",
    "text.text_len=16",
]


def _draw(name: str, style: str) -> Image.Image:
    k = NAMES.index(name)
    pixels = np.full((16, 16, 4), 255, np.uint8)
    pixels[..., 3] = 0  # transparent: composited on white
    top, left, side = k % 8, (k // 8) % 8, 4 + k % 5
    pixels[top : top + side, left : left + side] = (*STYLES[style], 255)
    return Image.fromarray(pixels, mode="RGBA")


def _write(folder: Path, cells: list[tuple[str, str]]) -> None:
    (folder / "images").mkdir(parents=True)
    lines = []
    for name, style in cells:
        rel = f"images/{style}__{name.replace(' ', '-')}.png"
        _draw(name, style).save(folder / rel)
        lines.append(json.dumps({"file_name": rel, "text": emoji.style_caption(name, style), "name": name}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emoji-styles")
    cells = [(name, style) for name in NAMES for style in STYLES]
    _write(root / "train", [c for c in cells if c not in HELD_OUT])
    _write(root / "test", HELD_OUT)
    return root


@pytest.fixture(scope="module")
def judge(folder, tmp_path_factory) -> Path:
    """A judge trained on a copy of the folder whose test split no reader could open: it must never try."""
    blind = tmp_path_factory.mktemp("blind") / "emoji-styles"
    shutil.copytree(folder, blind)
    (blind / "test" / "metadata.jsonl").write_text("{this is not json\n")
    shutil.rmtree(blind / "test" / "images")
    out = tmp_path_factory.mktemp("judge")
    argv = ["--config", "emoji64", "--data", str(blind), "--out", str(out), "--set", "judge.splits=train"]
    assert train_judge.main([*argv, *[x for item in JUDGE_TINY for x in ("--set", item)]]) == 0
    return out


def test_the_judge_trains_on_its_splits_alone_into_its_own_folder(judge):
    values = json.loads((judge / "config.json").read_text())
    assert values["data"]["split"] == values["data"]["val_split"] == "train"
    assert values["seed"] == 1 and values["clip"]["image_width"] == 32
    assert {p.name for p in judge.iterdir()} >= {"config.json", "text.model", "clip.safetensors"}


@pytest.mark.slow
def test_the_presets_judge_compiles_with_its_hard_negatives_shifts_and_flips(folder, tmp_path, capsys):
    # the seeded augmentation and the swapped captions run eagerly inside the compiled loss: from the third step
    # (when the step number becomes a symbol) they once stopped torch.compile with a traceback
    tiny = [item for item in JUDGE_TINY if item != "judge.train.steps=2"]
    swaps = "judge.clip.swap_phrases=[', alpha style', ', beta style', ', gamma style']"
    losses = {}
    for flag in ("false", "true"):
        forget_compiled()
        argv = ["--config", "emoji", "--data", str(folder), "--out", str(tmp_path / flag), "--set", swaps]
        settings = [*tiny, "judge.splits=train", "judge.train.steps=3", f"judge.train.compile={flag}"]
        settings.append("judge.clip.swaps_per_caption=2")  # every other phrase, as the preset's 7 of its 8
        settings.append("judge.train.mixed_precision=no")  # fp32: compiled and eager steps agree to rounding
        assert train_judge.main([*argv, *[x for item in settings for x in ("--set", item)]]) == 0
        losses[flag] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
        assert bool(compiled_graphs()) == (flag == "true")
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_rest_swaps_add_same_style_negatives_to_the_judges_first_step(folder, tmp_path, capsys):
    # the same first step but for more negative texts per image: InfoNCE's image side can only grow
    swaps = "judge.clip.swap_phrases=[', alpha style', ', beta style', ', gamma style']"
    losses = []
    for rest in (0, 2):
        argv = ["--config", "emoji", "--data", str(folder), "--out", str(tmp_path / str(rest)), "--set", swaps]
        settings = [*JUDGE_TINY, "judge.splits=train", "judge.train.steps=1", f"judge.clip.rest_swaps={rest}"]
        settings.append("judge.clip.swaps_per_caption=2")  # every other phrase, as the preset's 7 of its 8
        settings.append("judge.train.mixed_precision=no")  # the process's accelerate state is fp32 in the suite
        assert train_judge.main([*argv, *[x for item in settings for x in ("--set", item)]]) == 0
        losses.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"])
    assert losses[1] > losses[0] + 0.01


def test_swaps_seen_only_never_name_a_held_out_cell_in_the_judges_steps(folder, tmp_path, monkeypatch):
    from train import clip as train_clip

    made: list[str] = []

    def recorded(*args):
        out = swapped_captions(*args)
        made.extend(out)
        return out

    swapped_captions = train_clip.swapped_captions
    monkeypatch.setattr(train_clip, "swapped_captions", recorded)
    train_captions = {emoji.style_caption(n, s) for n in NAMES for s in STYLES if (n, s) not in HELD_OUT}
    held_out = {emoji.style_caption(n, s) for n, s in HELD_OUT}
    swaps = "judge.clip.swap_phrases=[', alpha style', ', beta style', ', gamma style']"
    settings = [*JUDGE_TINY, "judge.splits=train", "judge.train.steps=3", "judge.train.batch_size=64"]
    settings += ["judge.clip.swaps_per_caption=2", "judge.clip.swaps_seen_only=true", "judge.train.mixed_precision=no"]
    argv = ["--config", "emoji", "--data", str(folder), "--out", str(tmp_path), "--set", swaps]
    argv += [x for item in settings for x in ("--set", item)]
    assert train_judge.main(argv) == 0
    # 192 images' captions in every other style they are seen in: the four names held out in gamma have one
    assert len(made) > 300 and set(made) <= train_captions and not set(made) & held_out
    cfg = train_judge.judge_config(train_judge.loop.parse_args(argv, "")[0], str(tmp_path))
    assert train_clip._seen_captions(cfg) == train_captions


def test_the_judges_help_lists_no_option_it_refuses(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_judge.main(["--help"])
    said = capsys.readouterr().out
    assert "--data" in said and "--no-resume" in said and "--split" not in said and "--init-from" not in said
    # still parsed, to be refused in a sentence rather than as an unknown option
    with pytest.raises(UserError, match="train.judge reads the splits of judge.splits; set those instead of --split"):
        train_judge.main(["--config", "emoji64", "--data", str(tmp_path), "--split", "train"])
    with pytest.raises(UserError, match="never from a model's weights; leave out --init-from"):
        train_judge.main(["--config", "emoji64", "--data", str(tmp_path), "--init-from", "emoji"])


def test_the_judge_refuses_to_learn_from_the_graded_split(tmp_path):
    with pytest.raises(UserError, match="'judge.splits' is 'train\\+test'; the judge grades the test split"):
        train_judge.main(["--config", "emoji64", "--data", str(tmp_path), "--set", "judge.splits=train+test"])
    for spelled in ("test/", "./test", " test"):  # each opens DATA/test too (once read: a string comparison)
        with pytest.raises(UserError, match="the judge grades the test split and must never learn from it"):
            train_judge.main(["--config", "emoji64", "--data", str(tmp_path), "--set", f"judge.splits=train+{spelled}"])
    # a pipeline run's folder: once its text tokenizer passed for the judge's, and the judge wrote itself into it
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_to_dict(load_config("emoji64"))))
    with pytest.raises(UserError, match="is another run's folder \\(its config.json is no judge's\\)"):
        train_judge.main(["--config", "emoji64", "--data", str(tmp_path), "--out", str(run)])
    cfg = train_judge.judge_config(train_judge.loop.parse_args(["--config", "emoji64"], "")[0], "runs/x-judge")
    assert cfg.out_dir == "runs/x-judge" and cfg.name == "emoji64-judge"
    # once "unknown shapes split 'train+validation'", a split the user never typed
    with pytest.raises(UserError, match="train.judge trains an evaluation CLIP for captioned images"):
        train_judge.main(["--config", "shapes", "--out", str(tmp_path / "j")])
    # its CLIP's settings before its tokenizer trains (once after), named as the preset names them
    out = tmp_path / "early"
    for setting, says in [
        ("judge.clip.flip_p=2", "config key 'judge.clip.flip_p' is 2.0"),
        ("judge.train.lr=-1", "judge.train.lr is -1.0"),
        ("judge.clip.patch_size=7", "config key 'judge.clip.patch_size' \\(7\\) does not divide the image size"),
        ("judge.vocab_size=0", "^config key 'judge.vocab_size' is 0; use a positive size"),  # once: text.vocab_size
    ]:
        with pytest.raises(UserError, match=says):
            train_judge.main(["--config", "emoji64", "--data", str(tmp_path), "--out", str(out), "--set", setting])
    assert not (out / "text.model").exists()


def test_the_judges_training_messages_name_its_own_keys(folder, tmp_path):
    """Its freeze and its schedule were named train.clip.* (the judge's config holds them there), a key whose
    --set changes nothing in a judge: they are judge.train.*."""
    argv = ["--config", "emoji64", "--data", str(folder), "--set", "judge.splits=train"]
    settings = [*JUDGE_TINY, 'judge.train.freeze=["bogus"]']
    with pytest.raises(UserError, match=r"^judge.train.freeze names 'bogus', which is not a parameter group"):
        train_judge.main([*argv, "--out", str(tmp_path / "j"), *[x for item in settings for x in ("--set", item)]])


def emoji_like(folder: Path):
    """The tiny bundle's sizes, trained (so its config says) on the emoji-like folder: eval emoji refuses shapes
    models."""
    cfg = tiny_config()
    cfg.data.source = str(folder)
    return cfg


def test_eval_emoji_prints_every_key(folder, judge, tmp_path, capsys):
    bundle = make_tiny_bundle(tmp_path / "bundle", cfg=emoji_like(folder))
    argv = ["--model", str(bundle), "--judge", str(judge), "--data", str(folder), "--candidates", "2"]
    assert emoji.main([*argv, "--grid", str(tmp_path / "grid.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Image.open(tmp_path / "grid.png").size[0] > 4 * 128  # 4 test captions, picks above real images
    assert out["n"] == 4 and out["candidates"] == 2 and out["split"] == "test"
    for key in ("reranked", "first", "every", "real", "same_style_random", "copy_other_style", "reconstructed"):
        entry = out[key]
        assert entry["n"] == (8 if key == "every" else 4), key  # every test name is in train in another style
        assert set(entry) == {"n", "style_acc", "name_r1", "name_r5", "both", "cmmd"}
        for metric in ("style_acc", "name_r1", "name_r5", "both"):
            assert 0 <= entry[metric] <= 1
        assert entry["name_r1"] <= entry["name_r5"] and entry["both"] <= min(entry["style_acc"], entry["name_r1"])
    best, every = out["judge_best"], out["every"]
    assert set(best) == {"n", "style_acc", "name_r1", "name_r5", "both"} and best["n"] == 4
    for metric in ("style_acc", "name_r1", "name_r5", "both"):  # any of a caption's 2 is at least their mean
        assert every[metric] <= best[metric] <= min(1.0, 2 * every[metric]), metric
    assert out["real"]["cmmd"] == 0.0  # the real images against themselves
    assert out["distinct"] in (0.5, 0.625, 0.75, 0.875, 1.0)  # 4 captions of 2 candidates: 1 or 2 distinct each
    assert out["copy_other_style"]["cmmd"] > 0
    assert out["reconstructed"]["cmmd"] > 0  # the tiny tokenizer does not draw the real images back exactly
    # refinement of the first 2 picks, by CLIP alone and with the prior, beside the same unrefined picks
    guided = [*argv, "--guided", "2", "--set", "sample.guided_prior_weight=0.5", "--set", "sample.guided_steps=2"]
    assert emoji.main(guided) == 0
    refined = json.loads(capsys.readouterr().out)
    assert refined["guided_prior_weight"] == 0.5 and refined["reranked"] == out["reranked"]  # unrefined: the same
    for key in (
        "reranked_same",
        "clip_guided",
        "clip_guided_prior",
        "random_codes_guided",
        "random_codes_guided_prior",
    ):
        assert refined[key]["n"] == 2 and 0 <= refined[key]["style_acc"] <= 1, key
        assert -1 <= refined["clip_score"][key] <= 1, key  # the reranker's mean score of the column's images
    assert set(refined["refined_moved"]) == set(refined["clip_score"]) - {"reranked_same"}
    assert all(share in (0, 0.5, 1) for share in refined["refined_moved"].values())  # of 2 captions
    assert emoji.main([*guided, "--guided-from", "pick"]) == 0  # the pick's refinements alone, the same images
    pick = json.loads(capsys.readouterr().out)
    assert pick["guided_from"] == "pick" and "random_codes_guided" not in pick
    assert (pick["clip_guided"], pick["clip_guided_prior"]) == (refined["clip_guided"], refined["clip_guided_prior"])
    assert pick["clip_score"]["clip_guided_prior"] == refined["clip_score"]["clip_guided_prior"]
    # no step: both refinements return their starts, the unrefined picks
    assert emoji.main([*guided, "--guided-from", "pick", "--set", "sample.guided_steps=0"]) == 0
    still = json.loads(capsys.readouterr().out)
    assert still["refined_moved"] == {"clip_guided": 0, "clip_guided_prior": 0}
    for key in ("clip_guided", "clip_guided_prior"):  # decoded alone, not in the candidates' batch: CMMD to ~1e-6
        assert still[key] == pytest.approx(still["reranked_same"], rel=1e-5), key
    # seen cells: --n captions of train, drawn with the seed
    assert emoji.main([*argv, "--split", "train", "--n", "5", "--set", "sample.guidance_scale=1.5"]) == 0
    seen = json.loads(capsys.readouterr().out)
    assert seen["n"] == 5 and seen["real"]["n"] == 5 and seen["guidance_scale"] == 1.5
    with pytest.raises(UserError, match="only sampling settings can change here"):
        emoji.main([*argv, "--set", "transformer.dim=8"])
    with pytest.raises(UserError, match="--judge is the model itself"):
        emoji.main([*argv[:2], "--judge", str(bundle), *argv[4:]])
    copy = shutil.copytree(bundle, tmp_path / "copy")  # the same CLIP under another name is refused too
    with pytest.raises(UserError, match="is the model's own CLIP"):
        emoji.main([*argv[:2], "--judge", str(copy), *argv[4:]])
    with pytest.raises(UserError, match="--method unclip"):  # a bundle without unCLIP's parts
        emoji.main([*argv, "--method", "unclip"])


def test_eval_recon_with_a_judge_grades_the_tokenizer_as_eval_emoji_does(folder, judge, tmp_path, capsys):
    from dalle_mini_impl.eval import recon

    bundle = make_tiny_bundle(tmp_path / "bundle", cfg=emoji_like(folder))
    assert emoji.main(["--model", str(bundle), "--judge", str(judge), "--data", str(folder), "--candidates", "1"]) == 0
    full = json.loads(capsys.readouterr().out)  # seed 0, every test caption
    argv = ["--model", str(bundle), "--data", str(folder), "--split", "test", "--judge", str(judge)]
    assert recon.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 4 and 0 < out["psnr"] < 60  # the PSNR and usage keys are still there
    judged = out["judged"]
    assert judged["real"] == full["real"] and judged["judge_learned_from_split"] is False
    for metric, value in full["reconstructed"].items():  # the same images through the same tokenizer
        assert judged["reconstructed"][metric] == pytest.approx(value, abs=1e-6), metric
    with pytest.raises(UserError, match="--judge grades every image of the split"):
        recon.main([*argv, "--limit", "2"])
    with pytest.raises(UserError, match="does not exist"):
        recon.main([*argv[:-1], str(tmp_path / "nothing")])


def test_references_only_grades_the_judge_alone_as_the_full_run_does(folder, judge, tmp_path, capsys):
    bundle = make_tiny_bundle(tmp_path / "bundle", cfg=emoji_like(folder))
    argv = ["--judge", str(judge), "--data", str(folder), "--seed", "3"]
    assert emoji.main([*argv, "--model", str(bundle), "--candidates", "1"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert emoji.main([*argv, "--references-only", "--out", str(tmp_path / "refs.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "refs.json").read_text()) == out
    assert "reranked" not in out and "model" not in out and out["judge_learned_from_split"] is False
    for key in ("real", "same_style_random", "copy_other_style"):
        assert out[key] == full[key], key  # the same captions, references and numbers without sampling
    picks = out["real_style_picks"]
    assert set(picks) == {style for _, style in HELD_OUT}  # the true styles of the 4 test captions
    assert sum(sum(row.values()) for row in picks.values()) == 4
    right = sum(row.get(style, 0) for style, row in picks.items())
    assert right / 4 == out["real"]["style_acc"]  # the diagonal is the style accuracy


def test_a_judge_exports_as_its_three_files_and_ships_under_a_name_that_is_the_default(
    folder, judge, tmp_path, capsys, monkeypatch
):
    from dalle_mini_impl.pipeline import bundle as bundles
    from train import export

    shipped = tmp_path / "judges"
    assert export.main([str(judge), str(shipped / "emoji"), "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"].keys() == {"config.json", "text.model", "clip.safetensors"}
    # no checkpoints or logs, and no image tokenizer or transformer side files to look for
    assert {p.name for p in (shipped / "emoji").iterdir()} == {"config.json", "text.model", "clip.safetensors"}
    config = json.loads((shipped / "emoji" / "config.json").read_text())
    assert config["data"]["source"] == "" and config["data"]["split"] == "train"  # the splits it learned stay
    over_bundle = make_tiny_bundle(tmp_path / "over", cfg=emoji_like(folder), unclip=True)  # replaced, not mixed
    assert export.main([str(judge), str(over_bundle), "--dtype", "fp32"]) == 0
    assert {p.name for p in over_bundle.iterdir()} == {"config.json", "text.model", "clip.safetensors"}
    capsys.readouterr()
    unfinished = shutil.copytree(judge, tmp_path / "unfinished")  # a pipeline run with its CLIP and nothing after
    (unfinished / "config.json").write_text(json.dumps({**config, "name": "emoji64"}))
    with pytest.raises(UserError, match="has no vae.json; finish training every stage first"):
        export.main([str(unfinished), str(tmp_path / "half")])
    assert not (tmp_path / "half").exists()
    refs = ["--data", str(folder), "--references-only", "--seed", "3"]
    assert emoji.main(["--judge", str(judge), *refs]) == 0
    trained = json.loads(capsys.readouterr().out)

    monkeypatch.setattr(bundles, "JUDGES", shipped)
    assert bundles.shipped_judges() == ["emoji"] and bundles.judge_path("emoji") == shipped / "emoji"
    assert bundles.judge_path(judge) == judge  # a folder is itself
    assert emoji.main(refs) == 0  # no --judge: the shipped one
    out = json.loads(capsys.readouterr().out)
    assert out["judge"] == "emoji"
    for key in ("real", "same_style_random", "copy_other_style", "real_style_picks"):
        assert out[key] == trained[key], key  # fp32: the same judge, the same numbers
    (tmp_path / "emoji").mkdir()  # a folder of that name in the working directory wins, as for --model
    monkeypatch.chdir(tmp_path)
    assert bundles.judge_path("emoji") == Path("emoji")
    with pytest.raises(UserError, match=r"--judge 'nope' does not exist; .* shipped judge \(emoji\)"):
        bundles.judge_path("nope")


def test_several_seeds_run_once_each_and_report_their_mean_and_range(folder, judge, tmp_path, capsys):
    bundle = make_tiny_bundle(tmp_path / "bundle", cfg=emoji_like(folder))
    argv = ["--model", str(bundle), "--judge", str(judge), "--data", str(folder), "--split", "train", "--n", "6"]
    alone = {}
    for seed in (4, 5):
        assert emoji.main([*argv, "--seed", str(seed)]) == 0
        alone[str(seed)] = json.loads(capsys.readouterr().out)
    assert alone["4"]["captions"] != alone["5"]["captions"]  # --n's draw moves with the seed
    assert emoji.main([*argv, "--seed", "4", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seed"] == [4, 5] and set(out["per_seed"]) == {"4", "5"}
    for seed, result in out["per_seed"].items():  # each seed's numbers are its own run's
        for key in ("reranked", "first", "every", "real", "copy_other_style", "reconstructed", "distinct"):
            assert result[key] == alone[seed][key], (seed, key)
    for key in ("reranked", "copy_other_style"):
        for metric in ("style_acc", "name_r1", "cmmd"):
            values = [alone[seed][key][metric] for seed in ("4", "5")]
            assert out["mean"][key][metric] == pytest.approx(sum(values) / 2), (key, metric)
            assert out["range"][key][metric] == [min(values), max(values)], (key, metric)
    assert out["mean"]["distinct"] == pytest.approx((alone["4"]["distinct"] + alone["5"]["distinct"]) / 2)
    assert "captions" not in out["mean"]  # not a number
    refs = ["--judge", str(judge), "--data", str(folder), "--split", "train", "--n", "6", "--references-only"]
    assert emoji.main([*refs, "--seed", "4", "5"]) == 0
    only = json.loads(capsys.readouterr().out)
    assert only["per_seed"]["5"]["real"] == alone["5"]["real"] and only["mean"]["real"] == out["mean"]["real"]
    with pytest.raises(UserError, match="--seed repeats a seed"):
        emoji.main([*argv, "--seed", "4", "4"])


def test_eval_emoji_grades_unclip_candidates_on_the_same_captions(folder, judge, tmp_path, capsys):
    bundle = make_tiny_bundle(tmp_path / "bundle", cfg=emoji_like(folder), unclip=True)
    argv = ["--model", str(bundle), "--judge", str(judge), "--data", str(folder), "--candidates", "2"]
    assert emoji.main(argv) == 0
    ar = json.loads(capsys.readouterr().out)
    assert emoji.main([*argv, "--method", "unclip"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (ar["method"], out["method"]) == ("ar", "unclip") and out["captions"] == ar["captions"]
    for key in ("real", "copy_other_style", "reconstructed"):  # the same references: no sampling in them
        assert out[key] == ar[key], key
    assert out["reranked"]["n"] == 4 and out["every"]["n"] == 8
    assert out["every"] != ar["every"]  # other candidates: drawn through the prior and the decoder
    with pytest.raises(UserError, match="--guided refines the default method"):
        emoji.main([*argv, "--method", "unclip", "--guided", "1"])


def test_compare_pairs_two_models_by_seed_and_refuses_unpaired_evaluations(folder, judge, tmp_path, capsys):
    from dalle_mini_impl.eval import compare

    argv = ["--judge", str(judge), "--data", str(folder), "--split", "train", "--n", "6", "--candidates", "2"]
    outs = {}
    for name, seed, seeds in (("a", 0, ["3", "4"]), ("b", 1, ["3", "4"]), ("one", 1, ["3"])):
        bundle = make_tiny_bundle(tmp_path / name, cfg=emoji_like(folder), seed=seed)
        outs[name] = tmp_path / f"{name}.json"
        assert emoji.main([*argv, "--model", str(bundle), "--seed", *seeds, "--out", str(outs[name])]) == 0
    capsys.readouterr()
    assert compare.main([str(outs["a"]), str(outs["b"])]) == 0
    out = json.loads(capsys.readouterr().out)
    a, b = (json.loads(outs[k].read_text())["per_seed"] for k in ("a", "b"))
    assert out["seeds"] == [3, 4] and set(out["columns"]) == {"reranked", "first", "every", "judge_best"}
    for column, metrics in out["columns"].items():  # no references; judge_best has no CMMD
        assert set(metrics) == {"style_acc", "name_r1", "name_r5", "both"} | (
            {"cmmd"} if column != "judge_best" else set()
        )
        for metric, got in metrics.items():
            diffs = [b[s][column][metric] - a[s][column][metric] for s in ("3", "4")]
            assert got["diff"] == pytest.approx(sum(diffs) / 2, abs=1e-5)
            assert got["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2, abs=1e-5)  # stdev/sqrt(2) of two
            assert got["a"] == pytest.approx((a["3"][column][metric] + a["4"][column][metric]) / 2, abs=1e-5)
    assert compare.main([str(outs["a"]), str(outs["a"])]) == 0  # a model against itself: nothing, exactly
    same = json.loads(capsys.readouterr().out)["columns"]
    assert all(m["diff"] == 0 and m["se"] == 0 for col in same.values() for m in col.values())
    with pytest.raises(UserError, match="A has seeds 3, 4 and B 3; evaluate both with the same --seed"):
        compare.main([str(outs["a"]), str(outs["one"])])
    other = json.loads(outs["b"].read_text())
    other["per_seed"]["3"]["real"]["style_acc"] += 0.5  # as another judge would read the real images
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="seed 3: the real images read differently in A and B"):
        compare.main([str(outs["a"]), str(tmp_path / "other.json")])
    fewer = json.loads(outs["b"].read_text())
    fewer["per_seed"]["3"]["n"] = 5  # as another --n would: once blamed on the judge
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    with pytest.raises(UserError, match="seed 3: A graded 6 captions and B 5; evaluate both alike"):
        compare.main([str(outs["a"]), str(tmp_path / "fewer.json")])
    with pytest.raises(
        UserError, match="evaluation result .*none.json. does not exist; pass the JSON an evaluation wrote"
    ):
        compare.main([str(outs["a"]), str(tmp_path / "none.json")])
    # a side in parts: B's seeds 3 and 4 as two one-seed files (as two processes write them) compare as B does
    whole = json.loads(outs["b"].read_text())
    settings = {k: v for k, v in whole.items() if k not in ("per_seed", "mean", "range", "seed")}
    for seed in ("3", "4"):
        part = {**whole["per_seed"][seed], "seed": int(seed), **settings}
        (tmp_path / f"b{seed}.json").write_text(json.dumps(part))
    parts = f"{tmp_path / 'b3.json'},{tmp_path / 'b4.json'}"
    assert compare.main([str(outs["a"]), parts]) == 0
    assert json.loads(capsys.readouterr().out)["columns"] == out["columns"]
    with pytest.raises(UserError, match="seed 3 is in both '.*b3.json' and '.*b.json'; give each seed once"):
        compare.main([str(outs["a"]), f"{tmp_path / 'b3.json'},{outs['b']}"])
    with pytest.raises(
        UserError, match="'.*a.json' ran with model .*a and '.*b4.json' with .*b; join only runs of one"
    ):
        compare.main([f"{outs['a']},{tmp_path / 'b4.json'}", str(outs["b"])])


def test_compare_reads_eval_shapes_results_whose_columns_hold_groups(tmp_path, capsys):
    """Once: two eval shapes results compared to {"columns": {}} with exit code 0 (their numbers are one level down)."""
    from dalle_mini_impl.eval import compare

    for name, two in (("a", 50.0), ("b", 75.0)):
        top1 = {"all": {"accuracy": 80.0, "n": 4}, "two": {"accuracy": two, "n": 4}}
        result = {"seed": 0, "n": 4, "candidates": 8, "clip_top1_of_8": top1, "distinct_of_8": 0.9}
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    capsys.readouterr()
    assert compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    columns = json.loads(capsys.readouterr().out)["columns"]
    assert columns == {
        "clip_top1_of_8.all": {"accuracy": {"a": 80.0, "b": 80.0, "diff": 0.0, "se": None}},
        "clip_top1_of_8.two": {"accuracy": {"a": 50.0, "b": 75.0, "diff": 25.0, "se": None}},
    }
    (tmp_path / "bare.json").write_text(json.dumps({"seed": 0, "n": 4, "candidates": 8}))
    with pytest.raises(UserError, match="A and B have no column of numbers in common to compare"):
        compare.main([str(tmp_path / "bare.json"), str(tmp_path / "bare.json")])


def test_the_judges_best_candidate_is_any_of_a_captions_candidates(folder, judge):
    """best_of on candidates made of the real images: N copies of each grade as the real images do; the real
    image beside another style's drawing of the same name gets at least what either gets alone."""
    from dalle_mini_impl.config import read_config_json
    from dalle_mini_impl.pipeline.bundle import load_clip

    size = read_config_json(judge / "config.json").data.image_size
    split = emoji.GradedSplit(load_clip(judge), str(folder), "test", None, 0, size)
    real, rows, grader = split.real_emb, list(range(len(split.captions))), split.grader
    alone = grader.grade_embedded(real, rows, real)
    copies = grader.best_of(real.repeat_interleave(3, 0), [i for i in rows for _ in range(3)], 3)
    assert copies == {k: v for k, v in alone.items() if k != "cmmd"}
    other_idx = emoji.references(split.captions, split.train_captions, 0)[1]  # copy_other_style's picks
    assert None not in other_idx  # every test name is in train in another style
    other = grader.judge.embed_images(emoji.from_uint8(split.train_images[other_idx]))
    pairs = torch.stack([real, other], 1).flatten(0, 1)  # (caption, [real, other]) in turn
    both = grader.best_of(pairs, [i for i in rows for _ in range(2)], 2)
    also = grader.grade_embedded(other, rows, real)
    for metric in ("style_acc", "name_r1", "name_r5", "both"):
        assert both[metric] >= max(alone[metric], also[metric]), metric
    with_real_first = grader.outcomes(pairs, [i for i in rows for _ in range(2)])[1].reshape(-1, 2)
    assert both["name_r1"] == float((with_real_first == 1).any(1).mean())


def test_r_precision_names_are_other_names_each_once_and_the_same_for_a_seed():
    names = NAMES * 2  # train lists a name once per style
    drawn = emoji.rprecision_names("thing 7", names, seed=0, index=3)
    assert len(drawn) == 99 and len(set(drawn)) == 99 and "thing 7" not in drawn
    assert drawn == emoji.rprecision_names("thing 7", names, seed=0, index=3)
    assert drawn != emoji.rprecision_names("thing 7", names, seed=1, index=3)
    with pytest.raises(UserError, match="needs at least 100 names"):
        emoji.rprecision_names("thing 7", NAMES[:50], seed=0, index=0)
    # the draw from the sorted pool without the true name (its names after it one place down: the pool is sorted
    # once for every caption), for a true name first, last, inside and outside the pool
    for true in (min(NAMES), max(NAMES), "thing 7", "not a train name"):
        pool = sorted(set(names) - {true})
        rng = np.random.default_rng([5, 2])
        want = [pool[j] for j in rng.choice(len(pool), 99, replace=False)]
        assert emoji.rprecision_names(true, names, seed=5, index=2) == want, true


def test_cmmd_is_zero_for_identical_sets_and_positive_for_different_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(30, 8, generator=g) + 2, dim=-1)
    assert emoji.cmmd(x, x) == 0.0
    assert emoji.cmmd(x, y) > 0 and emoji.cmmd(x, y) == pytest.approx(emoji.cmmd(y, x))
    # the definition: scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k = exp(-|a - b|^2 / 200)
    k = lambda a, b: torch.exp(-(torch.cdist(a.double(), b.double()) ** 2) / 200).mean()  # noqa: E731
    assert emoji.cmmd(x, y) == pytest.approx(1000 * float(k(x, x) + k(y, y) - 2 * k(x, y)), rel=1e-9)


def test_cmmd_of_sets_larger_than_a_chunk_is_the_whole_matrixs(monkeypatch):
    """The kernel matrix is summed CMMD_CHUNK rows at a time (the whole matrix of 16,000 embeddings took 6 GB):
    the same number as in one piece, and 0 for identical sets."""
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(70, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(50, 8, generator=g) + 1, dim=-1)
    whole = emoji.cmmd(x, y)
    monkeypatch.setattr(emoji, "CMMD_CHUNK", 16)
    assert emoji.cmmd(x, y) == pytest.approx(whole, rel=1e-12) and emoji.cmmd(x, y) > 0
    assert emoji.cmmd(x, x) == 0.0


def test_captions_parse_or_say_what_they_should_be():
    assert emoji.parse_caption("pizza, openmoji style") == ("pizza", "openmoji")
    assert emoji.parse_caption("flag: x, y, fluent flat style") == ("flag: x, y", "fluent flat")
    with pytest.raises(UserError, match="caption 'a red circle' is not of the form 'NAME, STYLE style'"):
        emoji.parse_caption("a red circle")
