"""The evaluation and data commands refuse a user's mistake in one sentence, before any work (`run_cli`: exit 2,
`error: ...` on stderr, no traceback): a negative seed, an output path that is a folder or under a file, counts
below their least, a device this machine lacks, a model or judge trained on another data set, files that are
not UTF-8 text."""

from __future__ import annotations

import json
import re

import pytest

from dalle_mini_impl.data import __main__ as data_cli
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.eval import __main__ as eval_cli


def refused(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_eval_commands_refuse_bad_arguments_in_one_sentence(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    judge_emoji = ["--judge", "emoji", "--data", str(tmp_path)]
    cases = [
        (["shapes", "--n", "4", "--seed", "-1"], "--seed is -1; use a non-negative integer below 2**62"),
        (["shapes", "--n", "4", "--out", str(tmp_path)], f"--out '{tmp_path}' is a folder; give a file name in it"),
        (["shapes", "--n", "4", "--out", str(tmp_path / "afile" / "x.json")], "which is a file; choose another path"),
        (["unclip", "--n", "1"], "--n is 1; use 0 or at least 2 sources"),
        (["unclip", "--n", "2", "--pairs", "-1"], "--pairs is -1; use at least 0"),
        (["unclip", "--n", "2", "--seed", "-3"], "--seed is -3"),
        (
            ["unclip", "--n", "2", "--set", "sample.num_images=2"],
            "this evaluation sets sample.num_images itself; use --num",
        ),
        (["shapes", "--n", "4", "--set", "sample.seed=3"], "this evaluation sets sample.seed itself; use --seed"),
        (["shapes", "--n", "4", "--set", "sample.candidates=9"], "sets sample.candidates itself; use --candidates"),
        # sampling settings only another use reads: once the same JSON as without them
        (
            ["shapes", "--n", "4", "--set", "sample.prior_guidance_scale=9"],
            "--set sample.prior_guidance_scale=9: only what can sample with unCLIP's prior (--method unclip) reads "
            "sample.prior_guidance_scale, and this evaluation does not",
        ),
        (["shapes", "--n", "4", "--set", "sample.guided_steps=3"], "refine with CLIP guidance (--guided K) reads"),
        (["edit", "--n", "2", "--set", "sample.guided_lr=1"], "only what can refine with CLIP guidance"),
        (["shapes", "--n", "4", "--set", "sample.edit_likelihood_weight=1"], "only what can edit images (eval edit)"),
        (["unclip", "--n", "2", "--set", "sample.prior_samples=2"], "sample with unCLIP's prior"),
        (["edit", "--n", "4", "--set", "sample.num_images=2"], "sets sample.num_images itself; it grades the cand"),
        (["edit", "--n", "-3"], "--n is -3; use at least 1"),  # once a whole result of zeros
        (["edit", "--n", "2", "--weights=0,nan"], "--weights '0,nan' has a weight that is negative or not finite"),
        (["shapes", "--n", "4", "--guided", "5"], "--guided is 5, more than the --n 4 prompts; give at most 4"),
        (["clip", "--model", "shapes", "--zero-shot", "-1"], "--zero-shot is -1; use at least 0"),  # once: off
        (["recon", "--model", "shapes", "--limit", "-1"], "--limit is -1; use at least 0"),
        (["recon", "--model", "shapes", "--batch-size", "0"], "--batch-size is 0; use at least 1"),
        (["recon", "--model", "shapes", "--split", "train"], "the shapes split 'train' is endless"),  # once no end
        (["clip", "--model", "shapes", "--split", "train"], "the shapes split 'train' is endless"),
        (
            ["recon", "--model", "shapes", "--set", "data.image_size=18"],
            "not a multiple of the image tokenizer's factor 4",
        ),
        (["clip", "--model", "shapes", "--batch-size", "-1"], "--batch-size is -1; use at least 1"),
        (["clip", "--model", "shapes", "--limit", "4", "--device", "tpu"], "device 'tpu' is unknown"),
        (["emoji", *judge_emoji, "--seed", "-1"], "--seed is -1"),
        (["emoji", "--judge", str(tmp_path / "nope"), "--data", str(tmp_path)], "--judge '"),
        (["emoji", *judge_emoji, "--grid", str(tmp_path)], f"--grid '{tmp_path}' is a folder"),
        (["emoji", "--judge", "shapes", "--data", str(tmp_path)], "--judge 'shapes' was trained on shapes"),
        (["emoji", "--model", "shapes", *judge_emoji], "model 'shapes' was trained on shapes"),
        (["emoji", "--judge", "shapes", "--data", str(tmp_path), "--references-only"], "was trained on shapes"),
        (["emoji", *judge_emoji, "--references-only", "--candidates", "4", "--set", "x=1"], "--candidates, --set"),
        (["emoji", *judge_emoji, "--references-only", "--guided-from", "pick"], "--guided-from"),
        (["clip", "--model", "shapes", "--set", "clip.embed_dim=8"], "--set clip.embed_dim: eval clip changes only"),
        (["recon", "--model", "shapes", "--set", "vae.codebook_size=8"], "--set vae.codebook_size: eval recon changes"),
        # data keys no evaluation reads: --set data.split=train once printed the validation split's numbers
        (
            ["recon", "--model", "shapes", "--set", "data.split=train"],
            "--set data.split: eval recon does not read it; it reads the split --split names; use --split",
        ),
        (["clip", "--model", "shapes", "--set", "data.val_split=train"], "--set data.val_split: eval clip does not"),
        (["recon", "--model", "shapes", "--set", "data.random_crop=true"], "center-crops every image"),
        (["recon", "--model", "shapes", "--set", "data.max_examples=5"], "that is train.encode's; use --limit"),
        (  # once judged at 64 pixels and labelled 32
            ["recon", "--model", "emoji", "--judge", "emoji", "--data", str(tmp_path), "--set", "data.image_size=32"],
            "--judge grades the split at its own image size, 64 pixels, and this evaluation reads it at 32",
        ),
    ]
    for argv, says in cases:
        assert says in refused(capsys, eval_cli.main, argv), argv


def test_files_that_are_not_utf8_and_bad_data_paths_are_one_sentence(capsys, tmp_path):
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe[data]\n")
    (tmp_path / "rows.jsonl").write_bytes('{"prompt": "a red circle", "path": "caf\u00e9.png"}\n'.encode("latin-1"))
    says = refused(
        capsys, data_cli.main, ["grid", "--out", str(tmp_path / "g.png"), "--config", str(tmp_path / "bad.toml")]
    )
    assert "is not UTF-8 text" in says
    assert "line 1 of" in refused(capsys, eval_cli.main, ["judge", str(tmp_path / "rows.jsonl")])
    assert f"judge file '{tmp_path}' is a folder" in refused(capsys, eval_cli.main, ["judge", str(tmp_path)])
    assert "--n -1 must be at least 1" in refused(capsys, data_cli.main, ["stats", "--n", "-1"])
    says = refused(capsys, data_cli.main, ["grid", "--out", str(tmp_path), "--n", "2"])
    assert f"--out '{tmp_path}' is a folder" in says
    for n in ("0", "1025"):  # the shapes stream is endless: a grid of a million would render without end
        says = refused(capsys, data_cli.main, ["grid", "--out", str(tmp_path / "g.png"), "--n", n])
        assert f"--n {n} must be 1 to 1024 examples" in says
    assert not (tmp_path / "g.png").exists()


def test_eval_shapes_of_a_bundle_without_clip_is_refused_before_sampling(capsys, tmp_path):
    from tests.bundle_factory import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "noclip", clip=False)
    says = refused(capsys, eval_cli.main, ["shapes", "--model", str(bundle), "--n", "4"])
    assert "this model has no CLIP (clip.safetensors) to rerank with" in says
    plain = make_tiny_bundle(tmp_path / "plain")
    says = refused(capsys, eval_cli.main, ["unclip", "--model", str(plain), "--n", "2"])
    assert says.startswith("error: eval unclip needs unCLIP's parts, and this bundle has no unclip.safetensors")


def test_a_taming_config_with_a_missing_or_mistyped_setting_names_it(tmp_path, capsys):
    from vae import convert

    rgb = {"in_channels": 3, "out_ch": 3}
    config = {"model": {"target": "taming.models.vqgan.VQModel", "params": {"embed_dim": 4, "ddconfig": rgb}}}
    for params, says in [({}, "lacks the setting 'n_embed'"), ({"n_embed": "many"}, "has a setting of the wrong type")]:
        config["model"]["params"].update(params)
        with pytest.raises(convert.VAEError, match=says):
            convert.taming_kwargs(config, "model.yaml")


def test_a_tokenizer_setting_out_of_range_names_its_file(capsys, tmp_path):
    import json
    import shutil

    from dalle_mini_impl.pipeline.bundle import bundle_path

    shutil.copytree(bundle_path("shapes"), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "vae.json").read_text())
    meta["kwargs"]["codebook_size"] = -16
    (tmp_path / "m" / "vae.json").write_text(json.dumps(meta))
    says = refused(capsys, eval_cli.main, ["recon", "--model", str(tmp_path / "m"), "--limit", "2"])
    assert f"'{tmp_path / 'm' / 'vae.json'}': " in says and "-16" in says


