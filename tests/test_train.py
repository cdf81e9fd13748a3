"""The training entry points on tiny models: run, stop, resume where they stopped; encode once."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vae
from dalle_mini_impl.config import load_config
from dalle_mini_impl.data.streams import ExampleStream
from dalle_mini_impl.data.tokens import read_shards, shard_rows, tokens_dir
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.pipeline.bundle import load_vae
from train import clip as train_clip
from train import dalle as train_dalle
from train import encode as train_encode
from train import finetune
from train import tokenizer as train_tokenizer
from train import vae as train_vae
from train.common import seed_everything
from train.loop import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent

# a whole pipeline small enough to train in seconds on one CPU core
TINY = [
    "data.image_size=16",
    "data.shapes.val_size=64",
    "data.max_examples=192",
    "text.text_len=16",
    "text.max_train_captions=2000",
    "vae.codebook_size=32",
    "vae.group_sizes=[4,8]",  # the shapes preset's color and layout groups (rgb, ink), shrunk
    "vae.hidden=16",
    "vae.res_blocks=0",
    "vae.code_dim=16",
    "transformer.dim=32",
    "transformer.depth=2",
    "transformer.heads=2",
    "clip.image_width=32",
    "clip.text_width=32",
    "clip.image_depth=1",
    "clip.text_depth=1",
    "clip.embed_dim=16",
    "clip.patch_size=4",
]
for stage in ("vae", "dalle", "clip"):
    TINY += [
        f"train.{stage}.batch_size=8",
        f"train.{stage}.warmup_steps=2",
        f"train.{stage}.log_every=1",
        f"train.{stage}.eval_every=1000",
        f"train.{stage}.image_every=1000",
        f"train.{stage}.eval_batches=1",
    ]


def args_for(run, *extra: str) -> list[str]:
    out = ["--config", "shapes", "--out", str(run)]
    for item in TINY + list(extra):
        out += ["--set", item]
    return out


def encoded_run(run) -> object:
    """A run folder with a trained tokenizer, a 2-step VAE and token shards: where train.dalle starts."""
    torch.set_num_threads(1)
    train_tokenizer.main(args_for(run))
    train_vae.main(args_for(run, "train.vae.steps=2"))
    train_encode.main(args_for(run))
    return run


def forget_compiled() -> None:
    """Drop what torch.compile has compiled and counted in this process."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def compiled_graphs() -> int:
    """Graphs torch.compile has captured since the last forget_compiled()."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def tokenizer_run(base, dest):
    """A run folder holding only `base`'s text tokenizer: where train.vae starts."""
    dest.mkdir()
    (dest / "text.model").write_bytes((base / "text.model").read_bytes())
    return dest


