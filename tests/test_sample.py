"""`python -m sample` and the Pipeline under it, on a tiny random bundle built by the test (tests/bundle_factory.py).

Files and JSON lines as promised, determinism, every bad input with its one sentence and exit code 2,
CLIP-guided refinement raising the score, completion keeping its rows, and a sampling path that
imports neither datasets, accelerate nor tensorboard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalle_mini_impl.config import SampleConfig
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.pipeline.guided import make_cutouts, mentions_sides, parse_weighted_prompt, random_codes, refine
from dalle_mini_impl.pipeline.pipeline import Pipeline, check_settings
from sample.__main__ import main, slugify, unique_slugs
from tests.bundle_factory import make_tiny_bundle

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("datasets", "accelerate", "tensorboard")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def pipe(bundle) -> Pipeline:
    return Pipeline.from_pretrained(bundle, device="cpu")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m sample ARGV` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ----------------------------------------------------------------------------------------------
# Files and JSON lines
# ----------------------------------------------------------------------------------------------


def test_json_lines_and_files_are_exactly_as_promised(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = ["a red circle", "a blue square on the left"]
    argv = [*prompts, "--model", str(bundle), "--out", str(out), "--num-images", "3", "--candidates", "5", "--json"]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert len(lines) == 6
    assert all(set(line) == {"prompt", "path", "rank", "clip_score", "seed"} for line in lines)
    for i, (prompt, slug) in enumerate(zip(prompts, ["a-red-circle", "a-blue-square-on-the-left"])):
        mine = [line for line in lines if line["prompt"] == prompt]
        assert [line["rank"] for line in mine] == [1, 2, 3]
        assert {line["seed"] for line in mine} == {i}  # prompt i uses seed + i
        scores = [line["clip_score"] for line in mine]
        assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
        assert [Path(line["path"]).name for line in mine] == [f"{slug}_s{i}_r{r}.png" for r in (1, 2, 3)]
        for line in mine:
            with Image.open(line["path"]) as img:
                assert img.size == (16, 16) and img.mode == "RGB"  # the model's native resolution
    expected = {Path(line["path"]).name for line in lines} | {
        "a-red-circle_s0_grid.png",
        "a-blue-square-on-the-left_s1_grid.png",
    }
    assert {p.name for p in out.iterdir()} == expected


def test_without_json_it_says_where_the_files_went(bundle, tmp_path, capsys):
    code, stdout, _ = run(["a red circle", "--model", str(bundle), "--out", str(tmp_path / "o")], capsys)
    assert code == 0
    assert "a-red-circle_s0_r1.png" in stdout and "a-red-circle_s0_grid.png" in stdout
    assert stdout.splitlines()[-1] == f"wrote 3 PNGs to {tmp_path / 'o'}{os.sep}"  # 2 images (bundle default) + grid
    code, stdout, _ = run(
        ["a red circle", "--model", str(bundle), "--out", str(tmp_path / "1"), "--num-images", "1"], capsys
    )
    assert (
        stdout.splitlines()[0] == "'a red circle': a-red-circle_s0_r1.png and a-red-circle_s0_grid.png"
    )  # not r1 .. r1


def test_set_changes_a_sampling_setting_no_flag_has_and_refuses_what_it_should_not(bundle, tmp_path, capsys):
    """A clip-guided try on a CPU ran the bundle's refinement steps: there was no way to set them (eval had --set)."""
    drawn = []
    for steps in (1, 10, 10):  # refinement of random codes: ten steps move them, one does not yet (tiny bundle)
        out = tmp_path / f"steps{steps}-{len(drawn)}"
        argv = ["a red circle", "--model", str(bundle), "--method", "clip-guided", "--init", "random"]
        code, _, err = run(
            [*argv, "--num-images", "1", "--set", f"sample.guided_steps={steps}", "--out", str(out)], capsys
        )
        assert code == 0, err
        drawn.append((out / "a-red-circle_s0_r1.png").read_bytes())
    assert drawn[0] != drawn[1] and drawn[1] == drawn[2]
    for argv, says in (
        (
            ["--set", "sample.temperature=2"],
            "--set sample.temperature=2: --temperature sets sample.temperature; use it",
        ),
        (["--set", "sample.guided_steps=3"], "only --method clip-guided reads sample.guided_steps; add it or leave"),
        (["--set", "sample.variation_guidance_scale=2"], "only --variations reads sample.variation_guidance_scale"),
        (["--set", "transformer.dim=3"], "only sampling settings can change here; give sample.KEY=VALUE"),
        (["--set", "sample.batch_size=0"], "config key 'sample.batch_size' is 0; set it to 1 or more"),
    ):
        code, _, err = run(["a red circle", "--model", str(bundle), "--out", str(tmp_path / "x"), *argv], capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_a_judge_folder_given_as_the_model_is_named_for_what_it_is(capsys, tmp_path):
    from dalle_mini_impl.pipeline.bundle import ASSETS

    code, _, err = run(["a red circle", "--model", str(ASSETS / "judges" / "emoji")], capsys)
    assert code == 2 and "is an evaluation CLIP (python -m train.judge wrote it), not a bundle" in err
    # the same three files from train.tokenizer and train.clip alone (a CLIP ablation's run): by its config's name
    clip_run = shutil.copytree(ASSETS / "judges" / "emoji", tmp_path / "clip-run")
    config = json.loads((clip_run / "config.json").read_text())
    (clip_run / "config.json").write_text(json.dumps({**config, "name": "emoji"}))
    code, _, err = run(["a red circle", "--model", str(clip_run)], capsys)
    assert code == 2 and "evaluation CLIP" not in err and "has no transformer.safetensors; it is incomplete" in err


def test_an_out_that_cannot_be_a_folder_is_one_sentence_before_sampling(tmp_path, monkeypatch, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    code, _, err = run(["a red circle", "--out", str(file)], capsys)
    assert code == 2 and f"--out '{file}' is a file; pass a folder for the PNGs" in err
    code, _, err = run(["a red circle", "--out", str(file / "below")], capsys)
    assert code == 2 and f"lies under the file '{file}'" in err
    locked = tmp_path / "locked"
    real = Path.exists

    def exists(path, *a, **kw):  # what Python < 3.12 does under a folder this user may not read (the tests run as root)
        if path == locked / "out":
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **kw)

    monkeypatch.setattr(Path, "exists", exists)
    code, _, err = run(["a red circle", "--out", str(locked / "out")], capsys)
    assert code == 2 and "cannot be reached (Permission denied); pass a folder you can write to" in err


def test_nothing_is_written_outside_out(bundle, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*")}
    code, _, _ = run(["a red circle", "--model", str(bundle), "--json"], capsys)
    assert code == 0
    assert [p.relative_to(work).parts[0] for p in work.rglob("*")] == ["samples"] * 4  # the default --out
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*")} == before


def test_slugs_are_ascii_safe_and_unique():
    assert slugify("A Red Circle!") == "a-red-circle"
    assert slugify("Crème brûlée / ../etc") == "creme-brulee-etc"
    cjk = slugify("赤い円 🐱")
    assert cjk.startswith("prompt-") and cjk.isascii() and cjk != slugify("青い四角")
    assert len(slugify("word " * 100)) <= 60
    assert unique_slugs(["a red circle", "A red circle!", "a red circle"]) == [
        "a-red-circle",
        "a-red-circle-2",
        "a-red-circle-3",
    ]


def test_any_unicode_prompt_is_fine(bundle, tmp_path, capsys):
    code, stdout, stderr = run(["赤い円 🐱", "--model", str(bundle), "--out", str(tmp_path), "--json"], capsys)
    assert code == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["赤い円 🐱"] * 2
    assert all(Path(line["path"]).is_file() and Path(line["path"]).name.isascii() for line in lines)


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


def test_the_same_seed_gives_byte_identical_pngs(bundle, tmp_path, capsys):
    def pngs(out: Path, seed: str) -> dict[str, bytes]:
        code, _, _ = run(["a red circle", "--model", str(bundle), "--out", str(out), "--seed", seed], capsys)
        assert code == 0
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first, second = pngs(tmp_path / "a", "3"), pngs(tmp_path / "b", "3")
    assert first == second
    other = pngs(tmp_path / "c", "4")
    assert list(first.values()) != list(other.values())


@pytest.mark.slow
def test_compiled_decoding_writes_the_same_pngs(bundle, tmp_path, capsys):
    def pngs(out: Path, *extra: str) -> list[bytes]:
        code, _, _ = run(["a red circle", "--model", str(bundle), "--out", str(out), *extra], capsys)
        assert code == 0
        return [p.read_bytes() for p in sorted(out.iterdir())]

    assert pngs(tmp_path / "compiled", "--compile") == pngs(tmp_path / "eager")


def test_an_unknown_decode_mode_is_one_sentence(bundle):
    with pytest.raises(UserError, match="decode 'graph' is unknown; use uncached, cached, static, compiled, spec"):
        Pipeline.from_pretrained(bundle, device="cpu", decode="graph")


def test_speculative_decoding_samples_in_bf16_and_says_when_it_runs_plainly(bundle, tmp_path, capsys):
    # 2 candidates under guidance: 4 model rows, the most that get a window on the CPU
    base = ["a red circle", "--model", str(bundle), "--candidates", "2", "--num-images", "2", "--json"]
    code, out, err = run([*base, "--decode", "speculative", "--dtype", "bf16", "--out", str(tmp_path / "b")], capsys)
    assert code == 0 and len(out.splitlines()) == 2 and "warning" not in err
    assert len(list((tmp_path / "b").glob("*_r*.png"))) == 2
    # fp32 on the CPU: the window is 1 cell, so the tokens are the cached sampler's and a warning says why
    code, _, err = run([*base, "--decode", "speculative", "--out", str(tmp_path / "fp32")], capsys)
    assert code == 0 and err.count("speculative decoding runs as plain cached decoding for 4 model rows") == 1
    code, _, _ = run([*base, "--out", str(tmp_path / "cached")], capsys)
    pngs = lambda d: [p.read_bytes() for p in sorted((tmp_path / d).iterdir())]  # noqa: E731
    assert code == 0 and pngs("fp32") == pngs("cached")


def test_relaxed_speculative_decoding_samples_and_needs_the_speculative_mode(bundle, tmp_path, capsys):
    # 2 candidates under guidance: 4 model rows, the most that get a window on the CPU
    base = ["a red circle", "--model", str(bundle), "--candidates", "2", "--num-images", "2", "--json"]
    code, out, err = run(
        [*base, "--decode", "speculative", "--dtype", "bf16", "--relax", "0.3", "--out", str(tmp_path)], capsys
    )
    assert code == 0 and len(out.splitlines()) == 2 and "warning" not in err
    # fp32 on the CPU decodes plainly, exactly: the warning says the relaxed test relaxed nothing
    code, out, err = run([*base, "--decode", "speculative", "--relax", "0.3", "--out", str(tmp_path / "fp32")], capsys)
    assert code == 0 and len(out.splitlines()) == 2
    assert "runs as plain cached decoding (exact: --relax 0.3 changes nothing) for 4 model rows" in err
    code, _, err = run([*base, "--relax", "0.3"], capsys)
    assert code == 2 and "--relax relaxes speculative decoding's test, and --decode is cached; set it to" in err
    code, _, err = run([*base, "--decode", "speculative", "--relax", "1"], capsys)
    assert code == 2 and "--relax is 1.0; give a probability mass in [0, 1)" in err
    # the relaxed test's group is the draft and its nearest codes: one neighbour (the draft alone) relaxes nothing
    relaxed = SampleConfig(decode="speculative", speculative_relax=0.3)
    check_settings(dataclasses.replace(relaxed, speculative_neighbours=2))
    with pytest.raises(UserError, match="'sample.speculative_neighbours' is 1 \\(the draft alone\\); set it to 2"):
        check_settings(dataclasses.replace(relaxed, speculative_neighbours=1))
    with pytest.raises(UserError, match="'sample.speculative_neighbours' is 0; set it to 1 or more"):
        check_settings(dataclasses.replace(relaxed, speculative_neighbours=0))
    # sizes a downloaded bundle's config.json may hold: each once allocated tens of GB when its method ran
    sizes = (("prior_samples", 10**8, "draw 1 to 64 embeddings"), ("guided_cutouts", 10**7, "use 1 to 256"))
    for key, bad, say in sizes:
        check_settings(dataclasses.replace(relaxed, **{key: 2}))
        with pytest.raises(UserError, match=f"^config key 'sample.{key}' is {bad}; {say}"):
            check_settings(dataclasses.replace(relaxed, **{key: bad}))


def test_clip_guided_from_random_codes_with_the_prior_writes_its_images(bundle, tmp_path, capsys):
    args = ["a red circle", "--model", str(bundle), "--method", "clip-guided", "--init", "random"]
    code, out, _ = run([*args, "--guided-prior-weight", "0.5", "--out", str(tmp_path), "--json"], capsys)
    assert code == 0 and len(out.splitlines()) == 2 and len(list(tmp_path.glob("*_r*.png"))) == 2
    jacobi = tmp_path / "jacobi"
    code, out, _ = run(
        [*args, "--guided-prior-weight", "0.5", "--guided-optimizer", "jacobi", "--guidance-until", "0.5",
         "--out", str(jacobi)], capsys,
    )  # fmt: skip
    assert code == 0 and len(list(jacobi.glob("*_r*.png"))) == 2
    # by Adam from random codes nothing reads the transformer's guided predictions (once accepted, and no effect)
    for flag in ("--guidance-scale", "--guidance-until"):
        code, _, err = run([*args, "--guided-prior-weight", "0", flag, "0.5"], capsys)
        assert code == 2 and f"{flag} guides the transformer's predictions, which refinement of random codes" in err
    code, _, err = run([*args, "--guided-prior-weight", "0", "--guided-optimizer", "sgd"], capsys)
    assert code == 2 and "invalid choice: 'sgd'" in err
    code, _, err = run([*args[:3], "--init", "random"], capsys)
    assert code == 2 and "use it with --method clip-guided" in err
    # random codes are refined, not sampled: the sampler's settings would do nothing, and --num-images alone counts
    code, _, err = run([*args, "--guided-prior-weight", "0.5", "--temperature", "0.7"], capsys)
    assert code == 2 and "--temperature shapes how candidates are sampled, and --init random samples none" in err
    code, _, err = run([*args, "--guided-prior-weight", "0.5", "--num-images", "0"], capsys)
    assert code == 2 and "--num-images is 0; --init random refines that many random starts" in err  # once --candidates
    code, out, _ = run(
        [*args, "--guided-prior-weight", "0.5", "--num-images", "3", "--json", "--out", str(jacobi)], capsys
    )
    assert code == 0 and len(out.splitlines()) == 3  # more images than the bundle's candidates (2) is fine here
    code, _, err = run([*args, "--guided-prior-weight", "0", "--guided-optimizer", "jacobi"], capsys)
    assert code == 2 and "--guided-optimizer jacobi moves along the transformer's predictions" in err


def test_options_of_another_method_or_use_are_refused_not_ignored(bundle, capsys):
    base = ["a red circle", "--model", str(bundle)]
    for flag, value in (("--guided-prior-weight", "0.5"), ("--guided-optimizer", "adam"),
                        ("--guided-contrast-weight", "0.5")):  # fmt: skip
        code, _, err = run([*base, flag, value], capsys)
        assert code == 2 and f"{flag} tunes the refinement of --method clip-guided; add it or leave {flag} out" in err
    code, _, err = run([*base, "--method", "unclip", "--guided-contrast-guard"], capsys)
    assert code == 2 and "--guided-contrast-guard tunes the refinement of --method clip-guided" in err
    code, _, err = run([*base, "--prior-guidance-scale", "2"], capsys)
    assert code == 2 and "--prior-guidance-scale guides the prior of --method unclip" in err
    code, _, err = run(["--variations", "x.png", "--model", str(bundle), "--keep-rows", "2"], capsys)
    assert code == 2 and "--variations cannot go with --method, --init, --init-image or --keep-rows" in err


def test_compile_is_decode_compiled_and_goes_with_no_other_mode(capsys):
    code, _, err = run(["a red circle", "--compile", "--decode", "speculative"], capsys)
    assert code == 2 and "--compile is --decode compiled; it cannot go with --decode speculative" in err


def test_a_prompt_gives_the_same_ids_alone_with_its_seed(pipe):
    together = pipe.generate(["a red circle", "a green triangle"], seed=5, progress=False)
    alone = pipe.generate(["a green triangle"], seed=together[1][0].seed, progress=False)
    assert together[1][0].seed == 6
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(together[1], alone[0]))


def test_should_stop_is_asked_at_each_row_and_stops_generate_and_edit(pipe):
    from dalle_mini_impl.pipeline.pipeline import Stopped

    asked = []

    def stop_at_the_third():
        asked.append(1)
        return len(asked) == 3

    with pytest.raises(Stopped):
        pipe.generate("a red circle", candidates=8, progress=False, should_stop=stop_at_the_third)
    assert len(asked) == 3
    never = pipe.generate("a red circle", candidates=8, seed=3, progress=False, should_stop=lambda: False)
    plain = pipe.generate("a red circle", candidates=8, seed=3, progress=False)
    assert [torch.equal(a.ids, b.ids) for a, b in zip(never[0], plain[0])] == [True] * len(plain[0])
    image = plain[0][0].image
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, image.size[0], image.size[1] // 2))
    with pytest.raises(Stopped):
        pipe.edit("a blue square", image, mask, progress=False, should_stop=lambda: True)


def test_the_library_takes_what_a_caller_would_pass_or_says_in_one_sentence(bundle, pipe, tmp_path):
    """Library use (helper 34's review): a torch.device, a single image where a list is asked, a flat list of ids;
    and one sentence for a seed that is a Generator, a prompt that is no str, an unknown setting, uint8 pixels.
    Once: a device object refused as "device 'cpu' is unknown", one image path read as one image per character,
    ["a red circle"] scored as the text "['a red circle']", and a pipeline's decode mode written into the
    caller's config."""
    import numpy as np

    from dalle_mini_impl.config import read_config_json

    assert Pipeline.from_pretrained(bundle, device=torch.device("cpu"), dtype=torch.float32).device.type == "cpu"
    with pytest.raises(UserError, match="^device 'cuda:x' is unknown"):
        Pipeline.from_pretrained(bundle, device="cuda:x")
    cfg = read_config_json(bundle / "config.json")
    mode = cfg.sample.decode
    Pipeline(cfg, pipe.text_tokenizer, pipe.transformer, pipe.image_tokenizer, pipe.clip, decode="static")
    assert cfg.sample.decode == mode  # the caller's config is the caller's
    for seed, says in [(torch.Generator().manual_seed(0), "--seed is <torch._C.Generator"), (1.5, "--seed is 1.5;")]:
        with pytest.raises(UserError, match=re.escape(says)):
            pipe.generate("a red circle", seed=seed, progress=False)
    with pytest.raises(UserError, match="^prompt 1 is a bytes, not text; give each prompt as a str$"):
        pipe.generate([b"a red circle"], progress=False)
    with pytest.raises(UserError, match="^no prompt was given"):
        pipe.generate(None, progress=False)
    with pytest.raises(UserError, match="^'method' is not a sampling setting here"):
        pipe.edit("a red circle", Image.new("RGB", (16, 16)), Image.new("L", (16, 16), 255), method="ar")
    # one image, as a path, a PIL image or an array, is a list of one; an array reads as the same image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    one = [pipe.image_embeddings(x) for x in (str(tmp_path / "a.png"), image, np.asarray(image), [image])]
    assert all(e.shape == (1, one[0].shape[1]) and torch.equal(e, one[0]) for e in one)
    with pytest.raises(UserError, match="^image is a int; give a file path, a PIL image or an"):
        pipe.image_embeddings([7])
    # the CLIP scorer: a str is one text; a list where one prompt goes, uint8 or 0..255 pixels are one sentence
    assert pipe.clip.embed_texts("a red circle").shape[0] == 1
    with pytest.raises(UserError, match="^score takes one prompt as a str, not a list"):
        pipe.clip.score(torch.rand(1, 3, 16, 16), ["a red circle"])
    with pytest.raises(UserError, match=r"^images are a torch.uint8 tensor .* \(uint8 pixels: divide by 255\)$"):
        pipe.clip.score((torch.rand(1, 3, 16, 16) * 255).to(torch.uint8), "a red circle")
    with pytest.raises(UserError, match="^images hold values up to 2[0-9][0-9]"):
        pipe.clip.score(torch.rand(1, 3, 16, 16) * 255, "a red circle")
    with pytest.raises(UserError, match="^the labels are one string, 'circle'; give a list of labels"):
        pipe.clip.classify(torch.rand(1, 3, 16, 16), "circle")
    assert pipe.clip.classify(torch.rand(2, 3, 16, 16), ["circle", "square"], "a {}").shape == (2, 2)
    # a flat list of ids decodes as one row, as a (t,) tensor does
    ids = pipe.text_tokenizer.encode(["a red circle"])[0]
    assert pipe.text_tokenizer.decode(ids.tolist()) == pipe.text_tokenizer.decode(ids) == ["a red circle"]


def test_a_bundles_unusable_sampling_setting_is_named_as_its_config_key_when_it_loads(bundle, tmp_path, capsys):
    """A hand-edited config.json with sample.num_images 0 was refused at the first prompt as "--num-images is 0",
    a flag the user never gave; an evaluation's --set sample.temperature=0 as "--temperature is 0.0", a flag no
    evaluation has."""
    from dalle_mini_impl.config import read_config_json, save_config
    from dalle_mini_impl.eval import __main__ as eval_cli

    folder = shutil.copytree(bundle, tmp_path / "edited")
    cfg = read_config_json(folder / "config.json")
    cfg.sample.num_images = 0
    save_config(cfg, folder / "config.json")
    with pytest.raises(UserError) as e:
        Pipeline.from_pretrained(folder, device="cpu")
    assert str(e.value) == (
        f"model '{folder}' (its config.json): config key 'sample.num_images' is 0; keep at least 1 image per prompt"
    )
    with pytest.raises(SystemExit):
        run_cli(eval_cli.main, ["shapes", "--model", str(bundle), "--n", "4", "--set", "sample.temperature=0"])
    says = "error: --set: config key 'sample.temperature' is 0.0; it must be above 0, at least 1e-06 (greedy decoding: "
    says += "config key 'sample.top_k' 1)"
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(says)


def test_candidates_are_reranked_by_clip(pipe):
    results = pipe.generate(["a red circle"], num_images=4, candidates=4, seed=0, progress=False)[0]
    scores = pipe.clip.score(pipe.decode(torch.stack([r.ids for r in results])), "a red circle")
    assert [r.rank for r in results] == [1, 2, 3, 4]
    assert torch.allclose(scores, torch.tensor([r.clip_score for r in results]), atol=1e-5)
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    best = pipe.generate(["a red circle"], num_images=1, candidates=4, seed=0, progress=False)[0][0]
    assert torch.equal(best.ids, results[0].ids)


def test_a_bundle_without_clip_keeps_sample_order_and_warns(bundle, tmp_path):
    folder = shutil.copytree(bundle, tmp_path / "noclip")
    (folder / "clip.safetensors").unlink()
    with pytest.warns(UserWarning, match="no clip.safetensors"):
        no_clip = Pipeline.from_pretrained(folder, device="cpu")
    results = no_clip.generate(["a red circle"], num_images=2, candidates=3, seed=0, progress=False)[0]
    assert [r.clip_score for r in results] == [None, None]
    with_clip = Pipeline.from_pretrained(bundle, device="cpu")
    with_clip.clip = None  # the same models: the first two samples, in the order they were drawn
    first = with_clip.generate(["a red circle"], num_images=2, candidates=3, seed=0, progress=False)[0]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(results, first))


