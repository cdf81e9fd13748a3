"""DALL-E 2's recipe (unCLIP): the decoder that reads CLIP image embeddings, the prior that makes them, and their
uses (variations, interpolations, text diffs, --method unclip), on tiny models the tests build."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle_mini_impl.config import PriorConfig
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.model.generate import generate
from dalle_mini_impl.model.prior import EmbeddingPrior, slerp
from dalle_mini_impl.model.transformer import DALLE, preset_config
from dalle_mini_impl.pipeline.pipeline import Pipeline, ranked
from dalle_mini_impl.shapes.generator import parse_caption
from sample.__main__ import main
from tests.bundle_factory import make_tiny_bundle

pytestmark = pytest.mark.usefixtures("one_thread")

E = 8  # embedding width of the models built here


def decoder(**overrides) -> DALLE:
    torch.manual_seed(0)
    cfg = dict(dim=32, depth=2, heads=2, text_len=6, text_vocab=20, image_vocab=12, grid_h=3, grid_w=3)
    return DALLE(preset_config("tiny", **(cfg | dict(cond_dim=E, cond_len=2) | overrides)))


def prior(kind: str = "diffusion") -> EmbeddingPrior:
    torch.manual_seed(0)
    cfg = PriorConfig(kind=kind, dim=32, depth=2, heads=2, timesteps=100, sample_steps=8)
    return EmbeddingPrior(cfg, embed_dim=E, text_vocab=20, text_len=6, pad_id=0)


def batch(b: int = 16, seed: int = 0):
    """Text ids, image ids and unit embeddings where the image is a function of the embedding."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(b, E, generator=g), dim=-1)
    text = torch.randint(1, 20, (1, 6), generator=g).expand(b, -1)  # one caption: it says nothing of the image
    image = (emb[:, :1] > 0).long().expand(b, 9) * 5 + torch.arange(9) % 3  # its first cell: the embedding's sign
    return text, image, emb


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------


def test_the_decoder_trains_and_learns_from_the_embedding():
    model = decoder()
    text, image, emb = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, parts = model.loss(text, image, emb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else parts["image_loss"].item()
    with torch.no_grad():
        with_emb = model.loss(text, image, emb)[1]["image_loss"].item()
        dropped = model.loss(text, image, torch.zeros_like(emb))[1]["image_loss"].item()
    assert with_emb < 0.5 * first  # it learned ...
    # ... and what it learned needs the embedding: without it the first cell is a coin toss, log(2) / 9 cells
    assert dropped - with_emb > 0.05


def test_the_embedding_moves_the_image_after_its_positions():
    model = decoder(pos_2d="rope", attn_patterns=["full", "row"])
    c = model.cfg
    assert c.prefix_len == 8 and c.seq_len == 8 + 9 - 1
    text, image, emb = batch(b=2)
    h = model.hidden(text, image, emb)
    assert h.shape == (2, c.seq_len, c.dim)
    logits = model(text, image, emb)  # the image's logits start at the last prefix position
    assert torch.isinf(logits[:, : c.prefix_len - 1, c.text_vocab :]).all()
    assert torch.isfinite(logits[:, c.prefix_len - 1 :, c.text_vocab :]).all()


def test_none_and_the_zero_vector_are_the_same_dropped_embedding():
    model = decoder()
    text, _, emb = batch(b=3)
    assert torch.equal(model.embed_prefix(text, None), model.embed_prefix(text, torch.zeros_like(emb)))
    assert not torch.equal(model.embed_prefix(text, emb), model.embed_prefix(text, None))


@pytest.mark.parametrize("decode", ["uncached", "cached", "static", "speculative"])
def test_guidance_contrasts_with_the_caption_and_the_embedding_both_dropped(decode):
    """Greedy guided decoding equals a reference that runs the full model on (caption, embedding) and on (empty
    caption, no embedding) and mixes u + s (c - u) at every step."""
    model = decoder().eval()
    text, _, emb = batch(b=2, seed=1)
    null = torch.zeros(1, 6, dtype=torch.long)
    null[0, 0] = 1
    ids = generate(
        model, text, cond=emb, null_text=null, guidance_scale=3.0, top_k=1, decode=decode, window=3, generator=None
    )
    ref = torch.empty(2, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(9):
            feed = torch.cat([ref, ref.new_zeros(2, 1)], dim=1)  # the last id is a placeholder, never fed
            c = model(text, feed, emb)[:, -1, model.cfg.text_vocab :]
            u = model(null.expand(2, -1), feed, None)[:, -1, model.cfg.text_vocab :]
            ref = torch.cat([ref, (u + 3.0 * (c - u)).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, ref)


def test_an_embedding_for_a_model_without_one_is_refused():
    plain = decoder(cond_dim=0, cond_len=0)
    text, _, emb = batch(b=2)
    with pytest.raises(ValueError, match="takes no embedding"):
        generate(plain, text, cond=emb)
    with pytest.raises(ValueError, match=r"cond must be \(2, 8\)"):
        generate(decoder(), text, cond=emb[:, :4])
    with pytest.raises(UserError, match="cond_len"):
        decoder(cond_len=0)


# ----------------------------------------------------------------------------------------------
# The prior
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["diffusion", "regression"])
def test_the_prior_trains_and_its_samples_approach_the_image_embeddings(kind):
    model = prior(kind)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 20, (4, 6), generator=g).repeat(8, 1)  # four captions, eight times each
    image_emb = F.normalize(torch.randn(4, E, generator=g), dim=-1).repeat(8, 1)
    text_emb = F.normalize(torch.randn(4, E, generator=g), dim=-1).repeat(8, 1)
    before = F.cosine_similarity(model.sample(text, text_emb, generator=g), image_emb).mean()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = model.loss(text, text_emb, image_emb, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = F.cosine_similarity(model.sample(text, text_emb, generator=g), image_emb).mean()
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert after > 0.8 > before


def test_prior_samples_are_unit_seeded_and_guided_samples_differ():
    model = prior()
    text, _, text_emb = batch(b=3)
    a = model.sample(text, text_emb, generator=torch.Generator().manual_seed(5))
    b = model.sample(text, text_emb, generator=torch.Generator().manual_seed(5))
    c = model.sample(text, text_emb, generator=torch.Generator().manual_seed(6))
    guided = model.sample(text, text_emb, generator=torch.Generator().manual_seed(5), guidance_scale=3.0)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3))
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, guided)
    regression = prior("regression")
    assert torch.equal(regression.sample(text, text_emb), regression.sample(text, text_emb))