def copy_run(base, dest):
    """A copy of a run folder without its checkpoints and logs, to train from the same start again."""
    return shutil.copytree(base, dest, ignore=shutil.ignore_patterns("checkpoints", "logs"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with a trained tokenizer and a few-step VAE, shared by the tests below."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    train_tokenizer.main(args_for(run))
    train_vae.main(args_for(run, "train.vae.steps=4", "train.vae.checkpoint_every=2"))
    return run


def _optimizer_state(checkpoint) -> dict:
    return torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)


def test_vae_stops_and_resumes_at_the_same_step(tmp_path, run_dir, capsys):
    run = tokenizer_run(run_dir, tmp_path / "r")
    # the dVAE: its temperature and KL schedules must continue too (the preset's VQ has none)
    train_vae.main(
        args_for(run, "vae.kind=dvae", "vae.kl_weight=1e-3", "train.vae.steps=3", "train.vae.checkpoint_every=3")
    )
    first = list_checkpoints(run / "checkpoints" / "vae")
    assert [p.name for p in first] == ["step_00000003"]
    assert json.loads((first[0] / "trainer_state.json").read_text())["step"] == 3
    state3 = _optimizer_state(first[0])

    # the same command with more steps resumes at step 3 (the default), with the optimizer state of step 3
    capsys.readouterr()
    train_vae.main(
        args_for(
            run,
            "train.vae.steps=5",
            "train.vae.checkpoint_every=1",
            "train.vae.keep_checkpoints=10",
            "vae.kind=dvae",
            "vae.kl_weight=1e-3",
            "vae.temperature_steps=10",
            "vae.kl_warmup_steps=10",
        )
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    schedules = ["vae.kind=dvae", "vae.kl_weight=1e-3", "vae.temperature_steps=10", "vae.kl_warmup_steps=10"]
    cfg = load_config("shapes", [*TINY, *schedules])
    expected = vae.schedules.values_at(4, **{k: getattr(cfg.vae, k) for k in vae.SCHEDULE_FIELDS})
    # the last step (index 4) used the schedules at step 4: they continued, they did not restart at 0
    assert printed["temperature"] == pytest.approx(expected["temperature"], abs=1e-5)
    assert printed["kl_weight"] == pytest.approx(expected["kl_weight"], abs=1e-5) and printed["kl_weight"] > 0
    names = [p.name for p in list_checkpoints(run / "checkpoints" / "vae")]
    assert names == ["step_00000003", "step_00000004", "step_00000005"]
    state4 = _optimizer_state(run / "checkpoints" / "vae" / "step_00000004")
    # Adam's step count continues from 3, it does not restart at 1
    assert int(state4["state"][0]["step"]) == int(state3["state"][0]["step"]) + 1 == 4
    assert (run / "vae.safetensors").is_file() and (run / "vae.json").is_file()


def test_a_resume_at_another_thread_count_says_it_is_another_run(tmp_path, run_dir, capsys):
    """Float sums split across another number of CPU threads part within a few steps (docs/RESULTS.md): resuming
    such a checkpoint is allowed, and says that the run goes on as another one."""
    run = tokenizer_run(run_dir, tmp_path / "r")
    train_vae.main(args_for(run, "train.vae.steps=2", "train.vae.checkpoint_every=2"))
    checkpoint = run / "checkpoints" / "vae" / "step_00000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["cpu_threads"] == 1
    capsys.readouterr()
    train_vae.main(args_for(run, "train.vae.steps=3", "train.vae.checkpoint_every=3"))  # the same 1 thread
    assert "CPU thread" not in capsys.readouterr().err
    torch.set_num_threads(2)
    try:
        train_vae.main(args_for(run, "train.vae.steps=4", "train.vae.checkpoint_every=4"))
    finally:
        torch.set_num_threads(1)
    said = f"vae: checkpoint '{run / 'checkpoints' / 'vae' / 'step_00000003'}' was written at 1 CPU thread and this "
    assert said + "run has 2, so it goes on as another run" in capsys.readouterr().err


def test_vq_trained_twice_from_nothing_has_the_same_weights(tmp_path, run_dir):
    """Same seed, data and thread count: the same VQ, bit for bit, dead-code restarts included (the first step
    restarts every unused code at a random pick of the batch's latents, and dead_code_steps=1 restarts more at
    every step), so every later stage of a run from nothing can be reproduced."""
    weights = []
    for name in ("a", "b"):
        run = tokenizer_run(run_dir, tmp_path / name)
        vq = ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]", "vae.dead_code_steps=1"]
        train_vae.main(args_for(run, *vq, "train.vae.steps=3"))
        weights.append(load_file(str(run / "vae.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


VQ = ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]"]


def test_the_decoder_phase_trains_the_decoder_alone_and_keeps_every_code(tmp_path, run_dir, capsys):
    """train.vae_decoder.steps: after the first phase (the same weights as a run without the second, bit for bit),
    the decoder alone trains on, with its own checkpoints; the critic's start counts the first phase's steps."""
    runs = {}
    for name, extra in (("first", []), ("both", ["train.vae_decoder.steps=2", "train.vae_decoder.lr=1e-2"])):
        run = runs[name] = tokenizer_run(run_dir, tmp_path / name)
        capsys.readouterr()
        # the critic starts at step 3: in the second phase's first step (its step 1, the run's step 3)
        train_vae.main(args_for(run, *VQ, "vae.disc_start=3", "train.vae.steps=2", *extra))
    said = capsys.readouterr()
    phases = [json.loads(line) for line in said.out.strip().splitlines()]
    assert [p["stage"] for p in phases] == ["vae", "vae_decoder"]
    # the phase a preset sets (emoji's 1,000 steps) says it follows: once it ran on unannounced after steps=0
    assert "vae_decoder: 2 more steps of the decoder alone on the fixed codes follow" in said.err
    assert "adversarial" not in phases[0] and phases[1]["adversarial_weight"] > 0
    assert [p.name for p in list_checkpoints(runs["both"] / "checkpoints" / "vae_decoder")] == ["step_00000002"]
    first, both = load_file(str(runs["first"] / "vae.safetensors")), load_file(str(runs["both"] / "vae.safetensors"))
    assert first.keys() == both.keys()
    cfg = load_config("shapes", [*TINY, *VQ])
    for key in first:
        group = finetune.group_of("vae", key)
        if group in ("encoder", "codebook"):
            assert torch.equal(first[key], both[key]), key
    assert not all(torch.equal(first[k], both[k]) for k in first if finetune.group_of("vae", k) == "decoder")
    old, new = load_vae(runs["first"]), load_vae(runs["both"])
    images = torch.rand(4, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = old.encode(images)
        assert torch.equal(new.encode(images), ids)
        assert not torch.allclose(new.decode(ids), old.decode(ids))


def test_each_phase_freezes_what_its_own_settings_name(tmp_path, run_dir):
    """train.vae.freeze = ["decoder"] holds the decoder in the first phase only: the decoder phase trains it."""
    runs = {}
    for name, steps in (("first", "train.vae_decoder.steps=0"), ("both", "train.vae_decoder.steps=1")):
        run = runs[name] = tokenizer_run(run_dir, tmp_path / name)
        train_vae.main(args_for(run, *VQ, "train.vae.steps=2", 'train.vae.freeze=["decoder"]', steps))
    cfg = load_config("shapes", [*TINY, *VQ])
    seed_everything(cfg.seed)  # as train.vae builds it
    untrained = train_vae.build_tokenizer(cfg).state_dict()
    first, both = load_file(str(runs["first"] / "vae.safetensors")), load_file(str(runs["both"] / "vae.safetensors"))
    decoder = [k for k in first if finetune.group_of("vae", k) == "decoder"]
    assert all(torch.equal(first[k], untrained[k]) for k in decoder)  # the first phase left it as built
    assert not all(torch.equal(both[k], first[k]) for k in decoder)  # the second trained it


def test_the_decoder_phase_refuses_what_it_cannot_train():
    for setting, words in (
        ("vae.kind=dvae", "train.vae_decoder.steps is 5, which fine-tunes a VQ's decoder"),
        ("train.vae_decoder.mixed_precision=bf16", "the two phases share one accelerator"),
        ("train.vae_decoder.lr=0", "train.vae_decoder.lr is 0"),
        ("train.vae_decoder.checkpoint_every=0", "checkpoint_every is 0; set it to 1 or more"),
        ("train.vae_decoder.grad_checkpointing=true", "train.vae_decoder.grad_checkpointing is true"),
    ):
        cfg = load_config("shapes", [*TINY, *VQ, "train.vae_decoder.steps=5", setting])
        with pytest.raises(UserError, match=words) as error:
            train_vae.check_phases(cfg)
        assert "\n" not in str(error.value)
    train_vae.check_phases(load_config("shapes", [*TINY, "vae.kind=dvae"]))  # no second phase: nothing


def test_resume_of_one_phases_checkpoint_restarts_the_phases_after_it(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    names = ["vae", "vae_decoder"]

    def args(resume, no_resume=False):
        return argparse.Namespace(resume=resume, no_resume=no_resume, config="shapes")

    first, second = str(root / "vae" / "step_00000004"), str(root / "vae_decoder" / "step_00000002")
    # the first phase's checkpoint: it resumes there, and the decoder phase starts over
    assert train_vae.phase_args(args(first), names, 0).resume == first
    assert train_vae.phase_args(args(first), names, 1).no_resume
    # the decoder phase's: the first phase resumes its latest, then the decoder phase the one named
    assert vars(train_vae.phase_args(args(second), names, 0)) == vars(args("latest"))
    assert train_vae.phase_args(args(second), names, 1).resume == second
    for plain in (args("latest"), args(None), args(first, no_resume=True)):
        assert all(train_vae.phase_args(plain, names, i) is plain for i in (0, 1))


def test_encode_writes_the_ids_encode_gives(run_dir):
    train_encode.main(args_for(run_dir))
    ids, captions = read_shards(tokens_dir(run_dir, "train"))
    assert ids.shape == (192, 4, 4) and len(captions) == 192
    cfg = load_config("shapes", TINY)
    tokenizer = load_vae(run_dir)
    stream = ExampleStream(cfg.data, "train", train=False, endless=False)
    examples = []
    for example in stream:
        examples.append(example)
        if len(examples) == 16:
            break
    images = torch.stack([e["image"] for e in examples])
    assert torch.equal(tokenizer.encode(images), ids[:16])
    assert [e["caption"] for e in examples] == captions[:16]
    manifest = json.loads((run_dir / "tokens" / "manifest.json").read_text())
    assert manifest["splits"][0]["examples"] == 192


def test_encode_of_an_endless_stream_without_a_limit_is_one_sentence(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "r")
    with pytest.raises(UserError, match="the shapes training stream is endless and data.max_examples is 0"):
        train_encode.main(args_for(run, "data.max_examples=0"))
    train_encode.main(args_for(run, "data.max_examples=0", "data.shapes.train_size=16"))  # a finite one
    train_encode.main([*args_for(run, "data.max_examples=0"), "--splits", "validation"])  # no endless split asked
    with pytest.raises(UserError, match="--splits 'train,,' has an empty name"):  # once "unknown shapes split ''"
        train_encode.main([*args_for(run), "--splits", "train,,"])


def test_encode_resumes_and_reuses_shards(run_dir):
    train_encode.main(args_for(run_dir))  # the shards to reuse, whichever test ran before (alone, none had)
    before = {p.name: p.stat().st_mtime_ns for p in tokens_dir(run_dir, "train").iterdir()}
    train_encode.main(args_for(run_dir))
    after = {p.name: p.stat().st_mtime_ns for p in tokens_dir(run_dir, "train").iterdir()}
    assert before == after  # complete shards are not written again


def test_encode_to_more_examples_encodes_the_short_last_shard_again(run_dir, tmp_path):
    """An encode that stopped at a smaller data.max_examples left a short last shard: a longer encode writes it
    again in full, so its rows are the rows a fresh encode of the longer stream has (none are skipped)."""
    shards = "data.encode_shard_size=64"
    fresh, grown = copy_run(run_dir, tmp_path / "fresh"), copy_run(run_dir, tmp_path / "grown")
    for run in (fresh, grown):
        shutil.rmtree(run / "tokens", ignore_errors=True)
    train_encode.main(args_for(grown, shards, "data.max_examples=160"))  # 64 + 64 + 32 rows
    short = tokens_dir(grown, "train") / "shard_000_00002.safetensors"
    assert read_shards(tokens_dir(grown, "train"))[0].shape[0] == 160
    first = (tokens_dir(grown, "train") / "shard_000_00000.safetensors").stat().st_mtime_ns
    train_encode.main(args_for(grown, shards, "data.max_examples=192"))
    train_encode.main(args_for(fresh, shards, "data.max_examples=192"))
    (ids, captions), (want_ids, want_captions) = (read_shards(tokens_dir(r, "train")) for r in (grown, fresh))
    assert ids.shape[0] == 192 and torch.equal(ids, want_ids) and captions == want_captions
    assert (tokens_dir(grown, "train") / "shard_000_00000.safetensors").stat().st_mtime_ns == first  # full: reused
    assert shard_rows(short) == 64  # written again, whole


def test_encode_with_other_data_settings_reads_no_row_of_the_earlier_one(run_dir, tmp_path, capsys):
    """Once: an encode to a smaller data.max_examples left the earlier one's later shards, and one with another
    filter or image size reused its shards, so train.dalle trained on rows the settings no longer chose."""
    run = copy_run(run_dir, tmp_path / "r")
    shutil.rmtree(run / "tokens", ignore_errors=True)
    shards = "data.encode_shard_size=64"

    def encode(*settings: str) -> dict:
        capsys.readouterr()
        train_encode.main(args_for(run, shards, *settings, "data.shapes.train_size=192"))
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["splits"][0]

    encode("data.max_examples=192")
    smaller = encode("data.max_examples=64")
    assert (smaller["shards_reused"], smaller["shards_written"]) == (1, 0)  # the first shard: the same rows
    assert read_shards(tokens_dir(run, "train"))[0].shape[0] == 64  # and none of the two after it
    other = encode("data.max_examples=64", "data.shapes.seed=5")  # other drawings of the same count
    assert (other["shards_reused"], other["shards_written"]) == (0, 1)
    want = copy_run(run_dir, tmp_path / "want")
    shutil.rmtree(want / "tokens", ignore_errors=True)
    train_encode.main(
        args_for(want, shards, "data.max_examples=64", "data.shapes.train_size=192", "data.shapes.seed=5")
    )
    (ids, captions), (want_ids, want_captions) = (read_shards(tokens_dir(r, "train")) for r in (run, want))
    assert torch.equal(ids, want_ids) and captions == want_captions
    # the processes deal the rows out (rank r: rows r, r + W, ...): a shard of one process is no shard of two's
    cfg = load_config("shapes", TINY)
    assert train_encode.data_digest(cfg, "train", 1) != train_encode.data_digest(cfg, "train", 2)


def test_an_image_repaired_between_two_encodes_is_encoded_and_no_shard_of_shifted_rows_is_reused(run_dir, tmp_path):
    """Once: a broken image skipped by the first encode and repaired before the second shifted every row after it
    by one; the shards of the same count, settings and tokenizer were reused, so the repaired image was in none and
    one row was in two, while the summary said it was encoded."""
    import io

    from PIL import Image

    def png(i: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (15 * i, 255 - 15 * i, 7 * i)).save(buffer, "PNG")
        return buffer.getvalue()

    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    rows = [{"file_name": f"{i}.png", "text": f"picture {i}"} for i in range(12)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i in range(12):
        (folder / f"{i}.png").write_bytes(png(i)[:40] if i == 2 else png(i))  # 2.png cut short: skipped
    settings = ["data.encode_shard_size=4", "data.max_examples=0", "clip.hard_negatives=false"]

    def encode(run) -> dict:
        argv = [*args_for(run, *settings), "--data", str(tmp_path / "data"), "--splits", "train"]
        train_encode.main(argv)
        return json.loads((run / "tokens" / "manifest.json").read_text())["splits"][0]

    run, fresh = copy_run(run_dir, tmp_path / "run"), copy_run(run_dir, tmp_path / "fresh")
    for r in (run, fresh):
        shutil.rmtree(r / "tokens", ignore_errors=True)
    assert encode(run)["skipped"] == 1
    (folder / "2.png").write_bytes(png(2))  # repaired
    again = encode(run)
    assert (again["examples"], again["skipped"], again["shards_reused"]) == (12, 0, 0)  # the first shard changed
    assert encode(fresh)["examples"] == 12
    (ids, captions), (want_ids, want_captions) = (read_shards(tokens_dir(r, "train")) for r in (run, fresh))
    assert captions == want_captions == [f"picture {i}" for i in range(12)] and torch.equal(ids, want_ids)
    assert encode(run)["shards_reused"] == 3  # the same rows again: reused


def test_encode_flip_writes_each_image_mirrored_after_it_but_not_for_excluded_captions(run_dir, tmp_path, capsys):
    """data.encode_flip: a train-split example's mirror image follows it as a row with the same caption, unless
    data.encode_flip_exclude matches the caption (shapes names left and right); validation gets none; train shards
    written without mirrors are written again, not reused."""
    plain = copy_run(run_dir, tmp_path / "plain")
    if not (plain / "tokens").is_dir():
        train_encode.main(args_for(plain))
    flipped = plain  # encoded again in place: the train split's shards must be written again
    capsys.readouterr()
    train_encode.main(args_for(flipped, "data.encode_flip=true", "data.encode_flip_exclude=\\b(left|right|above)"))
    splits = {s["split"]: s for s in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["splits"]}
    # the train split's shards change; validation's (never mirrored) are the same and reused
    assert splits["train"]["shards_reused"] == 0 and splits["validation"]["shards_written"] == 0
    ids, captions = read_shards(tokens_dir(flipped, "train"))
    cfg = load_config("shapes", TINY)
    examples = list(itertools.islice(ExampleStream(cfg.data, "train", train=False, endless=False), 192))
    tokenizer = load_vae(flipped)
    excluded = [("left" in e["caption"] or "right" in e["caption"] or "above" in e["caption"]) for e in examples]
    assert 0 < sum(excluded) < 192  # the pattern leaves some examples out and keeps others
    want_ids, want_captions = [], []
    for e, skip in zip(examples, excluded, strict=True):
        images = [e["image"]] if skip else [e["image"], e["image"].flip(-1)]
        want_ids.append(tokenizer.encode(torch.stack(images)))
        want_captions += [e["caption"]] * len(images)
    assert captions == want_captions and torch.equal(ids, torch.cat(want_ids))
    assert (splits["train"]["examples"], splits["train"]["mirrored"]) == (192, 192 - sum(excluded))
    assert splits["train"]["rows"] == len(captions) == 192 + splits["train"]["mirrored"]
    assert splits["validation"]["mirrored"] == 0
    assert read_shards(tokens_dir(flipped, "validation"))[0].shape[0] == splits["validation"]["examples"]
    capsys.readouterr()
    train_encode.main(args_for(flipped, "data.encode_flip=true", "data.encode_flip_exclude=\\b(left|right|above)"))
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["splits"]
    assert all(s["shards_written"] == 0 for s in again)  # the same mirrors: reused
    with pytest.raises(UserError, match="config key 'data.encode_flip_exclude' is not a valid regular expression"):
        train_encode.main(args_for(flipped, "data.encode_flip=true", "data.encode_flip_exclude=(left"))


def test_an_image_with_several_captions_is_a_row_per_caption_encoded_once(run_dir, tmp_path, capsys):
    """An image with a list of captions (COCO's five) was encoded with one of them, drawn once and kept: the
    transformer, which trains on the shards, never saw the others. Each usable caption is now a row of its own,
    with the image's ids, and the mirror image gets the captions a mirror leaves true."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    captions = [["a red one", "  ", "the left one"], ["a blue one"], ["a cat", "a dog"], ["a sun"]]
    for split in ("train", "validation"):
        rows = {"image": [Image.fromarray(a) for a in images], "text": captions}
        datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(
            str(tmp_path / f"{split}.parquet")
        )
    run = copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / "tokens", ignore_errors=True)
    data = ["--data", str(tmp_path / "{split}.parquet")]
    capsys.readouterr()
    train_encode.main([*args_for(run, "data.encode_flip=true", "data.encode_flip_exclude=left"), *data])
    said = capsys.readouterr()
    splits = {s["split"]: s for s in json.loads(said.out.strip().splitlines()[-1])["splits"]}
    # the bar counts records, with a total though mirror images make more images than records (once it had none)
    assert "encode train: 100%" in said.err and " 4/4 " in said.err
    ids, texts = read_shards(tokens_dir(run, "train"))
    tokenizer = load_vae(run)
    pixels = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in images])
    own, mirrored = tokenizer.encode(pixels), tokenizer.encode(pixels.flip(-1))
    assert texts == [
        "a red one", "the left one", "a red one", "a blue one", "a blue one", "a cat", "a dog", "a cat", "a dog",
        "a sun", "a sun",
    ]  # fmt: skip
    rows = [
        own[0],
        own[0],
        mirrored[0],
        own[1],
        mirrored[1],
        own[2],
        own[2],
        mirrored[2],
        mirrored[2],
        own[3],
        mirrored[3],
    ]
    assert torch.equal(ids, torch.stack(rows))
    assert (splits["train"]["examples"], splits["train"]["mirrored"], splits["train"]["rows"]) == (4, 4, 11)
    assert read_shards(tokens_dir(run, "validation"))[1] == [
        "a red one",
        "the left one",
        "a blue one",
        "a cat",
        "a dog",
        "a sun",
    ]


def test_a_shard_no_earlier_run_wrote_encodes_its_images_as_they_come_and_digests_its_rows_as_before(tmp_path):
    """A shard's images were all held as floats until it was full (10,000 at 256 px: 7.9 GB); one that cannot be
    reused is now encoded 256 images at a time. Its codes, and its rows' digest (which earlier runs' shards keep,
    so it must not change), are those of the whole shard at once."""
    import hashlib

    from train.encode import ENCODE_BATCH, Shard

    torch.manual_seed(0)
    tokenizer = vae.build("dvae", codebook_size=16, factor=4, hidden=8, res_blocks=1).eval()
    images = torch.rand(ENCODE_BATCH + 44, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    texts = [[f"image {i}"] * (1 + i % 2) for i in range(len(images))]  # every other image has two captions
    shards = {}
    for as_they_come in (True, False):
        shard = shards[as_they_come] = Shard(tmp_path / "s", tokenizer, "cpu", as_they_come)
        most = 0
        for image, caption in zip(images, texts):
            shard.add(image, caption)
            most = max(most, len(shard.pending))
        assert most == (ENCODE_BATCH - 1 if as_they_come else len(images)), as_they_come
    rows = [i for i, caption in enumerate(texts) for _ in caption]
    with torch.no_grad():
        want = tokenizer.encode(images)[torch.tensor(rows)]
    digest = hashlib.sha256()  # the digest as train.encode has always written it
    for i in rows:
        digest.update(images[i].contiguous().numpy().tobytes())
        digest.update(json.dumps(texts[i][0]).encode())
    for shard in shards.values():
        assert torch.equal(shard.row_ids(), want) and shard.rows() == digest.hexdigest()[:16]


def test_shards_an_encode_is_writing_are_not_trained_on_and_two_encodes_do_not_run_at_once(
    run_dir, tmp_path, monkeypatch
):
    """train.dalle beside a running train.encode trained on the shards written so far as the whole split (30% of
    it, and train.all then skipped the stage); two encodes of one run wrote the same shards (a traceback)."""
    from dalle_mini_impl.data.tokens import ENCODING
    from train import embed as train_embed
    from train.loop import one_trainer

    run = copy_run(run_dir, tmp_path / "run")
    train_clip.main(args_for(run, "train.clip.steps=1"))  # train.embed's CLIP
    encode_split = train_encode.encode_split
    marked = []

    def stopped_in(cfg, tokenizer, split, *args, **kwargs):  # an encode stopped while it writes the train split
        marked.append(
            (tokens_dir(run, "train") / ENCODING).exists() and (tokens_dir(run, "validation") / ENCODING).exists()
        )
        if split == "train":
            raise KeyboardInterrupt
        return encode_split(cfg, tokenizer, split, *args, **kwargs)

    monkeypatch.setattr(train_encode, "encode_split", stopped_in)
    with pytest.raises(KeyboardInterrupt):
        train_encode.main(args_for(run))
    assert marked == [True]  # both splits marked before the first shard is written, and left so by the stop
    says = r"^the token shards in '.*train' are being written by train.encode, or it stopped before finishing"
    with pytest.raises(UserError, match=says):
        train_dalle.main(args_for(run, "train.dalle.steps=1"))
    with pytest.raises(UserError, match=says):
        train_embed.main(args_for(run))
    monkeypatch.undo()
    train_encode.main(args_for(run))  # the encode run again finishes them
    assert not any(tokens_dir(run, s).joinpath(ENCODING).exists() for s in ("train", "validation"))
    train_dalle.main(args_for(run, "train.dalle.steps=1"))
    with one_trainer(run, "encode", is_main=True):  # another encode holds the run
        with pytest.raises(UserError, match=r"^train.encode is already running in '.*' \(process \d+\); stop it"):
            train_encode.main(args_for(run))


def test_dalle_runs_stops_and_resumes(run_dir):
    train_encode.main(args_for(run_dir))  # the token shards (reused when an earlier test wrote them): alone too
    train_dalle.main(args_for(run_dir, "train.dalle.steps=2", "train.dalle.checkpoint_every=2"))
    ckpts = list_checkpoints(run_dir / "checkpoints" / "dalle")
    assert [p.name for p in ckpts] == ["step_00000002"]
    data_state = json.loads((ckpts[0] / "data_0.json").read_text())
    assert data_state == {"epoch": 0, "position": 16}  # two batches of 8 token rows consumed
    train_dalle.main(args_for(run_dir, "train.dalle.steps=3", "train.dalle.checkpoint_every=1"))
    last = list_checkpoints(run_dir / "checkpoints" / "dalle")[-1]
    assert last.name == "step_00000003"
    assert json.loads((last / "data_0.json").read_text()) == {"epoch": 0, "position": 24}
    weights = load_file(str(run_dir / "transformer.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert json.loads((run_dir / "transformer.json").read_text())["grid_h"] == 4


def test_the_transformer_trains_from_token_shards_without_the_images_or_datasets(run_dir, tmp_path):
    """A machine holding a run folder's token shards trains the transformer with neither the images (--data names
    a folder that is not there) nor Hugging Face datasets installed, as the lent GPU machines have it (SCALING.md)."""
    train_encode.main(args_for(run_dir))  # the token shards (reused when an earlier test wrote them)
    run = copy_run(run_dir, tmp_path / "r")
    argv = args_for(run, "train.dalle.steps=2", "train.dalle.image_every=2") + ["--data", str(tmp_path / "absent")]
    code = f"import sys\nsys.modules['datasets'] = None\nfrom train import dalle\nsys.exit(dalle.main({argv!r}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["stage"] == "dalle"
    assert (run / "transformer.safetensors").is_file()
    # another data set than shapes: the grid samples its first validation captions below their images (once four
    # fixed prompts of another data set's kind, "a red apple | a smiling face | ...", whatever the data)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / "dalle"))
    events.Reload()
    shown = events.Tensors("dalle/prompts/text_summary")[0].tensor_proto.string_val[0].decode()
    captions = read_shards(tokens_dir(run, "validation"))[1][:4]
    assert shown == "validation images (top) and samples of their captions: " + " | ".join(captions)
    grid = events.Images("dalle/samples")[0]
    assert (grid.width, grid.height) == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2)


def test_a_stage_writes_its_weights_the_marker_of_done_after_its_json(run_dir, tmp_path, monkeypatch):
    """Once the weights came first: a kill between the two writes left a stage train.all called done (its marker,
    the weights, was there) and a folder nothing could load (no vae.json / transformer.json)."""
    import os as os_module

    written, replace = [], os_module.replace
    monkeypatch.setattr(os_module, "replace", lambda src, dst: (written.append(Path(dst).name), replace(src, dst)))
    run = copy_run(run_dir, tmp_path / "r")
    train_vae.main(args_for(run, "train.vae.steps=1"))
    train_encode.main(args_for(run))
    train_dalle.main(args_for(run, "train.dalle.steps=1"))
    for part in ("vae", "transformer"):
        assert written.index(f"{part}.json") < written.index(f"{part}.safetensors"), written


def test_shards_of_an_earlier_image_tokenizer_are_encoded_again_not_trained_on(run_dir, tmp_path, capsys):
    """Once: a VAE trained again after train.encode, whose shards encode reused and train.dalle read (an
    IndexError with a smaller codebook; other codes, silently, with a larger one)."""
    run = copy_run(run_dir, tmp_path / "r")
    if not (run / "tokens").is_dir():
        train_encode.main(args_for(run))
    train_vae.main(args_for(run, "train.vae.steps=3", "train.vae.lr=3e-3"))  # other weights than the shards'
    with pytest.raises(UserError, match="was encoded by another image tokenizer than the run's vae.safetensors"):
        train_dalle.main(args_for(run, "train.dalle.steps=1"))
    capsys.readouterr()
    train_encode.main(args_for(run))
    splits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["splits"]
    assert all(s["shards_reused"] == 0 and s["shards_written"] > 0 for s in splits)
    train_dalle.main(args_for(run, "train.dalle.steps=1"))


def test_a_stage_run_before_the_one_it_needs_names_that_stage(tmp_path):
    """Once: "model folder ... does not exist; pass --model", an option no training stage has."""
    with pytest.raises(UserError, match="has no vae.safetensors; run python -m train.vae with the same --config"):
        train_encode.main(args_for(tmp_path / "empty"))
    with pytest.raises(UserError, match="has no text.model; run python -m train.tokenizer"):
        train_dalle.main(args_for(tmp_path / "empty", "train.dalle.steps=1"))
    with pytest.raises(UserError, match="has no text.model; run python -m train.tokenizer"):
        train_clip.main(args_for(tmp_path / "empty", "train.clip.steps=1"))


def test_the_unclip_stages_name_the_stage_a_missing_part_comes_from(run_dir, tmp_path):
    """Once "it is incomplete: retrain or copy the whole bundle", which tells a training run nothing."""
    from train import embed as train_embed
    from train import prior as train_prior

    run = copy_run(run_dir, tmp_path / "r")
    (run / "vae.safetensors").unlink()
    (run / "clip.safetensors").write_bytes(b"")  # there: only its absence is asked about
    for main in (train_prior.main, train_embed.main):
        with pytest.raises(UserError, match="has no vae.safetensors; run python -m train.vae with the same --config"):
            main(args_for(run, "unclip.enabled=true", "train.prior.steps=1"))
    decoder = copy_run(run_dir, tmp_path / "d")
    (decoder / "transformer.safetensors").unlink(missing_ok=True)
    with pytest.raises(UserError, match="has no transformer.safetensors to start unCLIP's decoder from; run python"):
        train_dalle.start_from_transformer(None, decoder)


def test_the_transformer_encodes_captions_as_the_run_tokenizer_was_trained(run_dir, tmp_path):
    """Once: --set text.text_len=8 after a tokenizer of 16 exported a transformer the bundle could not load."""
    run = copy_run(run_dir, tmp_path / "r")
    with pytest.raises(UserError, match="'text.text_len' is 8 but the run's text tokenizer was trained with 16"):
        train_dalle.main(args_for(run, "train.dalle.steps=1", "text.text_len=8"))
    # CLIP too: once it trained, and the run folder could not load what it wrote
    with pytest.raises(UserError, match="'text.text_len' is 8 but the run's text tokenizer was trained with 16"):
        train_clip.main(args_for(run, "train.clip.steps=1", "text.text_len=8"))
    with pytest.raises(UserError, match="'data.image_size' is 32 but the run's config.json says 16"):
        train_clip.main(args_for(run, "train.clip.steps=1", "data.image_size=32"))
    # the transformer and encode too: the one trained a transformer for an 8 x 8 grid on 4 x 4 shards, and the other
    # rewrote the shards and config.json, so that the run's CLIP no longer loaded
    with pytest.raises(UserError, match="'data.image_size' is 32 but the run's config.json says 16"):
        train_dalle.main(args_for(run, "train.dalle.steps=1", "data.image_size=32"))
    with pytest.raises(UserError, match="'data.image_size' is 32 but the run's config.json says 16"):
        train_encode.main(args_for(run, "data.image_size=32"))


def test_resuming_a_checkpoint_of_another_model_is_one_sentence(run_dir, tmp_path):
    """Once a "size mismatch" traceback from accelerate: the run's checkpoint, then the same --out with other sizes."""
    run = copy_run(run_dir, tmp_path / "r")
    train_dalle.main(args_for(run, "train.dalle.steps=1", "train.dalle.checkpoint_every=1"))
    with pytest.raises(UserError, match="holds another model than this config builds"):
        train_dalle.main(args_for(run, "train.dalle.steps=2", "transformer.dim=64", "transformer.heads=2"))


def test_resuming_under_another_freeze_is_one_sentence(run_dir, tmp_path):
    """Once a ValueError traceback from the optimizer's state (another number of trainable tensors), or, between
    groups of the same shapes (blocks.0 and blocks.1), a silent resume with one block's Adam moments in another's."""
    run = copy_run(run_dir, tmp_path / "r")
    first = ["train.dalle.steps=1", "train.dalle.checkpoint_every=1", "train.dalle.freeze=['blocks.0']"]
    train_dalle.main(args_for(run, *first))
    for freeze in ("['blocks.1']", "['head']", "[]"):
        with pytest.raises(UserError, match="was trained with other parameters frozen than train.dalle.freeze"):
            train_dalle.main(args_for(run, "train.dalle.steps=2", f"train.dalle.freeze={freeze}"))
    train_dalle.main(args_for(run, "train.dalle.steps=2", "train.dalle.freeze=['blocks.0']"))  # the same: resumes
    assert [p.name for p in list_checkpoints(run / "checkpoints" / "dalle")][-1] == "step_00000002"


@pytest.mark.slow
def test_compile_flag_trains_the_same_step_as_eager(run_dir, tmp_path, capsys):
    # train.<stage>.compile = true runs the loss module through torch.compile (inductor), also in a process whose
    # earlier stages did not compile (train.all's: accelerate's own switch would keep the first stage's choice)
    losses = {}
    for flag in ("false", "true"):
        run = copy_run(run_dir, tmp_path / flag)
        if not (run / "tokens").is_dir():
            train_encode.main(args_for(run))
        capsys.readouterr()
        forget_compiled()
        train_dalle.main(args_for(run, "train.dalle.steps=1", f"train.dalle.compile={flag}"))
        losses[flag] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
        assert bool(compiled_graphs()) == (flag == "true")
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    # the compiled run's bundle has the plain model's keys (no torch.compile wrapper prefix)
    keys = {flag: sorted(load_file(str(tmp_path / flag / "transformer.safetensors"))) for flag in losses}
    assert keys["true"] == keys["false"] and not any("_orig_mod" in k for k in keys["true"])


def test_clip_reads_its_own_caption_omission_on_shapes():
    from dalle_mini_impl.shapes.generator import parse_caption

    def stated(cfg) -> list[bool]:  # per one-object caption: does it state size, color and position?
        out = []
        for example in itertools.islice(ExampleStream(cfg.data, "train", train=True, seed=0), 200):
            parsed = parse_caption(example["caption"])
            if parsed["kind"] == "one":
                obj = parsed["objects"][0]
                out.append(None not in (obj["size"], obj["color"], parsed["where"]))
        return out

    cfg = load_config("shapes", ["data.image_size=16"])
    assert not all(stated(train_clip.clip_data(cfg)))  # default: data.shapes.omit_p = 0.3 leaves some out
    full = train_clip.clip_data(load_config("shapes", ["data.image_size=16", "clip.shapes_omit_p=0"]))
    assert all(stated(full)) and full.data.shapes.omit_p == 0 and cfg.data.shapes.omit_p == 0.3
    with pytest.raises(UserError, match="clip.shapes_omit_p"):
        train_clip.clip_data(load_config("shapes", ["clip.shapes_omit_p=1.5"]))


def logged_tags(run, stage: str) -> dict[str, list[str]]:
    """The TensorBoard tags a stage wrote under RUN/logs/STAGE, by kind (scalars, images, tensors for text)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / stage))
    events.Reload()
    return events.Tags()


def test_stages_log_image_grids(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    train_encode.main(args_for(run))
    train_dalle.main(args_for(run, "train.dalle.steps=1"))
    train_clip.main(args_for(run, "train.clip.steps=1"))
    assert "vae/originals_over_reconstructions" in logged_tags(run_dir, "vae")["images"]
    dalle_tags = logged_tags(run, "dalle")
    assert "dalle/samples" in dalle_tags["images"] and "dalle/prompts/text_summary" in dalle_tags["tensors"]
    assert "clip/augmented" in logged_tags(run, "clip")["images"]


def test_image_grids_are_logged_at_the_first_step_every_image_every_and_the_last(run_dir, tmp_path):
    """The trained model's grid is the one a researcher looks at: once a run whose steps were not a multiple of
    image_every (or fewer than it) logged none of its last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = copy_run(run_dir, tmp_path / "run")
    for every, steps in [(2, [1, 2, 4, 5]), (100, [1, 5])]:
        train_vae.main([*args_for(run, "train.vae.steps=5", f"train.vae.image_every={every}"), "--no-resume"])
        events = EventAccumulator(str(run / "logs" / "vae"))
        events.Reload()
        logged = [e.step for e in events.Images("vae/originals_over_reconstructions")]
        assert logged == steps, (every, logged)
        shutil.rmtree(run / "logs")


def test_clip_trains_with_hard_negatives(run_dir, tmp_path, capsys):
    """The false captions reach the training loss: from the same weights and batch, the first step's loss is higher
    with them (more captions to tell each image's from). Once only a finite loss was checked, which a training
    path that never built them passed."""
    losses = {}
    for on in ("true", "false"):
        run = copy_run(run_dir, tmp_path / on)
        train_clip.main(args_for(run, "train.clip.steps=1", f"clip.hard_negatives={on}"))
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["stage"] == "clip" and math.isfinite(result["loss"]) and (run / "clip.safetensors").is_file()
        losses[on] = result["loss"]
    assert losses["true"] > losses["false"] + 0.01, losses


def test_clip_trains_the_same_step_with_the_math_attention_kernel(run_dir, tmp_path, capsys, monkeypatch):
    """... and the setting is in force around the training step's attention (once only the losses were compared,
    which a setting the loop ignored passed: on this CPU "auto" picks the math kernel too)."""
    import torch.nn.functional as F

    sdpa, fused_allowed = F.scaled_dot_product_attention, []

    def recording(*args, **kwargs):  # the real attention; whether a fused kernel was allowed, noted
        if torch.is_grad_enabled():  # the training step's forward, not the evaluation's
            fused_allowed.append(
                torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
            )
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    losses, allowed = {}, {}
    for kernel in ("auto", "math"):
        fused_allowed.clear()
        run = copy_run(run_dir, tmp_path / kernel)
        train_clip.main(
            args_for(run, "train.clip.steps=2", "clip.hard_negatives=true", f"train.clip.attention={kernel}")
        )
        losses[kernel] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
        allowed[kernel] = set(fused_allowed)
    assert losses["math"] == pytest.approx(losses["auto"], rel=1e-4)
    assert allowed == {"auto": {True}, "math": {False}}, allowed


def test_clip_trains_and_exports(run_dir):
    train_clip.main(args_for(run_dir, "train.clip.steps=2", "train.clip.checkpoint_every=2"))
    assert (run_dir / "clip.safetensors").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    # every stage recorded its own section: the bundle config describes each artifact
    assert config["clip"]["image_width"] == 32 and config["vae"]["codebook_size"] == 32
    assert config["transformer"]["dim"] == 32


def with_bundle_parts(run: Path) -> Path:
    """`run` with a transformer and a CLIP, trained a few steps where no earlier test trained them (so that a test
    that exports the run passes alone too)."""
    if not (run / "transformer.safetensors").is_file():
        train_encode.main(args_for(run))
        train_dalle.main(args_for(run, "train.dalle.steps=2", "train.dalle.checkpoint_every=2"))
    if not (run / "clip.safetensors").is_file():
        train_clip.main(args_for(run, "train.clip.steps=2", "train.clip.checkpoint_every=2"))
    return run


def test_export_writes_a_compact_bundle_that_samples(run_dir, tmp_path):
    from dalle_mini_impl.pipeline.pipeline import Pipeline
    from train import export as train_export

    with_bundle_parts(run_dir)
    bundle = tmp_path / "bundle"
    train_export.main([str(run_dir), str(bundle), "--dtype", "fp16"])
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted(
        ["config.json", "text.model", "vae.json", "vae.safetensors", "transformer.json", "transformer.safetensors",
         "clip.safetensors"]
    )  # fmt: skip
    half = load_file(str(bundle / "transformer.safetensors"))
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    results = Pipeline.from_pretrained(bundle).generate(["a red circle"], num_images=2, candidates=3, progress=False)
    assert [r.rank for r in results[0]] == [1, 2]
    assert results[0][0].image.size == (16, 16)
    assert results[0][0].clip_score >= results[0][1].clip_score


def test_export_sets_sampling_defaults_and_nothing_else(run_dir, tmp_path):
    from dalle_mini_impl.config import read_config_json
    from dalle_mini_impl.errors import UserError
    from train import export as train_export

    with_bundle_parts(run_dir)
    bundle = tmp_path / "bundle"
    train_export.main([str(run_dir), str(bundle), "--set", "sample.guidance_scale=2.5", "--set", "sample.top_k=7"])
    run_cfg, cfg = read_config_json(run_dir / "config.json"), read_config_json(bundle / "config.json")
    assert (cfg.sample.guidance_scale, cfg.sample.top_k) == (2.5, 7)
    assert cfg.vae == run_cfg.vae and cfg.transformer == run_cfg.transformer  # the model's settings as trained
    with pytest.raises(UserError, match="only sampling settings"):
        train_export.main([str(run_dir), str(tmp_path / "other"), "--set", "vae.factor=8"])
    assert not (tmp_path / "other").exists()  # refused before anything is written
    assert cfg.data.source == run_cfg.data.source == "shapes"  # a source any machine has is kept


def test_export_checks_its_folders_before_writing_and_drops_parts_of_an_earlier_bundle(run_dir, tmp_path):
    from train import export as train_export

    with_bundle_parts(run_dir)
    (tmp_path / "afile").write_text("x")
    for run, dest, says in [
        (run_dir, tmp_path / "afile", "is a file; pass a folder"),
        (run_dir, tmp_path / "afile" / "b", "which is a file"),
        (run_dir, run_dir, "is the run folder itself"),
        (tmp_path / "nothere", tmp_path / "b", "run folder '.*nothere' does not exist; pass the folder train.all"),
        # once written over, beside its checkpoints, its stages then done to train.all
        (run_dir, shutil.copytree(run_dir, tmp_path / "other"), "holds checkpoints/, so it is a run folder"),
    ]:
        with pytest.raises(UserError, match=says):
            train_export.main([str(run), str(dest)])
    says = r"^the bundle's sampling settings \(the run's, with --set\): config key 'sample.num_images' is 0; keep at"
    with pytest.raises(UserError, match=says):
        train_export.main([str(run_dir), str(tmp_path / "b"), "--set", "sample.num_images=0"])  # once every use
    assert not (tmp_path / "b").exists()
    half = shutil.copytree(run_dir, tmp_path / "half", ignore=shutil.ignore_patterns("checkpoints", "logs", "tokens"))
    (half / "transformer.safetensors").unlink(missing_ok=True)
    with pytest.raises(UserError, match="no transformer.safetensors"):
        train_export.main([str(half), str(tmp_path / "partial")])
    assert not (tmp_path / "partial").exists()  # nothing written for a run that cannot make a bundle
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "unclip.safetensors").write_bytes(b"an earlier export's")
    (bundle / "unclip.json").write_text("{}")
    train_export.main([str(run_dir), str(bundle)])  # a run without unCLIP's parts
    assert not (bundle / "unclip.safetensors").exists() and not (bundle / "unclip.json").exists()


def test_an_export_that_stops_mid_copy_leaves_the_bundles_files_whole(run_dir, tmp_path, monkeypatch):
    """The bundle's copied files (text.model, vae.json, transformer.json) were copied in place: an export stopped
    half-way, or a bundle loaded while being exported again, read torn files."""
    import shutil as shutil_module

    from train import export as train_export

    with_bundle_parts(run_dir)
    bundle = tmp_path / "bundle"
    train_export.main([str(run_dir), str(bundle)])
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    copy = shutil_module.copyfile
    copied = []

    def half_then_stop_at(nth: int):
        def copyfile(source, dest):
            copied.append(Path(source).name)
            copy(source, dest)
            if len(copied) == nth:
                with open(dest, "r+b") as f:
                    f.truncate(10)
                raise KeyboardInterrupt

        return copyfile

    for nth in (1, 2, 3):  # text.model, then the run's side files (vae.json, transformer.json)
        copied.clear()
        monkeypatch.setattr(train_export.shutil, "copyfile", half_then_stop_at(nth))
        with pytest.raises(KeyboardInterrupt):
            train_export.main([str(run_dir), str(bundle)])
        assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before, copied
    assert set(copied) == {"text.model", "vae.json", "transformer.json"}


def test_export_leaves_a_local_data_path_behind(run_dir, tmp_path):
    from dalle_mini_impl.config import read_config_json, save_config
    from dalle_mini_impl.data.streams import is_local_source
    from train import export as train_export

    with_bundle_parts(run_dir)
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "logs", "tokens"))
    cfg = read_config_json(run / "config.json")
    cfg.data.source = str(tmp_path)  # the folder the run read its images from
    save_config(cfg, run / "config.json")
    train_export.main([str(run), str(tmp_path / "bundle")])
    assert read_config_json(tmp_path / "bundle" / "config.json").data.source == ""
    assert [is_local_source(s) for s in (str(tmp_path), "./data", "shards/{split}-*.tar", "x.parquet")] == [True] * 4
    assert [is_local_source(s) for s in ("shapes", "", "user/emoji-styles", "mnist")] == [False] * 4


@pytest.mark.parametrize(
    "setting, says",
    [("vae.disc_start=0", "vae.disc_start's critic needs every"), ("train.vae.ema_decay=0.9", "ema_decay needs")],
)
def test_what_needs_whole_weights_refuses_sharded_training(run_dir, tmp_path, monkeypatch, setting, says):
    """FSDP and ZeRO-3 need GPUs under accelerate, so the sharding is what `shards_weights` reports (its own tests:
    test_sharded.py). The VQ's critic trains outside the wrapper that gathers the shards; EMA weights copy them."""
    from train import loop

    monkeypatch.setattr(loop, "shards_weights", lambda model, accelerator=None: True)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(run_dir / "text.model", run / "text.model")
    vq = ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]", "train.vae.steps=1"]
    with pytest.raises(UserError, match=f"{says}.*FSDP and ZeRO-3 do not; .*DDP") as error:
        train_vae.main(args_for(run, *vq, setting))
    assert "\n" not in str(error.value)
    assert not (run / "vae.safetensors").exists()
    monkeypatch.undo()
    train_vae.main(args_for(run, *vq, setting))  # unsharded, both train
    assert (run / "vae.safetensors").exists()