def test_bf16_samples_from_bf16_weights_and_fp16_on_cpu_is_refused(bundle):
    pipe = Pipeline.from_pretrained(bundle, device="cpu", dtype="bf16")
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    results = pipe.generate(["a red circle"], progress=False)
    assert len(results[0]) == 2
    assert results[0][0].image.size == (16, 16)
    with pytest.raises(UserError, match="fp16 is not supported on the CPU"):
        Pipeline.from_pretrained(bundle, device="cpu", dtype="fp16")


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence, exit code 2
# ----------------------------------------------------------------------------------------------

BAD_ARGS = [
    (["   "], "prompt 1 is empty"),
    (["a red circle", ""], "prompt 2 is empty"),
    (["a red circle", "--num-images", "5", "--candidates", "4"], "--num-images 5 is above --candidates 4"),
    (["a red circle", "--candidates", "0", "--num-images", "1"], "--candidates is 0"),
    (["a red circle", "--temperature", "-1"], "--temperature is -1.0"),
    (["a red circle", "--top-p", "0"], "--top-p is 0.0"),
    (["a red circle", "--top-p", "1.5"], "--top-p is 1.5"),
    (["a red circle", "--top-k", "-2"], "--top-k is -2"),
    (["a red circle", "--cfg", "nan"], "--guidance-scale is nan"),
    (["a red circle", "--guidance-scale", "inf"], "--guidance-scale is inf"),
    (["a red circle", "--guidance-until", "1.5"], "--guidance-until is 1.5; give the guided fraction"),
    (["a red circle", "--guidance-until", "nan"], "--guidance-until is nan"),
    (["a red circle", "--keep-rows", "2"], "--keep-rows needs an image to complete"),
    (["a red circle", "--keep-rows", "0"], "--keep-rows needs an image to complete"),
    (["a red circle", "--seed", "-1"], "--seed is -1"),
    (["a red circle", "--init-image", "{image}", "--keep-rows", "4"], "--keep-rows is 4, outside this model's grid"),
    (["a red circle", "--init-image", "{image}", "--keep-rows", "0"], "--keep-rows is 0"),
    (["a red circle", "--init-image", "missing.png"], "image 'missing.png' does not exist"),
    (["a red circle", "--dtype", "fp16", "--device", "cpu"], "fp16 is not supported on the CPU"),
    (["a red circle:x | a blue square", "--method", "clip-guided"], "the weight 'x'"),
]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.new("RGB", (20, 16), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("args,message", BAD_ARGS)
def test_bad_arguments_are_one_sentence_and_exit_2(bundle, image_file, tmp_path, capsys, args, message):
    args = [a.replace("{image}", str(image_file)) for a in args]
    code, stdout, stderr = run([*args, "--model", str(bundle), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "o").exists()


def _broken(bundle: Path, tmp_path: Path, how: str) -> Path:
    folder = shutil.copytree(bundle, tmp_path / "broken")
    if how.startswith("rm "):
        (folder / how[3:]).unlink()
    elif how.startswith("garbage "):
        (folder / how[8:]).write_bytes(b"\x00 not safetensors \xff" * 10)
    elif how == "huge depth":  # must be refused from the weights' header, not after building 2**70 blocks
        values = json.loads((folder / "transformer.json").read_text())
        (folder / "transformer.json").write_text(json.dumps({**values, "depth": 2**70}))
    elif how.startswith("unknown key in "):  # a newer code's key, or a typo: named with the file it is in
        name = how.rpartition(" ")[2]
        values = json.loads((folder / name).read_text())
        if name == "config.json":
            values["sample"]["new_knob"] = 1
        else:
            values["new_knob"] = 1
        (folder / name).write_text(json.dumps(values))
    elif how == "truncated transformer":
        data = (folder / "transformer.safetensors").read_bytes()
        (folder / "transformer.safetensors").write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize(
    "how,message",
    [
        ("rm transformer.safetensors", "has no transformer.safetensors"),
        ("rm transformer.json", "has no transformer.json"),
        ("rm text.model", "has no text.model"),
        ("rm vae.safetensors", "has no vae.safetensors"),
        ("rm config.json", "has no config.json"),
        ("garbage transformer.safetensors", "is corrupted or not a safetensors file"),
        ("truncated transformer", "is corrupted or not a safetensors file"),
        ("garbage clip.safetensors", "is corrupted or not a safetensors file"),
        ("garbage vae.safetensors", "is corrupt or not safetensors"),
        ("garbage transformer.json", "is not a valid transformer config"),
        ("huge depth", "holds a model of depth 2; use the transformer.json saved beside"),
        ("unknown key in transformer.json", "transformer.json' is not a valid transformer config (unknown config key"),
        ("unknown key in config.json", "config.json': unknown config key 'sample.new_knob'"),
    ],
)
def test_a_missing_or_broken_model_file_is_one_sentence(bundle, tmp_path, capsys, how, message):
    folder = _broken(bundle, tmp_path, how)
    code, _, stderr = run(["a red circle", "--model", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in stderr and stderr.count("\n") == 1


# side files edited to sizes the weights do not have: each once allocated gigabytes (or built layers for hours) before
# the weights were compared with them, and ended in "DefaultCPUAllocator: can't allocate memory"
HUGE_SIDES = [
    ("transformer.json", ("heads",), 10**6, "transformer.json' does not describe the weights in"),
    ("transformer.json", ("text_vocab",), 4 * 10**6, "('text_emb.weight' has shape ("),
    ("unclip.json", ("heads",), 10**6, "unclip.json' does not describe the weights in"),
    ("vae.json", ("kwargs", "res_blocks"), 10**8, "vae.json' does not describe the weights in"),
    ("config.json", ("clip", "image_depth"), 10**7, "config.json' (its clip, data and text sections"),
    ("prior.json", ("prior", "depth"), 10**7, "build more than the"),
    # sizes no tensor can have, not even on the meta device: a negative width, a size that overflows
    ("transformer.json", ("mlp_ratio",), -3.0, "transformer.json' is not a valid transformer config (Trying to create"),
    ("vae.json", ("kwargs", "code_dim"), 2**62, "vae.json' holds settings this code cannot build (Storage size"),
]


def test_a_side_file_asking_for_huge_sizes_is_one_sentence_before_any_memory_is_spent(tmp_path):
    """Every model is first built on the meta device from its side file's sizes and compared with the weights'
    header. Loaded in a process whose data segment may grow by 300 MB at most, so that a side file read the old
    way fails there rather than filling this machine's memory."""
    bundle = make_tiny_bundle(tmp_path / "bundle", unclip=True)
    folders = []
    for i, (name, keys, value, _) in enumerate(HUGE_SIDES):
        folder = Path(shutil.copytree(bundle, tmp_path / f"huge{i}"))
        values = json.loads((folder / name).read_text())
        node = values
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        (folder / name).write_text(json.dumps(values))
        folders.append(str(folder))
    code = (
        "import json, re, resource, sys\n"
        "from dalle_mini_impl.errors import UserError\n"
        "from dalle_mini_impl.pipeline.pipeline import Pipeline\n"
        "used = int(re.search(r'VmData:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (used + 300 * 2**20, resource.RLIM_INFINITY))\n"
        "for folder in sys.argv[1:]:\n"
        "    try:\n"
        "        Pipeline.from_pretrained(folder, device='cpu')\n"
        "        print(json.dumps('loaded'), flush=True)\n"
        "    except UserError as e:\n"
        "        print(json.dumps(str(e)), flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *folders], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120
    )
    said = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(said) == len(HUGE_SIDES), done.stderr[-2000:]
    for message, (name, keys, value, expected), folder in zip(said, HUGE_SIDES, folders):
        assert expected in message and "\n" not in message, (name, keys, value, message)
        assert message.startswith(f"'{folder}/{name}'"), message  # names the side file


def test_a_missing_model_folder_and_the_missing_shipped_model(tmp_path, monkeypatch, capsys):
    code, _, stderr = run(["a red circle", "--model", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist; pass --model" in stderr
    from dalle_mini_impl.pipeline import bundle as bundles

    monkeypatch.setattr(bundles, "SHIPPED_MODEL", tmp_path / "assets" / "shapes")
    code, _, stderr = run(["a red circle"], capsys)
    assert code == 2 and "the shipped model is missing" in stderr and "--model RUN_FOLDER" in stderr


def test_clip_guided_without_clip_is_refused(bundle, tmp_path, capsys):
    folder = _broken(bundle, tmp_path, "rm clip.safetensors")
    code, _, stderr = run(["a red circle", "--model", str(folder), "--method", "clip-guided"], capsys)
    assert code == 2 and "needs a bundle with clip.safetensors" in stderr
    assert stderr.startswith("warning: ") and "no clip.safetensors" in stderr  # said before the error


def test_a_long_prompt_is_truncated_with_a_warning(bundle, pipe, tmp_path, capsys):
    prompt = "a red circle and a blue square and a green triangle on the left at the top"
    _, dropped = pipe.text_tokenizer.encode_with_info([prompt])
    assert dropped[0] > 0
    code, stdout, stderr = run([prompt, "--model", str(bundle), "--out", str(tmp_path), "--json"], capsys)
    assert code == 0 and len(stdout.splitlines()) == 2
    assert (
        f"warning: prompt '{prompt}' is longer than the model's 12 text tokens; {dropped[0]} tokens were dropped"
        in stderr
    )
    with pytest.warns(UserWarning, match=f"{dropped[0]} tokens were dropped"):
        pipe.generate([prompt], progress=False)


def test_the_library_raises_user_errors_too(pipe):
    with pytest.raises(UserError, match="prompt 1 is empty"):
        pipe.generate([" \n"], progress=False)
    with pytest.raises(UserError, match="--num-images 3 is above --candidates 2"):
        pipe.generate(["a red circle"], num_images=3, candidates=2, progress=False)
    with pytest.raises(UserError, match="method 'diffusion' is unknown"):
        pipe.generate(["a red circle"], method="diffusion", progress=False)


def test_a_real_subprocess_says_one_sentence_without_traceback(bundle, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sample", "  ", "--model", str(bundle), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: prompt 1 is empty; describe the image, e.g. 'a red circle'"
    assert proc.stdout == ""


def test_a_prompt_with_an_emoji_prints_to_an_output_that_is_not_utf8(bundle, tmp_path):
    """A Windows console's code page, redirected: once a UnicodeEncodeError traceback after the PNGs were written,
    with the summary line and with --json."""
    prompt = "a red circle \U0001f355"
    base = [sys.executable, "-m", "sample", prompt, "--model", str(bundle), "--num-images", "1", "--candidates", "1"]
    cp1252 = {**env(), "PYTHONIOENCODING": "cp1252"}
    for extra in ([], ["--json"]):
        cmd = [*base, "--out", str(tmp_path / f"out{len(extra)}"), *extra]
        proc = subprocess.run(cmd, capture_output=True, env=cp1252, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode("cp1252")[-2000:]
        first = proc.stdout.decode("cp1252").splitlines()[0]
        if extra:
            assert json.loads(first)["prompt"] == prompt  # escaped as JSON escapes it
        else:
            assert first.startswith("'a red circle \\U0001f355': ")


def test_the_sampling_path_imports_no_training_libraries(bundle, tmp_path):
    code = (
        "import json, sys\n"
        "from sample.__main__ import main\n"
        f"main(['a red circle', '--model', {str(bundle)!r}, '--out', {str(tmp_path)!r}, '--json'])\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or 'tensorboard' in m)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    *images, loaded = proc.stdout.splitlines()
    assert len(images) == 2 and json.loads(loaded) == []
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# CLIP-guided refinement
# ----------------------------------------------------------------------------------------------


def test_weighted_prompts_parse_and_bad_weights_are_one_sentence():
    assert parse_weighted_prompt("a red circle:1 | a blue square:-0.5") == [
        ("a red circle", 1.0),
        ("a blue square", -0.5),
    ]
    assert parse_weighted_prompt("a red circle") == [("a red circle", 1.0)]
    assert parse_weighted_prompt("a red circle | a blue square:2") == [("a red circle", 1.0), ("a blue square", 2.0)]
    # a colon of the caption's own: words after a space (an emoji name), or digits on both sides (once a weight)
    assert parse_weighted_prompt("flag: japan, noto style") == [("flag: japan, noto style", 1.0)]
    assert parse_weighted_prompt("a clock at 12:30 | a dog: 2") == [("a clock at 12:30", 1.0), ("a dog", 2.0)]
    with pytest.raises(UserError, match="the weight 'heavy' in prompt part 'a red circle:heavy' is not a number"):
        parse_weighted_prompt("a red circle:heavy")
    with pytest.raises(UserError, match="the weight 'inf'"):
        parse_weighted_prompt("a red circle:inf")
    with pytest.raises(UserError, match="has an empty part"):
        parse_weighted_prompt("a red circle | :1")
    with pytest.raises(UserError, match="no part with a positive weight"):
        parse_weighted_prompt("a red circle:-1")


def test_cutouts_flip_only_when_no_side_is_named():
    assert mentions_sides(["a circle on the LEFT"]) and mentions_sides(["x", "right of it"])
    assert not mentions_sides(["a red circle", "bright colors"])
    images = torch.zeros(2, 3, 16, 16)
    images[..., :8] = 1  # left half white
    g = torch.Generator().manual_seed(0)
    crops = make_cutouts(images, 8, 12, g, flips=False)
    assert crops.shape == (16, 3, 12, 12)
    assert (crops[..., :, :4].mean() > 0.9) and (crops[..., :, -4:].mean() < 0.1)  # never mirrored
    flipped = make_cutouts(images, 8, 12, torch.Generator().manual_seed(0), flips=True)
    assert (flipped[..., :, -4:].mean(dim=(1, 2, 3)) > 0.9).any()


def test_refinement_mirrors_no_cutout_of_a_caption_the_bundle_keeps_from_mirror_images(pipe, monkeypatch):
    """The emoji bundle trains on mirror images but for captions such as `letter j` (data.encode_flip_exclude); its
    VQGAN+CLIP still mirrored their cutouts, pulling a `j` toward what also reads as `j` mirrored."""
    from dalle_mini_impl.pipeline import guided

    seen = []
    real = guided.make_cutouts
    monkeypatch.setattr(guided, "make_cutouts", lambda *a, **kw: seen.append(a[-1]) or real(*a, **kw))
    monkeypatch.setattr(pipe.cfg.data, "encode_flip_exclude", r"\bletter\b")
    s = dataclasses.replace(pipe.cfg.sample, guided_steps=1, guided_cutouts=2, guided_prior_weight=0.0)
    start = random_codes(pipe.image_tokenizer.codebook_size, 1, *pipe.grid, torch.Generator().manual_seed(0))
    for prompt, flips in [("a red circle", True), ("LETTER j", False), ("a circle on the left", False)]:
        seen.clear()
        pipe.refine(start, [(prompt, 1.0)], s, torch.Generator().manual_seed(0))
        assert seen and set(seen) == {flips}, prompt
    assert pipe.mirrors_keep(["a red circle", "bright"]) and not pipe.mirrors_keep(["a red circle", "letter x"])


def test_clip_guided_refinement_raises_the_score_of_its_start(pipe):
    g = torch.Generator().manual_seed(0)
    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 3, h, w, g)
    parts = [("a red circle", 1.0)]
    before = pipe.clip.score(pipe.decode(start), "a red circle")
    weights = {k: v.clone() for k, v in {**pipe.clip.model.state_dict(), **pipe.image_tokenizer.state_dict()}.items()}
    ids, images, scores = refine(
        pipe.image_tokenizer, pipe.clip, parts, start, steps=8, lr=0.1, cutouts=4, generator=g, progress=False
    )
    assert (scores > before).all()
    assert (ids != start).any()
    # what comes back is a real grid of codes, its image and its score
    assert torch.allclose(pipe.decode(ids), images, atol=1e-5)
    assert torch.allclose(pipe.clip.score(images, "a red circle"), scores, atol=1e-5)
    after = {**pipe.clip.model.state_dict(), **pipe.image_tokenizer.state_dict()}
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert all(p.grad is None for p in pipe.clip.model.parameters())


def test_clip_guided_from_the_command_line_improves_on_ar(bundle, tmp_path, capsys):
    def scores(prompt: str, *method: str) -> list[float]:
        argv = [prompt, "--model", str(bundle), "--json", "--seed", "1", "--out", str(tmp_path), *method]
        code, stdout, stderr = run(argv, capsys)
        assert code == 0, stderr
        return [json.loads(line)["clip_score"] for line in stdout.splitlines()]

    ar, refined = scores("a red circle"), scores("a red circle", "--method", "clip-guided")
    assert len(refined) == 2 and refined == sorted(refined, reverse=True)
    # each kept sample is refined from itself and never comes back worse, so neither do the ranks
    assert all(r >= a - 1e-6 for r, a in zip(refined, ar)) and refined[0] > ar[0]
    weighted = scores("a red circle:1 | a blue square:-0.5", "--method", "clip-guided")
    assert len(weighted) == 2 and weighted == sorted(weighted, reverse=True)


# ----------------------------------------------------------------------------------------------
# Completion
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ar", "clip-guided"])
def test_completion_keeps_the_given_rows(pipe, image_file, method):
    given = pipe.encode_image(image_file)  # (h, w)
    results = pipe.generate(
        ["a green triangle"],
        candidates=4,
        num_images=2,
        seed=0,
        init_image=image_file,
        keep_rows=2,
        method=method,
        progress=False,
    )[0]
    for r in results:
        assert torch.equal(r.ids[:2], given[:2])
    assert any(not torch.equal(r.ids[2:], given[2:]) for r in results)
    pil = pipe.generate(
        ["a green triangle"], candidates=2, num_images=1, init_image=Image.open(image_file), keep_rows=1, progress=False
    )[0][0]
    assert torch.equal(pil.ids[:1], given[:1])


def test_completion_from_the_command_line(bundle, image_file, tmp_path, capsys):
    code, stdout, stderr = run(
        ["a red circle", "--model", str(bundle), "--out", str(tmp_path), "--init-image", str(image_file), "--json"],
        capsys,
    )
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 2  # --keep-rows defaults to half the grid


def test_a_bundle_with_product_codes_samples_refines_and_checks_its_parts(tmp_path):
    """A dVAE with groups of 4 and 9 codes (36 ids) and a transformer built for them, end to end."""
    from tests.bundle_factory import tiny_config

    cfg = tiny_config()
    cfg.vae.codebook_size, cfg.vae.group_sizes, cfg.vae.group_dropout = 36, [4, 9], 0.5
    bundle = make_tiny_bundle(tmp_path / "product", cfg=cfg)
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    assert pipe.transformer.cfg.image_factors == [4, 9] and pipe.image_tokenizer.group_sizes == (4, 9)
    g = torch.Generator().manual_seed(0)
    ids = pipe.sample_ids(pipe.encode_prompt("a red circle"), pipe.settings(candidates=3), g)
    assert ids.shape == (3, 16) and 0 <= int(ids.min()) and int(ids.max()) < 36
    images = pipe.decode(ids)
    refined, _, _ = refine(
        pipe.image_tokenizer,
        pipe.clip,
        [("a red circle", 1.0)],
        ids.view(3, 4, 4),
        steps=2,
        lr=0.1,
        cutouts=2,
        generator=g,
        progress=False,
    )
    assert refined.shape == (3, 4, 4) and images.shape == (3, 3, 16, 16)
    # a one-group tokenizer of the same 36 ids under the same transformer: the parts do not fit
    import vae

    single = vae.build("dvae", codebook_size=36, factor=4, hidden=8, code_dim=16)
    vae.save_pretrained(single, bundle)
    with pytest.raises(UserError, match=r"image code groups \[4, 9\] vs \[36\]"):
        Pipeline.from_pretrained(bundle, device="cpu")


def test_an_older_bundle_with_the_cfg_key_samples_with_a_one_line_warning(bundle, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    values = json.loads((old / "config.json").read_text())
    values["sample"]["cfg"] = values["sample"].pop("guidance_scale")
    (old / "config.json").write_text(json.dumps(values))
    assert (
        main(["a red circle", "--model", str(old), "--out", str(tmp_path / "out"), "--candidates", "2", "--json"]) == 0
    )
    err = capsys.readouterr().err
    assert "warning: config key 'sample.cfg' is now 'sample.guidance_scale'; read it as that\n" in err


def test_an_older_transformer_json_loads_the_same_model(bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    values = json.loads((old / "transformer.json").read_text())
    for key in ("preset", "caption_dropout", "norm", "pads_in_loss"):  # absent from transformer.json files of old
        del values[key]
    (old / "transformer.json").write_text(json.dumps(values))
    new, older = (Pipeline.from_pretrained(b, device="cpu") for b in (bundle, old))
    assert older.transformer.cfg == new.transformer.cfg
    ids = [p.generate("a red circle", candidates=2, num_images=1, progress=False)[0][0].ids for p in (new, older)]
    assert torch.equal(ids[0], ids[1])


def test_a_shipped_bundle_is_named_and_a_folder_of_that_name_wins(tmp_path, monkeypatch):
    from dalle_mini_impl.pipeline import bundle as bundles

    monkeypatch.chdir(tmp_path)
    assert "shapes" in bundles.shipped_models()
    assert bundles.bundle_path("shapes") == bundles.SHIPPED_MODEL and bundles.bundle_path(None) == bundles.SHIPPED_MODEL
    (tmp_path / "shapes").mkdir()  # a folder of one's own called shapes is that folder
    assert bundles.bundle_path("shapes") == Path("shapes")
    with pytest.raises(UserError, match="model folder 'nope' does not exist; pass --model .* shipped one \\(.*shapes"):
        bundles.read_bundle_config("nope")
    (tmp_path / "afile").write_text("x")  # once "does not exist", of a file that does
    with pytest.raises(UserError, match="model folder 'afile' is a file, not a folder; pass --model"):
        bundles.read_bundle_config("afile")
    with pytest.raises(UserError, match="--judge 'afile' is a file, not a folder; pass the folder python -m"):
        bundles.judge_path("afile")


def test_guidance_until_reaches_the_sampler(bundle):
    from dalle_mini_impl.pipeline.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    kw = dict(candidates=3, num_images=3, seed=5, progress=False)
    ids = {
        name: [r.ids for r in pipe.generate("a red circle", **kw, **extra)[0]]
        for name, extra in {
            "unguided": dict(guidance_scale=1.0),
            "guided for none of the image": dict(guidance_scale=3.0, guidance_until=0.0),
            "guided": dict(guidance_scale=3.0),
        }.items()
    }
    assert all(torch.equal(a, b) for a, b in zip(ids["unguided"], ids["guided for none of the image"]))
    assert not all(torch.equal(a, b) for a, b in zip(ids["unguided"], ids["guided"]))


def test_kept_images_are_distinct_and_repeats_are_the_last_resort_with_a_warning(bundle, tmp_path, capsys):
    from dalle_mini_impl.pipeline.pipeline import MAX_EXTRA_ROUNDS, Pipeline

    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    kept = pipe.generate("a red circle", candidates=6, num_images=4, seed=0, temperature=2.0, progress=False)[0]
    pixels = [r.image.tobytes() for r in kept]
    assert len(set(pixels)) == 4  # four different images, best first
    assert [r.clip_score for r in kept] == sorted((r.clip_score for r in kept), reverse=True)
    # greedy decoding draws one image however often it samples: more rounds, then a warning and repeats
    argv = ["a red circle", "--top-k", "1", "--candidates", "2", "--num-images", "2", "--json"]
    code, out, err = run([*argv, "--model", str(bundle), "--out", str(tmp_path / "o")], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2] and all(Path(r["path"]).is_file() for r in rows)
    samples = 2 * (1 + MAX_EXTRA_ROUNDS)
    assert f"prompt 'a red circle' gave only 1 distinct image in {samples} samples; some of its 2 images repeat" in err
    assert Path(rows[0]["path"]).read_bytes() == Path(rows[1]["path"]).read_bytes()


def test_clip_guided_refinement_that_joins_starts_refines_the_next_candidates_then_warns(bundle, monkeypatch):
    """Once: refinement led kept candidates to one image (3 of 4 alike) and nothing said so. Refinement is made to
    collapse here: each call's starts all become the first one's refined image."""
    from dalle_mini_impl.pipeline.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    real, starts = pipe.refine, []

    def collapsing(ids, *args, **kwargs):
        starts.append(len(ids))
        out = real(ids, *args, **kwargs)
        return tuple(t[:1].expand_as(t).clone() for t in out)

    monkeypatch.setattr(pipe, "refine", collapsing)
    settings = {"candidates": 6, "num_images": 3, "seed": 0, "temperature": 2.0, "method": "clip-guided"}
    kept = pipe.generate("a red circle", **settings, progress=False)[0]
    assert len({r.image.tobytes() for r in kept}) == 3
    assert starts == [3, 2, 1]  # the kept three, then the next candidates, one for each image that repeated
    one = real(kept[0].ids[None], [("a red circle", 1.0)], pipe.settings(), torch.Generator().manual_seed(0))
    monkeypatch.setattr(pipe, "refine", lambda ids, *a, **k: tuple(t.expand(len(ids), *t.shape[1:]) for t in one))
    with pytest.warns(UserWarning, match="CLIP-guided refinement of 6 candidates gave only 1 distinct image"):
        kept = pipe.generate("a red circle", **settings, progress=False)[0]
    assert len({r.image.tobytes() for r in kept}) == 1 and len(kept) == 3


def test_kept_order_takes_the_best_and_repeats_them_in_rank_order_only_when_too_few():
    from dalle_mini_impl.pipeline.pipeline import kept_order

    order = torch.tensor([5, 3, 0, 7])  # candidate indices, best first
    assert kept_order(order, 2).tolist() == [5, 3]
    assert kept_order(order[:2], 4).tolist() == [5, 5, 3, 3]
    assert kept_order(order[:3], 4).tolist() == [5, 5, 3, 0]
    assert kept_order(order[:1], 3).tolist() == [5, 5, 5]