def test_slerp_keeps_unit_length_and_its_ends():
    a, b = F.normalize(torch.randn(2, E), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(), torch.tensor(1.0)) and torch.allclose(mid @ a, mid @ b, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The uses: library and command line
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("unclip-bundle"), unclip=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, color in enumerate([(220, 30, 30), (30, 30, 220)]):
        im = Image.new("RGB", (16, 16), (255, 255, 255))
        im.paste(color, (4 + i, 4, 12, 12))
        paths.append(folder / f"square{i}.png")
        im.save(paths[-1])
    return paths


def record_sampling(pipe) -> list[tuple]:
    """(settings, cond) of every call `pipe` makes to its sampler from now on; the samples are drawn as before."""
    calls = []
    sample_ids = pipe.sample_ids

    def spy(text, s, generator, prime=None, bar=None, cond=None):
        calls.append((s, None if cond is None else cond.clone()))
        return sample_ids(text, s, generator, prime, bar, cond)

    pipe.sample_ids = spy
    return calls


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]


def test_variations_write_the_files_they_announce(bundle, images, tmp_path, capsys):
    code, out, _ = run(
        ["--model", str(bundle), "--variations", *map(str, images), "--num-images", "2", "--candidates", "3",
         "--out", str(tmp_path), "--json"], capsys,
    )  # fmt: skip
    assert code == 0
    records = json_lines(out)
    assert [(r["source"], r["rank"]) for r in records] == [(str(images[0]), 1), (str(images[0]), 2),
                                                          (str(images[1]), 1), (str(images[1]), 2)]  # fmt: skip
    assert [r["seed"] for r in records] == [0, 0, 1, 1]
    for r in records:
        assert Path(r["path"]).is_file() and Path(r["path"]).name.startswith(f"variation-square{r['seed']}_s")
        assert r["prompt"] == f"variation of square{r['seed']}.png"
    assert records[0]["clip_score"] >= records[1]["clip_score"]  # ranked by similarity to the source
    assert sorted(p.name for p in tmp_path.glob("*_grid.png")) == ["variation-square0_s0_grid.png",
                                                                  "variation-square1_s1_grid.png"]  # fmt: skip


def test_interpolation_writes_every_step_and_the_path(bundle, images, tmp_path, capsys):
    code, out, _ = run(
        ["--model", str(bundle), "--interpolate", *map(str, images), "--steps", "3", "--num-images", "1",
         "--candidates", "2", "--out", str(tmp_path), "--json"], capsys,
    )  # fmt: skip
    assert code == 0
    records = json_lines(out)
    assert [r["t"] for r in records] == [0.0, 0.5, 1.0]
    # the seed its file names carry, that draws the path again (once step k's own seed + k, which does not)
    assert [(r["seed"], r["step"]) for r in records] == [(0, 0), (0, 1), (0, 2)]
    names = [Path(r["path"]).name for r in records]
    assert names == [f"interpolate-square0-square1_s0_step{k}_r1.png" for k in range(3)]
    assert all(r["sources"] == [str(images[0]), str(images[1])] for r in records)
    assert all(Path(r["path"]).is_file() for r in records)
    assert (tmp_path / "interpolate-square0-square1_s0_path.png").is_file()
    with Image.open(tmp_path / "interpolate-square0-square1_s0_path.png") as grid:
        assert grid.width > 3 * 16  # three images side by side


