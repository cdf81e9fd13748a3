"""Fine-tuning on tiny models: `--init-from` starts every stage from a trained model's weights (and keeps its
tokenizers), a resumed run ignores it, and `train.<stage>.freeze` leaves parameter groups bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vae
from dalle_mini_impl.clip.model import clip_from_config
from dalle_mini_impl.config import load_config
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.pipeline.bundle import load_text_tokenizer, load_vae
from tests.test_train import TINY, args_for, copy_run
from train import clip as train_clip
from train import dalle as train_dalle
from train import encode as train_encode
from train import export as train_export
from train import finetune, loop
from train import prior as train_prior
from train import tokenizer as train_tokenizer
from train import unclip as train_unclip
from train import vae as train_vae
from train.dalle import build_model
from train.prior import build_prior
from train.vae import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# unCLIP's decoder and prior, as tiny as tests/test_train.py's other stages
UNCLIP = ["unclip.cond_len=2", "unclip.prior.dim=32", "unclip.prior.depth=1", "unclip.prior.heads=2",
          "unclip.prior.sample_steps=4"]  # fmt: skip
for _stage in ("unclip", "prior"):
    UNCLIP += [f"train.{_stage}.{k}" for k in ("batch_size=8", "warmup_steps=2", "log_every=1", "eval_batches=1")]
    UNCLIP += [f"train.{_stage}.{k}" for k in ("eval_every=1000", "image_every=1000")]

MAIN = {"vae": train_vae, "dalle": train_dalle, "clip": train_clip, "unclip": train_unclip, "prior": train_prior}
PART = {"vae": "vae", "dalle": "transformer", "clip": "clip", "unclip": "unclip", "prior": "prior"}


def args(run, *extra: str, init_from=None) -> list[str]:
    out = args_for(run, *UNCLIP, *extra)
    return out + (["--init-from", str(init_from)] if init_from is not None else [])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run folder with every stage trained for two steps: the model the tests fine-tune."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("source")
    train_tokenizer.main(args(run))
    train_vae.main(args(run, "train.vae.steps=2"))
    train_encode.main(args(run))
    for stage in ("dalle", "clip", "unclip", "prior"):
        MAIN[stage].main(args(run, f"train.{stage}.steps=2"))
    return run


@pytest.fixture(scope="module")
def fp16_bundle(source, tmp_path_factory):
    """The source exported as a compact fp16 bundle, as the shipped ones are."""
    bundle = tmp_path_factory.mktemp("bundle") / "b"
    train_export.main([str(source), str(bundle), "--dtype", "fp16"])
    return bundle


@pytest.fixture
def first_step_weights(monkeypatch):
    """The weights the first step of the next `loop.run` computes its gradients with (before any optimizer step)."""
    seen: dict[str, torch.Tensor] = {}
    real = loop.compute_gradients

    def spy(t, batches):
        if not seen:
            seen.update({k: v.detach().clone() for k, v in t.unwrapped.state_dict().items()})
            seen["__step__"] = torch.tensor(t.step)
        return real(t, batches)

    monkeypatch.setattr(loop, "compute_gradients", spy)
    return seen


def one_sentence(error: pytest.ExceptionInfo, *words: str) -> str:
    message = str(error.value)
    assert "\n" not in message and message.count("; ") <= 1, message
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("stage", ["vae", "dalle", "clip", "unclip", "prior"])
def test_the_first_step_runs_on_the_sources_weights(stage, source, fp16_bundle, tmp_path, first_step_weights):
    run = copy_run(source, tmp_path / "run")
    # the fp16 bundle's tensors are cast to the model's dtype (float32)
    train = MAIN[stage].main(args(run, f"train.{stage}.steps=1", init_from=fp16_bundle))
    assert train == 0
    expected = load_file(str(fp16_bundle / f"{PART[stage]}.safetensors"))
    seen = {k: v for k, v in first_step_weights.items() if k != "__step__"}
    assert int(first_step_weights["__step__"]) == 0 and seen.keys() == expected.keys()
    for name, tensor in expected.items():
        assert seen[name].dtype == (torch.float32 if tensor.is_floating_point() else tensor.dtype), name
        assert torch.equal(seen[name], tensor.to(seen[name].dtype)), name
    noted = json.loads((run / "logs" / stage / "init_from.json").read_text())
    assert noted["source"] == str(fp16_bundle)


@pytest.mark.parametrize("stage", ["unclip", "prior"])
def test_a_decoder_or_prior_started_on_another_clip_says_so_in_one_warning(stage, source, fp16_bundle, tmp_path):
    """unCLIP's decoder and prior read CLIP's embeddings; started from a source whose CLIP is not the run's, they
    start from weights for another embedding space, which nothing said. The fp16 bundle's CLIP is the run's, cast:
    no warning there."""
    import warnings

    run = copy_run(source, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        assert MAIN[stage].main(args(run, f"train.{stage}.steps=1", init_from=fp16_bundle)) == 0
    other = copy_run(source, tmp_path / "other")
    clip = load_file(str(other / "clip.safetensors"))
    clip["logit_scale"] = clip["logit_scale"] + 1.0  # another CLIP, by one number
    from safetensors.torch import save_file

    save_file(clip, str(other / "clip.safetensors"))
    with pytest.warns(UserWarning) as seen:
        assert MAIN[stage].main(args(other, f"train.{stage}.steps=1", init_from=fp16_bundle)) == 0
    said = [str(w.message) for w in seen if "CLIP" in str(w.message)]
    what = "unCLIP decoder" if stage == "unclip" else "prior"
    assert said == [
        f"the run's clip.safetensors is not the CLIP '{fp16_bundle}' was trained with, so its {what} starts reading "
        f"another CLIP's embeddings; copy '{fp16_bundle / 'clip.safetensors'}' into '{other}' to fine-tune it on the "
        "CLIP it knows"
    ]


def test_a_fresh_run_folder_gets_the_sources_tokenizers_and_becomes_a_bundle(source, tmp_path):
    from dalle_mini_impl.pipeline.pipeline import Pipeline

    run = tmp_path / "fresh"
    assert train_tokenizer.main(args(run, init_from=source)) == 0  # copies, trains nothing
    assert (run / "text.model").read_bytes() == (source / "text.model").read_bytes()
    # steps=0 keeps the part as the source has it; the dalle stage copies the image tokenizer the run lacks
    train_dalle.main(args(run, "train.dalle.steps=0", init_from=source))
    assert (run / "vae.safetensors").read_bytes() == (source / "vae.safetensors").read_bytes()
    assert (run / "vae.json").read_text() == (source / "vae.json").read_text()
    ours, theirs = load_file(str(run / "transformer.safetensors")), load_file(str(source / "transformer.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    train_clip.main(args(run, "train.clip.steps=0", init_from=source))
    # the run's config describes the copied parts as the source's does
    cfg, src = json.loads((run / "config.json").read_text()), json.loads((source / "config.json").read_text())
    assert cfg["text"] == src["text"] and cfg["vae"] == src["vae"]
    pipe = Pipeline.from_pretrained(run, device="cpu")
    kept = pipe.generate(["a red circle"], num_images=1, candidates=2, progress=False)[0]
    assert kept[0].rank == 1 and kept[0].image.size == (16, 16)


def test_a_copy_killed_midway_leaves_no_truncated_tokenizer_and_the_rerun_copies_it(source, tmp_path, monkeypatch):
    run = tmp_path / "fresh"
    cfg = load_config("shapes", TINY)
    cfg.out_dir = str(run)
    real = finetune.shutil.copyfile

    def killed_at_the_weights(src, dst):
        if str(src).endswith("vae.safetensors"):
            Path(dst).write_bytes(Path(src).read_bytes()[:100])  # half written, then the process dies
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(finetune.shutil, "copyfile", killed_at_the_weights)
    with pytest.raises(KeyboardInterrupt):
        finetune.adopt_image_tokenizer(source, cfg)
    assert not (run / "vae.safetensors").exists()  # what marks the copy complete is absent: the rerun copies
    monkeypatch.setattr(finetune.shutil, "copyfile", real)
    finetune.adopt_image_tokenizer(source, cfg)
    assert (run / "vae.safetensors").read_bytes() == (source / "vae.safetensors").read_bytes()
    assert (run / "vae.json").read_text() == (source / "vae.json").read_text()


def test_a_run_with_another_text_tokenizer_or_text_length_is_refused(source, tmp_path):
    run = tmp_path / "other"
    run.mkdir()
    (run / "text.model").write_bytes(b"another tokenizer")
    with pytest.raises(UserError) as error:
        train_dalle.main(args(run, "train.dalle.steps=1", init_from=source))
    one_sentence(error, str(run / "text.model"), "is not the text tokenizer of", str(source))
    with pytest.raises(UserError) as error:
        train_clip.main(args(tmp_path / "longer", "text.text_len=24", "train.clip.steps=1", init_from=source))
    one_sentence(error, "config key 'text.text_len' is 24", "--set text.text_len=16")


def test_frozen_groups_are_bit_identical_after_training_and_left_out_of_the_optimizer(source, tmp_path):
    run = copy_run(source, tmp_path / "run")
    frozen = '["embeddings", "blocks.0", "head"]'
    train_dalle.main(
        args(run, "train.dalle.steps=3", "train.dalle.lr=1e-2", f"train.dalle.freeze={frozen}", init_from=source)
    )
    before, after = load_file(str(source / "transformer.safetensors")), load_file(str(run / "transformer.safetensors"))
    held = {k for k in before if finetune.group_of("transformer", k) in ("embeddings", "head")}
    held |= {k for k in before if k.startswith("blocks.0.")}
    assert "text_emb.weight" in held and "head.weight" in held and "blocks.0.attn.qkv.weight" in held
    assert all(torch.equal(after[k], before[k]) for k in held)
    assert all(not torch.equal(after[k], before[k]) for k in before.keys() - held)  # blocks.1, norm: trained
    optimizer = torch.load(run / "checkpoints" / "dalle" / "step_00000003" / "optimizer.bin", weights_only=True)
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == len(before.keys() - held)


@pytest.mark.parametrize(
    "stage, groups",
    [("clip", ["image_tower", "logit_scale"]), ("vae", ["codebook", "decoder"]), ("prior", ["embeddings", "blocks"])],
)
def test_each_models_frozen_groups_stay_as_they_started(stage, groups, source, tmp_path):
    run = copy_run(source, tmp_path / "run")
    frozen = json.dumps(groups)
    MAIN[stage].main(args(run, f"train.{stage}.steps=2", f"train.{stage}.freeze={frozen}", init_from=source))
    before = load_file(str(source / f"{PART[stage]}.safetensors"))
    after = load_file(str(run / f"{PART[stage]}.safetensors"))
    kind = "transformer" if stage == "unclip" else stage
    held = [k for k in before if finetune.group_of(kind, k) in groups]
    assert held and all(torch.equal(after[k], before[k]) for k in held)
    assert any(not torch.equal(after[k], before[k]) for k in before if k not in held)


def test_a_frozen_vq_codebook_is_not_moved_by_its_moving_averages_either():
    torch.manual_seed(0)
    model = vae.build("vq", codebook_size=16, factor=4, hidden=8, res_blocks=0, code_dim=8, lookup_dim=4)
    model.train()
    finetune.freeze(model, "vae", ["codebook"], "vae")
    start = {k: v.clone() for k, v in model.quantizer.state_dict().items() if k != "unused_steps"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss, _ = model(torch.rand(4, 3, 16, 16), step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(model.quantizer.state_dict()[k], v) for k, v in start.items())


def test_a_mismatched_size_names_the_tensor_and_both_shapes(source, tmp_path):
    # the shipped bundle by name: its tokenizers fit the tiny config's text length, its transformer is wider
    with pytest.raises(UserError) as error:
        train_dalle.main(args(tmp_path / "a", "train.dalle.steps=1", init_from="shapes"))
    one_sentence(
        error, "'text_emb.weight' is (491, 192) in", "transformer.safetensors' but (491, 32) in the transformer"
    )
    # deeper than the source: a block the file does not have
    run = copy_run(source, tmp_path / "b")
    with pytest.raises(UserError) as error:
        train_dalle.main(args(run, "transformer.depth=3", "train.dalle.steps=1", init_from=source))
    one_sentence(error, "has no 'blocks.2.", "which the transformer this config builds has")


def test_a_missing_source_or_file_is_one_sentence(source, tmp_path):
    with pytest.raises(UserError) as error:
        train_dalle.main(args(copy_run(source, tmp_path / "a"), init_from=tmp_path / "nowhere"))
    one_sentence(error, "--init-from", "is not a folder", "shapes")
    partial = copy_run(source, tmp_path / "partial")
    (partial / "prior.safetensors").unlink()
    with pytest.raises(UserError) as error:
        train_prior.main(args(copy_run(source, tmp_path / "b"), "train.prior.steps=1", init_from=partial))
    one_sentence(error, "has no prior.safetensors")


def test_a_resumed_run_resumes_and_ignores_init_from(source, tmp_path, first_step_weights, capsys):
    run = copy_run(source, tmp_path / "run")
    train_dalle.main(args(run, "train.dalle.steps=2", "train.dalle.checkpoint_every=2", "train.dalle.lr=1e-2"))
    at_step_2 = load_file(str(run / "transformer.safetensors"))
    first_step_weights.clear()
    capsys.readouterr()
    train_dalle.main(args(run, "train.dalle.steps=3", "train.dalle.lr=1e-2", init_from=source))
    assert "the run resumes its own checkpoint; --init-from" in capsys.readouterr().out
    assert int(first_step_weights["__step__"]) == 2
    assert all(torch.equal(first_step_weights[k], v) for k, v in at_step_2.items())
    theirs = load_file(str(source / "transformer.safetensors"))
    assert not all(torch.equal(at_step_2[k], v) for k, v in theirs.items())
    assert not (run / "logs" / "dalle" / "init_from.json").exists()


def test_a_decoder_started_from_a_source_resumes_in_a_run_without_a_transformer(source, tmp_path, first_step_weights):
    run = copy_run(source, tmp_path / "run")
    (run / "transformer.safetensors").unlink()  # unclip.init_from_transformer has nothing to read: the source starts it
    train_unclip.main(args(run, "train.unclip.steps=2", "train.unclip.checkpoint_every=2", init_from=source))
    at_step_2 = load_file(str(run / "unclip.safetensors"))
    first_step_weights.clear()
    assert train_unclip.main(args(run, "train.unclip.steps=3", init_from=source)) == 0
    assert int(first_step_weights["__step__"]) == 2
    assert all(torch.equal(first_step_weights[k], v) for k, v in at_step_2.items())


@pytest.mark.parametrize("stage", ["vae", "prior"])
def test_gradient_checkpointing_where_a_model_has_none_is_one_sentence(stage, source, tmp_path):
    run = copy_run(source, tmp_path / "run")
    with pytest.raises(UserError) as error:
        MAIN[stage].main(args(run, f"train.{stage}.steps=1", f"train.{stage}.grad_checkpointing=true"))
    one_sentence(error, f"train.{stage}.grad_checkpointing is true", "set it to false")


def test_an_unknown_freeze_group_is_one_sentence_naming_the_valid_ones(source, tmp_path):
    run = copy_run(source, tmp_path / "run")
    with pytest.raises(UserError) as error:
        train_dalle.main(args(run, "train.dalle.steps=1", 'train.dalle.freeze=["embedding"]'))
    one_sentence(
        error,
        "train.dalle.freeze names 'embedding', which is not a parameter group of the transformer",
        "choose from: embeddings, blocks, norm, head, blocks.0, blocks.1",
    )
    with pytest.raises(UserError) as error:  # the decoder's own group, on the plain transformer
        train_dalle.main(args(run, "train.dalle.steps=1", "train.dalle.freeze=condition"))
    one_sentence(error, "'condition'")
    everything = '["image_tower", "text_tower", "projections", "logit_scale"]'
    with pytest.raises(UserError) as error:
        train_clip.main(args(run, "train.clip.steps=1", f"train.clip.freeze={everything}"))
    one_sentence(error, "freezes every parameter of the CLIP")


def test_every_parameter_of_every_model_is_in_one_group(source):
    cfg = load_config("shapes", TINY + UNCLIP)
    text, image = load_text_tokenizer(source, cfg), load_vae(source)
    cfg.vae.kind, cfg.vae.disc_start, cfg.vae.group_sizes, cfg.vae.group_inputs = "vq", 0, [], []  # VQ and critic
    grid = load_config("shapes", TINY + UNCLIP + ["unclip.grid=2", "unclip.grid_tokens=true"])
    models = {
        # the decoder with the grid's 4 cells as positions of their own, 8 numbers each after the 16 of the embedding
        "transformer": [
            build_model(cfg, text, image),
            build_model(cfg, text, image, cond_dim=16),
            build_model(grid, text, image, cond_dim=16 + 4 * 8),
        ],
        "clip": [clip_from_config(cfg, text)],
        "vae": [image, build_tokenizer(cfg)],
        "prior": [build_prior(cfg, text, 16)],
    }
    for kind, built in models.items():
        for model in built:
            groups = {finetune.group_of(kind, name) for name in model.state_dict()}  # none is left out
            assert [g for g in finetune.group_names(model, kind) if not g.startswith("blocks.")] == [
                g for g in finetune.GROUPS[kind] if g in groups
            ]
    assert finetune.group_names(models["transformer"][1], "transformer") == [
        "embeddings", "condition", "blocks", "norm", "head", "blocks.0", "blocks.1"
    ]  # fmt: skip
    assert finetune.group_of("clip", "visual.proj") == "projections"
    assert finetune.group_of("clip", "visual.patch.weight") == "image_tower"
    assert finetune.group_names(models["vae"][0], "vae") == ["encoder", "codebook", "decoder"]
    assert finetune.group_names(models["vae"][1], "vae") == ["encoder", "codebook", "decoder", "discriminator"]


def test_train_all_passes_init_from_to_every_stage_but_encode(source, tmp_path, monkeypatch, capsys):
    from train import all as train_all

    commands = []
    monkeypatch.setattr(train_all, "run_stage", lambda cmd: commands.append(cmd) or 0)
    train_all.main(["--config", "shapes", "--out", str(tmp_path / "all"), "--init-from", str(source)])
    last = json.loads(capsys.readouterr().out.splitlines()[-1])  # the total, beside the machine's speed then
    assert last["bundle"] == str(tmp_path / "all") and last["total_wall_s"] >= 0
    assert set(last["cpu_matmul_gflops"]) == {"start", "end"} and min(last["cpu_matmul_gflops"].values()) > 0
    modules = [cmd[2] for cmd in commands]
    assert modules == [f"train.{s}" for s in ("tokenizer", "vae", "encode", "dalle", "clip", "unclip", "prior")]
    for module, cmd in zip(modules, commands):
        assert (cmd[-2:] == ["--init-from", str(source)]) == (module != "train.encode"), cmd
    commands.clear()
    with pytest.raises(UserError) as error:  # refused once, before any stage runs
        train_all.main(["--config", "shapes", "--out", str(tmp_path / "all"), "--init-from", str(tmp_path / "no")])
    one_sentence(error, "is not a folder")
    assert commands == []
    # a stage stopped by Ctrl-C (exit 130): train.all stops there with its code and a sentence, no error
    monkeypatch.setattr(train_all, "run_stage", lambda cmd: commands.append(cmd) or 130 * (cmd[2] == "train.dalle"))
    assert train_all.main(["--config", "shapes", "--out", str(tmp_path / "stopped")]) == 130
    assert [cmd[2] for cmd in commands][-1] == "train.dalle"
    assert "stage train.dalle stopped (exit code 130); rerun the same command to resume" in capsys.readouterr().err


def test_the_decoder_starts_from_a_sources_transformer_when_it_has_no_decoder(source, tmp_path, first_step_weights):
    plain = copy_run(source, tmp_path / "plain")
    (plain / "unclip.safetensors").unlink()
    run = copy_run(source, tmp_path / "run")
    train_unclip.main(args(run, "train.unclip.steps=1", "unclip.init_from_transformer=false", init_from=plain))
    transformer = load_file(str(plain / "transformer.safetensors"))
    assert all(torch.equal(first_step_weights[k], v) for k, v in transformer.items())
    assert set(first_step_weights) - set(transformer) == {"cond_proj.weight", "cond_pos.weight", "__step__"}


def test_a_vq_without_a_critic_gets_its_decoder_fine_tuned_with_one_and_every_code_stays(tmp_path):
    vq = ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]"]
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    train_vae.main(args_for(first, *vq, "train.vae.steps=2"))
    frozen = '["encoder", "codebook"]'
    with_critic = [*vq, "vae.disc_start=0", f"train.vae.freeze={frozen}", "train.vae.steps=2", "train.vae.lr=1e-2"]
    train_vae.main(args_for(tuned, *with_critic) + ["--init-from", str(first)])  # the critic starts fresh
    before, after = load_file(str(first / "vae.safetensors")), load_file(str(tuned / "vae.safetensors"))
    assert not any(k.startswith("discriminator.") for k in before)
    assert any(k.startswith("discriminator.") for k in after)  # trained, and kept for a later fine-tune
    old, new = load_vae(first), load_vae(tuned)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = old.encode(images)
        assert torch.equal(new.encode(images), ids)  # every image's codes are the first VQ's
        assert not torch.allclose(new.decode(ids), old.decode(ids))  # drawn by a decoder trained further


def test_a_rerun_that_resumes_the_decoder_phase_reads_no_init_from(tmp_path, capsys):
    """Once the rerun said it started from the source (and wrote init_from.json again) while it resumed the
    decoder phase's checkpoint: `train.vae --init-from` looked for a checkpoint of the first phase alone."""
    vq = ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]"]
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    train_vae.main(args_for(first, *vq, "train.vae.steps=2"))
    phase = [*vq, "train.vae.steps=0", "train.vae_decoder.batch_size=8", "train.vae_decoder.eval_batches=1"]
    train_vae.main(args_for(tuned, *phase, "train.vae_decoder.steps=2") + ["--init-from", str(first)])
    noted = tuned / "logs" / "vae" / "init_from.json"
    assert "starts from the weights of" in capsys.readouterr().out and noted.is_file()
    noted.unlink()
    train_vae.main(args_for(tuned, *phase, "train.vae_decoder.steps=3") + ["--init-from", str(first)])
    said = capsys.readouterr()
    assert "vae: the run resumes its own checkpoint; --init-from" in said.out, said
    assert "resumed vae_decoder" in said.err and not noted.exists()


def test_python_m_train_finetune_names_the_commands_that_fine_tune():
    """It printed nothing and exited 0, as if it had done something."""
    import subprocess
    import sys

    from tests.test_train import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "train.finetune"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error: train.finetune is what --init-from runs, not a command of its own")