def test_export_leaves_a_vqs_critic_behind_and_the_bundles_vq_codes_and_draws_as_the_runs(run_dir, tmp_path):
    from train import export as train_export

    with_bundle_parts(run_dir)
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "logs", "tokens"))
    torch.manual_seed(0)
    vq = vae.build("vq", codebook_size=16, factor=4, hidden=8, res_blocks=1, lookup_dim=4, disc_start=0).eval()
    vae.save_pretrained(vq, run)
    assert any(k.startswith("discriminator.") for k in load_file(str(run / "vae.safetensors")))
    train_export.main([str(run), str(tmp_path / "bundle"), "--dtype", "fp32"])
    bundle = tmp_path / "bundle"
    assert json.loads((bundle / "vae.json").read_text())["kwargs"]["disc_start"] == -1
    weights = load_file(str(bundle / "vae.safetensors"))
    assert not any(k.startswith("discriminator.") for k in weights)
    assert set(weights) == {k for k in vq.state_dict() if not k.startswith("discriminator.")}
    loaded = load_vae(bundle)
    assert loaded.discriminator is None
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids = vq.encode(images)
        assert torch.equal(loaded.encode(images), ids)
        assert torch.equal(loaded.decode(ids), vq.decode(ids))
    assert json.loads((run / "vae.json").read_text())["kwargs"]["disc_start"] == 0  # the run keeps its critic