def test_text_diff_and_method_unclip_write_their_files(bundle, images, tmp_path, capsys):
    code, out, _ = run(
        ["--model", str(bundle), "--variations", str(images[0]), "--text-diff", "a red square", "a blue square",
         "--text-diff-scale", "0.5", "--num-images", "1", "--candidates", "2", "--out", str(tmp_path / "d"),
         "--json"], capsys,
    )  # fmt: skip
    assert code == 0 and Path(json_lines(out)[0]["path"]).is_file()
    code, out, _ = run(
        ["--model", str(bundle), "a red circle", "--method", "unclip", "--num-images", "2", "--candidates", "3",
         "--out", str(tmp_path / "u"), "--json"], capsys,
    )  # fmt: skip
    records = json_lines(out)
    assert code == 0 and [r["rank"] for r in records] == [1, 2] and all(Path(r["path"]).is_file() for r in records)
    assert records[0]["clip_score"] >= records[1]["clip_score"]


def test_text_diff_turns_the_embedding_the_decoder_reads(bundle, images):
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    calls = record_sampling(pipe)
    kw = dict(num_images=1, candidates=1, progress=False)
    pipe.variations([images[0]], **kw)
    pipe.variations([images[0]], text_diff=("a red square", "a blue square"), text_diff_scale=0.0, **kw)
    pipe.variations([images[0]], text_diff=("a red square", "a blue square"), text_diff_scale=1.0, **kw)
    seen = [cond[0] for _, cond in calls]
    a, b = pipe.clip.embed_texts(["a red square", "a blue square"])
    assert torch.allclose(seen[0], pipe.clip.embed_images(pipe.as_drawn(pipe._read_images([images[0]])))[0], atol=1e-6)
    assert torch.allclose(seen[1], seen[0], atol=1e-5)  # scale 0: the image itself
    assert torch.allclose(seen[2], F.normalize(b - a, dim=-1), atol=1e-5)  # scale 1: the caption difference


def test_variations_and_interpolations_read_their_sources_as_the_tokenizer_draws_them(bundle, images):
    # the decoder trained on embeddings of images drawn by the tokenizer (train.embed): a source is drawn so first
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    given = pipe._read_images([images[0], images[1]])
    drawn = pipe.as_drawn(given)
    assert torch.equal(drawn[0], pipe.decode(pipe.encode_image(images[0])[None])[0])
    assert (drawn - given).abs().max() > 0.05  # the tiny tokenizer redraws it visibly
    calls = record_sampling(pipe)
    pipe.interpolate(images[0], images[1], 2, num_images=1, candidates=1, progress=False)
    seen = [cond[0] for _, cond in calls]
    ends = pipe.clip.embed_images(drawn)
    assert torch.allclose(seen[0], ends[0], atol=1e-6) and torch.allclose(seen[1], ends[1], atol=1e-5)
    assert not torch.allclose(seen[0], pipe.image_embeddings([images[0]])[0], atol=1e-3)
    # ranked against the images as given: scored by the drawn source, its own codes would always come first
    ranked = []
    pipe._kept = lambda label, seed, cond, targets, *args, **kw: ranked.append(targets) or []
    pipe.variations([images[0]], num_images=1, candidates=1, progress=False)
    pipe.interpolate(images[0], images[1], 2, num_images=1, candidates=1, progress=False)
    given_embeddings = pipe.clip.embed_images(given)
    assert torch.allclose(ranked[0], given_embeddings[:1]) and torch.allclose(ranked[1], given_embeddings[:1])
    assert torch.allclose(ranked[2], given_embeddings[1:])


def test_a_variation_is_never_its_source_as_the_tokenizer_draws_it(bundle, images):
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    source = pipe.as_drawn(pipe._read_images([images[0]]))  # (1, 3, S, S)
    other = pipe.as_drawn(pipe._read_images([images[1]]))
    ids, scores = torch.tensor([[1], [2], [3]]), torch.tensor([1.0, 0.5, 0.9])
    drawn = torch.cat([source, other, source])
    one = pipe.settings(num_images=1)
    kept = pipe._distinct("v", lambda: (ids, drawn, scores), one, None, exclude=source)
    assert torch.equal(kept[0], ids[1:2]) and torch.equal(kept[2], scores[1:2])  # the source's copies are left out
    assert torch.equal(pipe._distinct("v", lambda: (ids, drawn, scores), one, None)[0], ids[:2])  # without: kept
    only = pipe._distinct("v", lambda: (ids[:1], drawn[:1], scores[:1]), one, None, exclude=source)
    assert torch.equal(only[0], ids[:1])  # nothing else was drawn: the copy rather than no image at all
    two = pipe._distinct("v", lambda: (ids, drawn, scores), pipe.settings(num_images=2), None, exclude=source)
    assert torch.equal(two[0], ids[:2]) and torch.equal(two[2], scores[:2])  # too few others: the copy fills,
    assert torch.equal(ranked(two[2], two[3]), torch.tensor([1, 0]))  # ranked last, its own score kept