def test_compare_refuses_what_is_no_evaluation_result(tmp_path):
    """A bundle's config.json has a 'seed' too, and was compared as a result (exit 0, a table of config numbers);
    a malformed seed or per_seed was a ValueError, TypeError or AttributeError."""
    from dalle_mini_impl.eval.compare import read_result

    cases = {
        "config": ({"seed": 0, "name": "emoji", "data": {"image_size": 64}}, "is not an evaluation result"),
        "seed": ({"seed": "x", "n": 3}, "has the seed 'x', not an integer"),
        "list": ({"seed": 0, "per_seed": [1]}, "has a 'per_seed' that is not an object of one result per seed"),
        "ints": ({"seed": 0, "per_seed": {"0": 5}}, "has a 'per_seed' that is not an object"),
    }
    for name, (value, says) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(value))
        with pytest.raises(UserError, match=f"'{path}' {re.escape(says)}.*; pass the JSON an evaluation wrote"):
            read_result(str(path))
    (tmp_path / "ok.json").write_text(json.dumps({"seed": 3, "n": 2, "reranked": {"style_acc": 0.5}}))
    assert list(read_result(str(tmp_path / "ok.json"))[1]) == ["3"]


@pytest.mark.parametrize("command", ["shapes", "unclip", "edit", "recon"])
def test_eval_help_keeps_the_docstrings_layout(capsys, command):
    """The usage lines and bullet lists of a command's docstring are its --help's, not one reflowed paragraph."""
    import importlib

    doc = importlib.import_module(f"dalle_mini_impl.eval.{command}").__doc__
    with pytest.raises(SystemExit):
        eval_cli.main([command, "--help"])
    said = capsys.readouterr().out
    command_line = next(line for line in doc.splitlines() if line.lstrip().startswith("python -m"))
    assert "\n" + command_line.rstrip() + "\n" in said