def test_eval_recon_prints_psnr_ssim_usage(run_dir, capsys):
    from dalle_mini_impl.eval.recon import main as recon_main
    from dalle_mini_impl.eval.recon import ssim

    capsys.readouterr()
    recon_main(["--model", str(run_dir), "--split", "validation", "--limit", "32"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 32 and 0 <= out["usage"] <= 1 and out["codes_used"] >= 1
    assert 0 < out["psnr"] < 100 and -1 <= out["ssim"] <= 1 and 0 <= out["judge_accepts"] <= 1
    # the numbers are those of the images' reconstructions (once only their ranges were checked: a PSNR of 42
    # whatever the images would have passed)
    from dalle_mini_impl.eval.recon import recon_metrics

    tokenizer = load_vae(run_dir)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    metrics = recon_metrics(tokenizer, [{"image": images[:4]}, {"image": images[4:]}])
    with torch.no_grad():
        ids = tokenizer.encode(images)
        mse = float(((tokenizer.decode(ids).float() - images) ** 2).mean())
    assert metrics["n"] == 6 and metrics["codes_used"] == len(ids.unique())
    assert metrics["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    with torch.no_grad():
        assert metrics["ssim"] == pytest.approx(float(ssim(tokenizer.decode(ids).float(), images).mean()), rel=1e-5)
    assert metrics["usage"] == len(ids.unique()) / tokenizer.codebook_size
    # the summary of sums (added over processes in training) by hand: 8 / 32 squared error, SSIM 3 over 4 images,
    # 2 judged right, codes 0 and 2 used 3 and 1 times of 4
    from dalle_mini_impl.eval.recon import recon_summary

    sums = torch.tensor([8.0, 32.0, 3.0, 4.0, 2.0], dtype=torch.float64)
    summary = recon_summary(sums, torch.tensor([3, 0, 1, 0]), judge_captions=True)
    assert summary == pytest.approx(
        {"psnr": 10 * math.log10(4), "mse": 0.25, "ssim": 0.75, "usage": 0.5, "codes_used": 2,
         "perplexity": math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), "n": 4, "judge_accepts": 0.5}
    )  # fmt: skip
    assert type(summary["n"]) is int  # printed as 4, not 4.0
    with pytest.raises(UserError, match="^the evaluation split gave no images; check --data and --split"):
        recon_summary(torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)  # identical images: SSIM 1
    assert (ssim(x, torch.rand(2, 3, 16, 16)) < 0.5).all()


def test_eval_recon_refuses_a_broken_config_json_rather_than_reading_the_defaults(run_dir, tmp_path):
    """Once any error reading config.json (an unknown key) fell back to the project's defaults, silently: an emoji
    bundle would have been evaluated on shapes. A folder with no config.json still gets the defaults."""
    from dalle_mini_impl.eval.recon import main as recon_main

    broken = copy_run(run_dir, tmp_path / "broken")
    values = json.loads((broken / "config.json").read_text())
    values["sample"]["new_knob"] = 1
    (broken / "config.json").write_text(json.dumps(values))
    with pytest.raises(UserError, match="config file '.*broken/config.json': unknown config key 'sample.new_knob'"):
        recon_main(["--model", str(broken), "--split", "validation", "--limit", "4"])


def test_a_bundle_loaded_into_the_wrong_preset_is_one_sentence(run_dir, tmp_path):
    from dalle_mini_impl.clip.model import clip_from_config
    from dalle_mini_impl.errors import UserError
    from dalle_mini_impl.pipeline.bundle import load_module
    from dalle_mini_impl.text.tokenizer import TextTokenizer

    # the tiny run's CLIP weights (trained here: the test must not depend on another one's run), loaded into the
    # CLIP of the full shapes preset
    run = copy_run(run_dir, tmp_path / "run")
    train_clip.main(args_for(run, "train.clip.steps=1"))
    cfg = load_config("shapes")
    tokenizer = TextTokenizer.load(run / "text.model", cfg.text.text_len)
    model = clip_from_config(cfg, tokenizer)
    with pytest.raises(UserError) as e:
        load_module(model, run / "clip.safetensors", "CLIP")
    message = str(e.value)
    assert "does not fit the CLIP built from this config" in message and "\n" not in message
    assert "load it with the config.json saved beside it, not another preset" in message


def test_unclip_stages_train_export_and_draw_variations(run_dir, tmp_path, capsys):
    """train.unclip and train.prior on the tiny run: the CLIP embeddings beside the shards are computed once (and
    again for another CLIP), both losses fall, resume works, and the exported bundle draws variations."""
    from dalle_mini_impl.pipeline.pipeline import Pipeline
    from train import export as train_export
    from train import prior as train_prior
    from train import unclip as train_unclip

    run = copy_run(run_dir, tmp_path / "run")
    unclip = [
        f"train.{s}.{k}"
        for s in ("unclip", "prior")
        for k in (
            "batch_size=8",
            "warmup_steps=2",
            "log_every=1",
            "eval_every=1000",
            "image_every=1000",
            "eval_batches=1",
        )
    ]
    unclip += ["unclip.cond_len=2", "unclip.grid=0", "unclip.prior.dim=32", "unclip.prior.depth=1",
               "unclip.prior.heads=2", "unclip.prior.sample_steps=4", "train.unclip.lr=3e-3",
               "train.prior.lr=3e-3"]  # fmt: skip
    train_encode.main(args_for(run))
    train_dalle.main(args_for(run, "train.dalle.steps=1"))
    train_clip.main(args_for(run, "train.clip.steps=2"))
    capsys.readouterr()
    train_unclip.main(args_for(run, *unclip, "train.unclip.steps=4", "train.unclip.checkpoint_every=2"))
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    embeddings = tokens_dir(run, "train") / "clip.safetensors"
    stamp = embeddings.stat().st_mtime_ns
    # resumed from step 4 to 12: the embeddings are read, not recomputed
    train_unclip.main(args_for(run, *unclip, "train.unclip.steps=12", "train.unclip.checkpoint_every=4"))
    assert embeddings.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (run / "checkpoints" / "unclip").iterdir())[-1].endswith("12")
    train_prior.main(args_for(run, *unclip, "train.prior.steps=12"))
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert logged[0]["stage"] == "unclip" and logged[0]["loss"] < first[0]["loss"]
    assert logged[1]["stage"] == "prior" and math.isfinite(logged[1]["eval/val_cosine"])
    assert logged[1]["cosine"] != 0 and -1 <= logged[1]["cosine"] <= 1  # the training part, logged as it is
    config = json.loads((run / "config.json").read_text())
    assert config["unclip"]["cond_len"] == 2 and config["unclip"]["prior"]["dim"] == 32
    assert json.loads((run / "unclip.json").read_text())["cond_dim"] == 16  # the tiny CLIP's embed_dim

    bundle = tmp_path / "bundle"
    train_export.main([str(run), str(bundle)])
    assert {"unclip.safetensors", "unclip.json", "prior.safetensors", "prior.json"} <= {
        p.name for p in bundle.iterdir()
    }
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    image = pipe.decode(torch.zeros(1, 16, dtype=torch.long))[0]
    from dalle_mini_impl.data.images import to_pil

    kept = pipe.variations([to_pil(image)], num_images=2, candidates=3, progress=False)[0]
    assert [r.rank for r in kept] == [1, 2] and kept[0].clip_score >= kept[1].clip_score
    assert pipe.generate(["a red circle"], method="unclip", num_images=1, candidates=2, progress=False)[0][0].rank == 1


def test_unclip_with_a_grid_starts_from_a_decoder_without_one(run_dir, tmp_path, capsys):
    """unclip.grid: the embeddings file gains CLIP's spatial features (computed again by `train.embed`, the file's
    grid differs), and `--init-from` a decoder that reads the embedding alone widens its projection
    (train.dalle.widen_to_grid)."""
    from safetensors import safe_open

    from dalle_mini_impl.pipeline.pipeline import Pipeline
    from train import embed as train_embed
    from train import export as train_export
    from train import unclip as train_unclip

    run = copy_run(run_dir, tmp_path / "run")
    small = ["unclip.cond_len=2", "unclip.grid=0", "train.unclip.batch_size=8", "train.unclip.eval_every=1000",
             "train.unclip.image_every=1000", "train.unclip.eval_batches=1"]  # fmt: skip
    train_encode.main(args_for(run))
    train_dalle.main(args_for(run, "train.dalle.steps=1"))
    train_clip.main(args_for(run, "train.clip.steps=1"))
    train_unclip.main(args_for(run, *small, "train.unclip.steps=1"))
    plain = tmp_path / "plain"
    train_export.main([str(run), str(plain)])
    wide = copy_run(run, tmp_path / "wide")
    # computed ahead by `python -m train.embed` with the grid, then read by train.unclip, not computed again
    capsys.readouterr()
    train_embed.main(args_for(wide, *small, "unclip.grid=2"))
    printed = json.loads(capsys.readouterr().out)
    embeddings = tokens_dir(wide, "train") / "clip.safetensors"
    assert printed["grid"] == 2 and printed["splits"]["train"]["file"] == str(embeddings)
    assert printed["splits"]["train"]["rows"] == len(read_shards(tokens_dir(wide, "train"))[1])
    stamp = embeddings.stat().st_mtime_ns
    train_unclip.main([*args_for(wide, *small, "unclip.grid=2", "train.unclip.steps=2"), "--init-from", str(plain)])
    assert embeddings.stat().st_mtime_ns == stamp
    with safe_open(str(embeddings), framework="pt") as f:
        assert f.metadata()["grid"] == "2" and f.get_slice("grid").get_shape()[1] == 2 * 2 * 32
    assert json.loads((wide / "unclip.json").read_text())["cond_dim"] == 16 + 2 * 2 * 32
    assert json.loads((wide / "logs" / "unclip" / "init_from.json").read_text())["source"] == str(plain)
    bundle = tmp_path / "bundle"
    train_export.main([str(wide), str(bundle)])
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    assert pipe.cfg.unclip.grid == 2
    image = pipe.decode(torch.zeros(1, 16, dtype=torch.long))
    from dalle_mini_impl.data.images import to_pil

    assert len(pipe.variations([to_pil(image[0])], num_images=1, candidates=2, progress=False)[0]) == 1
    # the same rows again: read, not computed; after the image tokenizer changes (retrained), its shards are stale:
    # refused until train.encode writes them again (their ids name the old tokenizer's codes)
    from safetensors.torch import load_file, save_file

    from train.embed import clip_embeddings

    before = clip_embeddings(wide, "train", torch.device("cpu"), grid=2)
    assert embeddings.stat().st_mtime_ns == stamp
    weights = load_file(str(wide / "vae.safetensors"))
    save_file({k: v + 0.05 if v.is_floating_point() else v for k, v in weights.items()}, str(wide / "vae.safetensors"))
    with pytest.raises(UserError, match="was encoded by another image tokenizer than the run's vae.safetensors"):
        clip_embeddings(wide, "train", torch.device("cpu"), grid=2)
    train_encode.main(args_for(wide, *small, "unclip.grid=2"))  # the same images, the new tokenizer's ids
    after = clip_embeddings(wide, "train", torch.device("cpu"), grid=2)
    assert embeddings.stat().st_mtime_ns != stamp and not torch.equal(after["image"], before["image"])
    torch.testing.assert_close(after["text"], before["text"])  # the captions did not change


def test_train_all_force_trains_a_finished_stage_again_from_step_0(run_dir, tmp_path, monkeypatch, capfd):
    """Once `--force` resumed the stage's last checkpoint, at its last step, and trained nothing again."""
    from train import all as train_all

    run = shutil.copytree(run_dir, tmp_path / "run")
    before = load_file(run / "vae.safetensors")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the stage's process trains at run_dir's thread count
    args = args_for(run, "train.vae.steps=4", "train.vae.checkpoint_every=2")
    assert train_all.main([*args, "--only", "vae", "--force"]) == 0
    said = capfd.readouterr().err
    assert "resumed vae" not in said and "vae starts at step 0 (--force): moved its earlier checkpoints" in said, said
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("vae.set-aside-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_00000002", "step_00000004"]
    assert [p.name for p in list_checkpoints(run / "checkpoints" / "vae")] == ["step_00000002", "step_00000004"]
    after = load_file(run / "vae.safetensors")  # trained again from nothing: the same weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a finished stage is skipped; with other settings, the skip says which and what would train it
    assert train_all.main([*args_for(run, "train.vae.steps=6", "train.vae.checkpoint_every=2"), "--only", "vae"]) == 0
    said = capfd.readouterr()
    assert '"skipped"' in said.out
    changed = "stage vae was done with other settings than these (train.vae.steps 4 (now 6)); --force trains it again"
    assert changed in said.err
    assert train_all.main([*args, "--only", "vae"]) == 0
    assert "other settings" not in capfd.readouterr().err


def test_a_forced_run_that_stopped_is_continued_by_the_command_without_force(run_dir, tmp_path, monkeypatch, capfd):
    """A stopped `--force` run said "rerun the same command to resume": with --force it started over, without it
    every stage whose earlier output still existed was skipped, the new checkpoints ignored."""
    from train import all as train_all

    run = shutil.copytree(run_dir, tmp_path / "run")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # tests.kill_at
    args = args_for(run, "train.vae.steps=4", "train.vae.checkpoint_every=2")
    assert train_all.main([*args, "--only", "vae", "--force"]) == 0
    straight = load_file(run / "vae.safetensors")
    run_stage = train_all.run_stage

    def stopped_at_step_2(cmd):  # the real stage, sent SIGINT (Ctrl-C) after its step 2
        at = cmd.index("train.vae")
        return run_stage([*cmd[: at - 1], "-m", "tests.kill_at", "step:2:SIGINT", *cmd[at:]])

    monkeypatch.setattr(train_all, "run_stage", stopped_at_step_2)
    assert train_all.main([*args, "--only", "vae", "--force"]) == 128 + 2
    assert (
        "stage train.vae stopped (exit code 130); rerun the command without --force to resume" in capfd.readouterr().err
    )
    assert json.loads((run / ".force-pending.json").read_text()) == {"vae": "resume"}
    monkeypatch.setattr(train_all, "run_stage", run_stage)
    assert train_all.main([*args, "--only", "vae"]) == 0  # not skipped: resumed at step 2, trained to 4
    said = capfd.readouterr()
    assert '"skipped"' not in said.out and "resumed vae" in said.err and "step 2" in said.err, said.err[-2000:]
    after = load_file(run / "vae.safetensors")
    assert all(torch.equal(straight[k], after[k]) for k in straight)  # as the run that never stopped
    assert not (run / ".force-pending.json").exists()
    assert train_all.main([*args, "--only", "vae"]) == 0 and '"skipped"' in capfd.readouterr().out
    # stopped while the stage started up, before its loop set anything aside: the old checkpoints (this run's now,
    # step 4) must not be resumed as the forced run's; train.all sets them aside before the stage starts
    monkeypatch.setattr(train_all, "run_stage", lambda cmd: 130)
    assert train_all.main([*args, "--only", "vae", "--force"]) == 130
    assert list_checkpoints(run / "checkpoints" / "vae") == [] and not (run / "checkpoints" / "vae_decoder").exists()
    monkeypatch.setattr(train_all, "run_stage", run_stage)
    assert train_all.main([*args, "--only", "vae"]) == 0
    said = capfd.readouterr().err
    assert "resumed vae" not in said
    after = load_file(run / "vae.safetensors")
    assert all(torch.equal(straight[k], after[k]) for k in straight)
    # a later --force of other stages keeps what an earlier stopped one left to redo; a record that is not one is
    # a sentence
    (run / ".force-pending.json").write_text('{"dalle": "resume", "clip": "fresh"}')
    monkeypatch.setattr(train_all, "run_stage", lambda cmd: 0)
    assert train_all.main([*args, "--only", "tokenizer", "--force"]) == 0
    assert json.loads((run / ".force-pending.json").read_text()) == {"dalle": "resume", "clip": "fresh"}
    for text in ('["dalle"]', "null", '{"dalle": "resume"', '{"dalle": "later"}'):
        (run / ".force-pending.json").write_text(text)
        with pytest.raises(UserError, match="is not the record of a --force run's stages left to redo; run with"):
            train_all.main([*args, "--only", "vae"])
    assert train_all.main([*args, "--only", "tokenizer", "--force"]) == 0  # the sentence's first way out works
    assert "this --force run writes a new one" in capfd.readouterr().err
    assert not (run / ".force-pending.json").exists()


def test_an_embeddings_file_with_damaged_tensors_under_its_metadata_is_computed_again(tmp_path):
    """A NaN embedding under intact metadata was read, and stopped train.unclip / train.prior as a run of
    non-finite losses whose sentence blamed the learning rate; a train split of another width than validation's
    was a ValueError from the sampler."""
    from safetensors.torch import save_file

    from train.embed import _read

    path = tmp_path / "clip.safetensors"
    meta = {"clip": "f", "rows": "3", "grid": "0", "data": "d"}
    good = {"image": torch.randn(3, 4), "text": torch.randn(3, 4)}
    save_file(good, str(path), metadata=meta)
    assert torch.equal(_read(path, "f", 3, 0, "d")["image"], good["image"])
    for name, damaged in [
        ("nan", {**good, "image": good["image"].clone().index_fill_(1, torch.tensor([0]), float("nan"))}),
        ("widths", {**good, "text": torch.randn(3, 8)}),
        ("rows", {**good, "text": torch.randn(2, 4)}),
    ]:
        save_file(damaged, str(path), metadata=meta)
        assert _read(path, "f", 3, 0, "d") is None, name


def test_shard_ids_past_the_codebook_are_one_sentence_before_training(run_dir, tmp_path):
    """An id past the image tokenizer's codes in a shard whose digest matches (a hand edit, bit rot) was an
    IndexError ("Target 1024 is out of bounds") at the first step."""
    from dalle_mini_impl.data.tokens import shard_metadata, write_shard

    run = copy_run(run_dir, tmp_path / "r")
    train_encode.main(args_for(run))
    shard = tokens_dir(run, "train") / "shard_000_00000.safetensors"
    ids, captions = read_shards(tokens_dir(run, "train"))
    meta = shard_metadata(shard)
    n = shard_rows(shard)
    write_shard(shard, ids[:n] + 1000, captions[:n], tokenizer=meta["tokenizer"], data=meta.get("data"))
    with pytest.raises(UserError, match="hold the image id 10\\d\\d, past the image tokenizer's 32 codes; delete"):
        train_dalle.main(args_for(run, "train.dalle.steps=1"))


def test_an_evaluation_splits_skipped_records_are_counted_at_every_evaluation(imagefolder, tmp_path, capsys):
    """They were warned of (now once) but never counted: `data_skipped` counted the training stream alone."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    settings = ["train.vae.steps=2", "train.vae.eval_every=1", "train.vae.batch_size=4", "train.vae.eval_batches=2"]
    settings.append("data.val_split=train")  # 9 records, the fifth truncated: two batches of 4 hold it
    train_vae.main([*args_for(run, *settings), "--data", str(imagefolder.root)])
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said["eval/data_skipped"] == 1.0  # the truncated image of the split, in each pass
    events = EventAccumulator(str(run / "logs" / "vae"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("vae/eval/data_skipped")] == [(1, 1.0), (2, 1.0)]
    # a rerun of the finished stage resumes at its last step and evaluates (for the divergence check), logging
    # nothing again: once each rerun stacked one more point on the last step
    train_vae.main([*args_for(run, *settings), "--data", str(imagefolder.root)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval/data_skipped"] == 1.0
    events = EventAccumulator(str(run / "logs" / "vae"))
    events.Reload()
    assert [e.step for e in events.Scalars("vae/eval/val_psnr")] == [1, 2]
    # an evaluation of its first batches alone counts their records only: the batch after the last was drawn whole
    # (and the truncated fifth record with it) before the limit was met
    from dalle_mini_impl.config import DataConfig
    from dalle_mini_impl.data.streams import ExampleStream, batches
    from train.loop import Replay

    stream = ExampleStream(DataConfig(source=str(imagefolder.root), image_size=16), "train", train=False)
    first = Replay(batches(stream, 4), 1)
    assert len(next(iter(first()))["caption"]) == 4 and len(list(first())) == 1 and first.skipped == 0