def test_an_extra_rounds_images_only_fill_places_so_the_first_image_does_not_hang_on_num_images(bundle, images):
    """Once a looser extra round's image, drawn because --num-images 4 asked for more distinct images than the
    first round had, outranked the first round's best: the first variation of a seed hung on --num-images."""
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    a, b = (pipe.as_drawn(pipe._read_images([im])) for im in images[:2])
    rounds = iter([(torch.tensor([[1], [1]]), torch.cat([a, a]), torch.tensor([0.5, 0.5])),
                   (torch.tensor([[2]]), b, torch.tensor([0.9]))])  # fmt: skip
    ids, _, scores, tiers = pipe._distinct("v", lambda: next(rounds), pipe.settings(num_images=2), None)
    assert torch.equal(ids, torch.tensor([[1], [2]])) and torch.equal(scores, torch.tensor([0.5, 0.9]))
    assert torch.equal(ranked(scores, tiers), torch.tensor([0, 1]))  # the first round's image first, 0.9 after
    assert torch.equal(ranked(None, tiers), torch.tensor([0, 1])) and torch.equal(
        ranked(torch.tensor([0.1, 0.3, 0.2]), torch.tensor([0, 0, 0])), torch.tensor([1, 2, 0])
    )
    result = [pipe.variations([images[0]], seed=3, num_images=n, progress=False)[0][0] for n in (1, 4)]
    assert torch.equal(result[0].ids, result[1].ids)


def test_a_prior_of_another_clip_or_text_tokenizer_is_one_sentence_at_load(bundle, tmp_path):
    """Once it loaded, and --method unclip stopped with a traceback ("text_emb must be (16, 16), got (16, 8)")."""
    from dalle_mini_impl.pipeline.bundle import save_state_dict
    from train.prior import prior_geometry

    other = shutil.copytree(bundle, tmp_path / "other")
    stale = prior()  # another embedding width and text length than the bundle's CLIP and tokenizer
    (other / "prior.json").write_text(json.dumps(prior_geometry(stale)))
    save_state_dict(stale.state_dict(), other / "prior.safetensors")
    with pytest.raises(UserError, match="prior.safetensors was trained on .*: another CLIP or text tokenizer than"):
        Pipeline.from_pretrained(other)
    geometry = json.loads((bundle / "prior.json").read_text())
    for edit in ({"prior": []}, {"embed_dim": -1}):  # once an AttributeError / a RuntimeError traceback
        (other / "prior.json").write_text(json.dumps(geometry | edit))
        with pytest.raises(UserError, match="prior.json' is not a valid prior config"):
            Pipeline.from_pretrained(other)


def test_prior_guidance_reaches_the_prior(bundle):
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    draw = lambda **kw: pipe.prior_embeddings("a red circle", 2, torch.Generator().manual_seed(0), **kw)  # noqa: E731
    assert torch.equal(draw(), draw(guidance_scale=1.0))  # the bundle's default: off
    assert not torch.allclose(draw(), draw(guidance_scale=3.0))


def test_the_same_seed_gives_the_same_variations(bundle, images):
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    kw = dict(num_images=2, candidates=3, seed=4, progress=False)
    one, two = pipe.variations([images[0]], **kw)[0], pipe.variations([images[0]], **kw)[0]
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(one, two))


def test_a_bundle_without_unclip_refuses_its_uses_in_one_sentence(images, tmp_path, capsys):
    plain = make_tiny_bundle(tmp_path / "plain")
    for argv in (
        ["--variations", str(images[0])],
        ["--interpolate", *map(str, images)],
        ["a circle", "--method", "unclip"],
    ):
        code, _, err = run(["--model", str(plain), "--out", str(tmp_path / "o"), *argv], capsys)
        assert code == 2 and "this bundle has no unclip.safetensors" in err and err.count("\n") == 1
        assert "train.unclip" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([""], "prompt 1 is empty"),
        ([], "no prompt was given"),
        (["a circle", "--variations", "IMG"], "takes no prompt"),
        (["--variations", "IMG", "--interpolate", "IMG", "IMG"], "two different uses"),
        (["--variations", "IMG", "--method", "clip-guided"], "cannot go with --method"),
        (["a circle", "--text-diff", "a", "b"], "give --variations IMAGE too"),
        (["--variations", "IMG", "--text-diff-scale", "0.5"], "give --text-diff FROM TO too"),
        (["a circle", "--steps", "3"], "give --interpolate A B too"),
        (["--interpolate", "IMG", "IMG", "--steps", "1"], "at least 2"),
        (["--variations", "IMG", "--text-diff", "a", "b", "--text-diff-scale", "2"], "in [0, 1]"),
        (["--variations", "missing.png"], "image 'missing.png' does not exist"),
        (["--variations", "."], "image '.' is a folder; give an image file in it"),  # once "does not exist"
        (["a circle", "--method", "unclip", "--prior-guidance-scale", "nan"], "--prior-guidance-scale is nan"),
    ],
)
def test_bad_unclip_arguments_are_one_sentence_and_exit_2(bundle, images, tmp_path, capsys, argv, message):
    argv = [str(images[0]) if a == "IMG" else a for a in argv]
    code, _, err = run(["--model", str(bundle), "--out", str(tmp_path), *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# The evaluations
# ----------------------------------------------------------------------------------------------


def test_the_second_renderer_draws_what_the_judge_accepts():
    from dalle_mini_impl.config import ShapesConfig
    from dalle_mini_impl.eval.unclip import sources
    from dalle_mini_impl.shapes.judge import judge

    srcs = sources(60, 3, ShapesConfig().held_out, 32)
    assert [w for _, _, w in srcs[:4]] == ["ours", "pil", "ours", "pil"]
    assert all(judge(image, caption).ok for caption, image, _ in srcs)
    ours, pil = srcs[0][1], sources(2, 3, ShapesConfig().held_out, 32)[1][1]
    assert set(np.unique(pil)) - set(np.unique(ours)) or not np.array_equal(pil, ours)  # another rasteriser


def test_eval_unclip_grades_a_bundle_trained_on_another_scene_mix_on_the_same_sources(bundle, tmp_path, monkeypatch):
    from dalle_mini_impl.eval import unclip

    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["data"]["shapes"].update(two_object_p=1.0, omit_p=0.0)  # trained on two-object scenes only
    (other / "config.json").write_text(json.dumps(cfg))
    graded = []  # the captions of each run's sources

    def record(pipe, srcs, settings, progress=True):
        graded.append([caption for caption, _, _ in srcs])
        return {}

    monkeypatch.setattr(unclip, "variations", record)
    for model in (bundle, other):
        assert unclip.main(["--model", str(model), "--n", "6", "--diffs", "0", "--pairs", "0"]) == 0
    assert graded[0] == graded[1]
    assert {parse_caption(c)["kind"] for c in graded[0]} == {"one", "two"}  # the spec's mix, not the bundle's


def test_flip_relation_turns_only_the_relation_around():
    from dalle_mini_impl.eval.unclip import flip_relation

    assert flip_relation("a red circle to the left of a small blue square") == (
        "a red circle to the right of a small blue square"
    )
    assert (
        flip_relation("a large green triangle below a purple circle") == "a large green triangle above a purple circle"
    )


def test_swap_shapes_changes_one_shape_word_every_way():
    from dalle_mini_impl.eval.unclip import swap_shapes

    assert swap_shapes("a red circle") == ["a red square", "a red triangle"]
    assert swap_shapes("a small blue square above a green triangle") == [
        "a small blue circle above a green triangle",
        "a small blue triangle above a green triangle",
        "a small blue square above a green circle",
        "a small blue square above a green square",
    ]


def test_eval_unclip_and_eval_shapes_method_unclip_print_their_numbers(bundle, tmp_path, capsys):
    from dalle_mini_impl.eval import shapes, unclip

    argv = [
        "--model",
        str(bundle),
        "--n",
        "8",
        "--diffs",
        "2",
        "--pairs",
        "1",
        "--candidates",
        "2",
        "--num-images",
        "2",
    ]
    assert unclip.main([*argv, "--text-diff-scales", "0.2,0.5", "--out", str(tmp_path / "u.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "u.json").read_text())
    v = result["variations"]
    assert v["n"] == 8 and 0 <= v["top1"]["all"] <= 100 and 0 <= v["codes_changed_percent"] <= 100
    assert 0 <= v["clip_prefers_true_relation"] <= 100
    # the two-object sources, split by whether CLIP's embedding knows their shapes
    from dalle_mini_impl.eval.unclip import sources

    cfg = Pipeline.from_pretrained(str(bundle), device="cpu").cfg.data
    srcs = sources(8, 0, cfg.shapes.held_out, cfg.image_size)
    two = [c for c, _, _ in srcs if parse_caption(c)["kind"] == "two"]
    split = v["two_top1_by_clip_shapes"]
    assert split["right"]["n"] + split["wrong"]["n"] == len(two) > 0
    assert split["right"]["n"] == round(v["clip_prefers_true_shapes"] * len(two) / 100)
    # one of the 8 sources shows a pair every part of the bundle trained without ("yellow square", held out)
    assert cfg.shapes.held_out == ["purple triangle", "yellow square"]
    assert srcs[7][0] == "a large yellow square on the right"
    by_pair = v["top1_by_held_out_pair"]
    assert by_pair["shown"]["n"] == 1 and by_pair["not_shown"]["n"] == 7
    assert by_pair["shown"]["top1"] in (0.0, 100.0)
    assert set(result["text_diffs"]) == {"n", "scale_0.2", "scale_0.5"}
    assert list(result["interpolations"]["nearer_end_by_step"]) == ["t=0.00", "t=0.25", "t=0.50", "t=0.75", "t=1.00"]
    assert shapes.main(["--model", str(bundle), "--n", "4", "--method", "unclip"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "unclip"
    plain = make_tiny_bundle(tmp_path / "plain")
    with pytest.raises(UserError, match="no unclip.safetensors and prior.safetensors"):
        shapes.main(["--model", str(plain), "--n", "4", "--method", "unclip"])
    with pytest.raises(UserError, match="no unclip.safetensors"):
        unclip.main(["--model", str(plain), "--n", "4"])


def test_the_decoder_starts_from_the_trained_transformer(bundle, tmp_path):
    from dalle_mini_impl.config import read_config_json
    from dalle_mini_impl.pipeline.bundle import load_text_tokenizer, load_transformer, load_vae
    from train.dalle import build_model, start_from_transformer

    cfg = read_config_json(bundle / "config.json")
    text, image = load_text_tokenizer(bundle, cfg), load_vae(bundle)
    fresh = build_model(cfg, text, image, cond_dim=16)
    cond = fresh.cond_proj.weight.clone()
    start_from_transformer(fresh, bundle)
    trained = load_transformer(bundle).state_dict()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
    assert torch.equal(fresh.cond_proj.weight, cond)  # the embedding's own weights keep their initialisation
    cfg.transformer.dim = 48  # another size: refused in one sentence that names the way out
    with pytest.raises(UserError, match="init_from_transformer=false"):
        start_from_transformer(build_model(cfg, text, image, cond_dim=16), bundle)


def test_when_an_embedding_pins_one_image_down_the_extra_rounds_loosen_the_temperature(bundle, images):
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    near_greedy = dict(num_images=2, candidates=2, temperature=1e-4, seed=0)
    cond = pipe.image_embeddings([images[0]])[0]
    generator = torch.Generator().manual_seed(0)
    ids, _, _ = pipe._from_embedding(cond, cond[None], pipe.settings(**near_greedy), generator, None)
    assert torch.equal(ids[0], ids[1])  # one round as asked gives one image twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "gave only 1 distinct image": the extra rounds drew at temperature 1 and up
        kept = pipe.variations([images[0]], **near_greedy, progress=False)[0]
    assert len(kept) == 2 and not torch.equal(kept[0].ids, kept[1].ids)


# ----------------------------------------------------------------------------------------------
# CLIP's spatial features beside the embedding (unclip.grid)
# ----------------------------------------------------------------------------------------------


def test_clip_grid_features_are_unit_positions_and_a_side_past_the_patches_is_one_sentence():
    from dalle_mini_impl.clip.model import CLIP
    from dalle_mini_impl.config import CLIPConfig
    from tests.bundle_factory import TINY_CLIP

    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(**(TINY_CLIP | dict(image_depth=2))), image_size=16, text_vocab=20, text_len=6,
                pad_id=0, eos_id=1).eval()  # fmt: skip
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        grid = clip.image_grid(images, 2)
        assert grid.shape == (3, 2 * 2 * 32)
        assert torch.allclose(grid.view(3, 4, 32).norm(dim=-1), torch.ones(3, 4), atol=1e-4)
        assert torch.equal(grid, clip.image_grid(images, 2))
        # unlike the embedding of a bag of patches, the grid depends on where things are: the same patches in
        # another order give another grid
        swapped = images.view(3, 3, 4, 4, 4, 4).flip(2).reshape(3, 3, 16, 16)  # rows of 4x4 patches, bottom up
        assert not torch.allclose(clip.image_grid(swapped, 2), grid, atol=1e-3)
    with pytest.raises(UserError, match=r"'unclip.grid' is 5; set it between 1 and CLIP's patch grid \(4\)"):
        clip.image_grid(images, 5)


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_the_embedding_and_the_grid_from_one_pass_are_the_two_passes_values(tower):
    from dalle_mini_impl.clip.model import CLIP
    from dalle_mini_impl.clip.uses import BundleClipScorer
    from dalle_mini_impl.config import CLIPConfig
    from tests.bundle_factory import TINY_CLIP

    torch.manual_seed(0)
    cfg = CLIPConfig(**(TINY_CLIP | dict(image_depth=2, image_tower=tower, patch_size=4)))
    clip = CLIP(cfg, image_size=16, text_vocab=20, text_len=6, pad_id=0, eos_id=1).eval()
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        embedding, grid = clip.image_features(images, 2)
        assert torch.equal(embedding, clip.encode_image(images)) and torch.equal(grid, clip.image_grid(images, 2))
    scorer = BundleClipScorer(clip, tokenizer=None)
    scorer.batch_size = 2  # batches of 2, 2 and 1
    one_pass = scorer.embed_images_and_grid(images, 2)
    assert torch.equal(one_pass[0], scorer.embed_images(images))
    assert torch.equal(one_pass[1], scorer.embed_image_grid(images, 2))
    with pytest.raises(UserError, match="'unclip.grid' is 5; set it between 1 and CLIP's patch grid"):
        clip.image_features(images, 5)


def test_a_decoder_widened_to_read_a_grid_draws_what_it_drew_until_trained():
    from train.dalle import widen_to_grid

    narrow, wide = decoder(), decoder(cond_dim=E + 12)
    wide.load_state_dict(widen_to_grid(narrow.state_dict(), wide))
    text, image, emb = batch(b=3)
    grid = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.allclose(narrow(text, image, emb), wide(text, image, torch.cat([emb, grid], 1)), atol=1e-5)
    state = narrow.state_dict()
    assert widen_to_grid(state, narrow) is state  # same width: the very state, unchanged
    assert torch.equal(widen_to_grid(state, narrow)["cond_proj.weight"], narrow.cond_proj.weight)


def test_grid_cells_as_positions_of_their_own_move_only_their_position():
    """cond_tokens (unclip.grid_tokens): the embedding at the first cond_len - T positions, each of the T grid cells
    at one more through one shared projection; zeros are the dropped grid, and a bad split is one sentence."""
    T, W = 4, 3  # a 2 x 2 grid of width 3 after the embedding
    model = decoder(cond_dim=E + T * W, cond_len=2 + T, cond_tokens=T, cond_token_dim=W)
    text, _, emb = batch(b=2)
    grid = torch.randn(2, T * W)
    base = model.embed_prefix(text, torch.cat([emb, grid], 1))
    moved = grid.clone()
    moved[:, W : 2 * W] += 1.0  # the second cell's features
    after = model.embed_prefix(text, torch.cat([emb, moved], 1))
    changed = (after - base).abs().amax(dim=(0, 2)) > 0  # per prefix position
    assert changed.tolist() == [False, False, False, True, False, False] + [False] * 6  # 2 + 4 cells, 6 text
    cells = base[:, 2:6] - model.cond_pos.weight[2:6]
    assert torch.allclose(cells, grid.view(2, T, W) @ model.cond_token_proj.weight, atol=1e-6)
    dropped = model.embed_prefix(text, torch.cat([emb, torch.zeros_like(grid)], 1))[:, 2:6]
    assert torch.allclose(dropped, model.cond_pos.weight[2:6].expand(2, -1, -1))
    with pytest.raises(UserError, match="transformer config 'cond_tokens' is 6; it must be below cond_len 6"):
        decoder(cond_dim=E + 6 * W, cond_len=6, cond_tokens=6, cond_token_dim=W)


def test_a_decoder_without_a_grid_starts_one_with_grid_cells_as_positions():
    from train.dalle import widen_to_grid

    narrow = decoder()
    with torch.no_grad():  # weights that a decoder built from the same seed would not have
        for weight in (narrow.cond_proj.weight, narrow.cond_pos.weight, narrow.blocks[0].attn.qkv.weight):
            weight.add_(1.0)
    cells = decoder(cond_dim=E + 4 * 3, cond_len=2 + 4, cond_tokens=4, cond_token_dim=3)
    own = {k: v.clone() for k, v in cells.state_dict().items()}
    cells.load_state_dict(widen_to_grid(narrow.state_dict(), cells))  # strict: every weight is there
    assert torch.equal(cells.cond_proj.weight, narrow.cond_proj.weight)
    assert torch.equal(cells.cond_pos.weight[:2], narrow.cond_pos.weight)  # the source's positions first
    assert torch.equal(cells.cond_pos.weight[2:], own["cond_pos.weight"][2:])  # the cells' own, new
    assert torch.equal(cells.cond_token_proj.weight, own["cond_token_proj.weight"])
    assert torch.equal(cells.blocks[0].attn.qkv.weight, narrow.blocks[0].attn.qkv.weight)


@pytest.fixture(scope="module")
def grid_bundle(tmp_path_factory) -> Path:
    from tests.bundle_factory import tiny_config

    cfg = tiny_config()
    cfg.unclip.grid = 2
    return make_tiny_bundle(tmp_path_factory.mktemp("unclip-grid-bundle"), unclip=True, cfg=cfg)


def test_only_variations_give_the_decoder_a_grid(grid_bundle, images):
    """With unclip.grid, a variation's decoder input is [embedding ; its source's spatial features]; the prior's
    embeddings, interpolations and text diffs give zeros after the embedding (the dropped grid)."""
    pipe = Pipeline.from_pretrained(grid_bundle, device="cpu")
    e, g = pipe.clip.embed_dim(), pipe.clip.grid_dim(2)
    assert pipe.unclip.cfg.cond_dim == e + g == 16 + 4 * 32
    calls = record_sampling(pipe)
    few = dict(num_images=1, candidates=2, progress=False)
    pipe.variations([images[0]], **few)
    pixels = pipe.as_drawn(pipe._read_images([images[0]]))
    cond = calls[-1][1]
    assert torch.allclose(cond[0, :e], pipe.clip.embed_images(pixels)[0])
    assert torch.allclose(cond[0, e:], pipe.clip.embed_image_grid(pixels, 2)[0]) and cond[0, e:].abs().sum() > 0
    pipe.variations([images[0]], text_diff=("a red square", "a blue square"), **few)
    pipe.interpolate(images[0], images[1], 2, **few)
    pipe.generate(["a red circle"], method="unclip", **few)
    seen = [cond for _, cond in calls]
    assert len(seen) == 5 and all(torch.equal(c[:, e:], torch.zeros_like(c[:, e:])) for c in seen[1:])
    assert all(c[:, :e].abs().sum() > 0 for c in seen[1:])


def test_a_decoder_that_reads_no_grid_in_a_bundle_that_says_it_does_is_one_sentence(bundle, tmp_path):
    from dalle_mini_impl.config import read_config_json
    from dalle_mini_impl.pipeline.bundle import write_bundle_config

    folder = Path(shutil.copytree(bundle, tmp_path / "b"))
    cfg = read_config_json(folder / "config.json")
    cfg.unclip.grid = 2
    write_bundle_config(cfg, folder)
    with pytest.raises(UserError, match=r"reads 16 numbers but this bundle's CLIP gives 16 and a 2x2 grid of 128"):
        Pipeline.from_pretrained(folder, device="cpu")


def test_a_bundle_whose_decoder_reads_grid_cells_as_positions_draws_variations(tmp_path, images):
    from tests.bundle_factory import tiny_config

    cfg = tiny_config()
    cfg.unclip.grid, cfg.unclip.grid_tokens = 2, True
    pipe = Pipeline.from_pretrained(make_tiny_bundle(tmp_path / "b", unclip=True, cfg=cfg), device="cpu")
    c = pipe.unclip.cfg
    assert (c.cond_len, c.cond_tokens, c.cond_token_dim, c.cond_dim) == (2 + 4, 4, 32, 16 + 4 * 32)
    kept = pipe.variations([images[0]], num_images=2, candidates=3, progress=False)[0]
    assert len(kept) == 2 and not torch.equal(kept[0].ids, kept[1].ids)


def test_variations_take_their_own_guidance_unless_one_is_given(grid_bundle, images):
    pipe = Pipeline.from_pretrained(grid_bundle, device="cpu")
    pipe.cfg.sample.guidance_scale, pipe.cfg.sample.variation_guidance_scale = 3.0, 1.0
    calls = record_sampling(pipe)
    few = dict(num_images=1, candidates=2, progress=False)
    pipe.variations([images[0]], **few)  # the variations' own
    pipe.variations([images[0]], guidance_scale=2.0, **few)  # asked for: wins
    pipe.variations([images[0]], text_diff=("a red square", "a blue square"), **few)  # text diffs: the bundle's
    pipe.interpolate(images[0], images[1], 2, **few)
    assert [s.guidance_scale for s, _ in calls] == [1.0, 2.0, 3.0, 3.0, 3.0]
    pipe.cfg.sample.variation_guidance_scale = 0.0  # 0: the bundle's guidance_scale
    pipe.variations([images[0]], **few)
    assert calls[-1][0].guidance_scale == 3.0
    pipe.cfg.sample.variation_guidance_scale = float("nan")
    with pytest.raises(
        UserError, match="config key 'sample.variation_guidance_scale' is nan; give a finite number >= 0"
    ):
        pipe.variations([images[0]], **few)


def test_the_unclip_section_is_checked_in_one_sentence():
    from tests.bundle_factory import tiny_config
    from train.dalle import check_unclip

    for key, value, message in [
        ("grid", -1, "'unclip.grid' is -1; set it to 0 (the embedding alone) or a grid side"),
        ("grid_dropout", 1.5, "'unclip.grid_dropout' is 1.5; set it between 0 and 1"),
        ("grid_tokens", True, "'unclip.grid_tokens' is true with unclip.grid 0; set unclip.grid to a grid side"),
        ("cond_len", 0, "'unclip.cond_len' is 0; give the embedding 1 or more positions"),  # once "transformer"
    ]:
        cfg = tiny_config()
        setattr(cfg.unclip, key, value)
        with pytest.raises(UserError, match=re.escape(message)):
            check_unclip(cfg)
    cfg = tiny_config()
    cfg.unclip.grid, cfg.unclip.grid_tokens = 2, True
    check_unclip(cfg)  # a grid of cells as positions: fine
