"""Training as 2 CPU processes (gloo) through `accelerate launch`: ranks agree, one checkpoint, same result.

A run on 2 processes with batch 4 each sees exactly the global batches of 1 process with batch 8 (the
token stream deals each global batch across ranks), so with a loss that is a plain mean over the batch
both must end with the same weights.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vae
from dalle_mini_impl.config import read_config_json
from dalle_mini_impl.eval.recon import recon_metrics
from tests.test_train import ROOT, args_for, copy_run, encoded_run, tokenizer_run
from train import dalle as train_dalle
from train.common import example_batches
from train.loop import list_checkpoints

pytestmark = pytest.mark.slow
ONE_PROCESS = types.SimpleNamespace(process_index=0, num_processes=1)  # what example_batches reads of an accelerator

# the text loss averages over non-pad targets per process; weight 0 makes the loss a plain batch mean
SAME_MATH = ["transformer.caption_dropout=0", "transformer.text_loss_weight=0"]


def launch_two(module: str, argv: list[str], config_file: str | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m module ARGV` on the CPU, one thread each (or with
    `--config_file config_file` in place of the flags)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *(["--config_file", config_file] if config_file else flags),
        "--dynamo_backend", "no", "-m", module, *argv,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def launch(module: str, argv: list[str], reports: int = 1) -> dict:
    """`launch_two`, which must succeed; its last JSON line (of `reports`, one a stage or phase, all printed by
    the main process alone)."""
    proc = launch_two(module, argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == reports, proc.stdout  # only the main process prints
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return encoded_run(tmp_path_factory.mktemp("dist") / "base")


def test_dalle_two_processes_match_one(base_run, tmp_path, capsys):
    one, two = copy_run(base_run, tmp_path / "one"), copy_run(base_run, tmp_path / "two")
    steps = ["train.dalle.steps=3", "train.dalle.checkpoint_every=3", "train.dalle.log_every=3", *SAME_MATH]
    train_dalle.main(args_for(one, "train.dalle.batch_size=8", *steps))
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = launch("train.dalle", args_for(two, "train.dalle.batch_size=4", *steps))

    assert result["num_processes"] == 2 and result["ranks_in_sync"] == 1
    ckpts = list_checkpoints(two / "checkpoints" / "dalle")
    assert [p.name for p in ckpts] == ["step_00000003"]  # exactly one, written once, no leftovers
    assert sorted(p.name for p in (two / "checkpoints" / "dalle").iterdir()) == ["step_00000003"]
    assert (ckpts[0] / "data_0.json").is_file() and (ckpts[0] / "data_1.json").is_file()

    # the loss of the global batch after 3 steps, and the held-out loss of the final weights
    assert result["loss"] == pytest.approx(single["loss"], abs=1e-4)
    assert result["eval/val_loss"] == pytest.approx(single["eval/val_loss"], abs=1e-4)
    a, b = load_file(str(one / "transformer.safetensors")), load_file(str(two / "transformer.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=f"{k} differs between 1 and 2 processes")


def test_the_two_cpu_process_launch_config_runs_two_processes(base_run, tmp_path):
    """configs/accelerate/cpu_2proc.yaml, as SCALING.md launches it: once MULTI_CPU, which ran one process."""
    run = copy_run(base_run, tmp_path / "run")
    config = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "cpu_2proc.yaml"
    proc = launch_two("train.dalle", args_for(run, "train.dalle.steps=1"), str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["num_processes"] == 2 and result["ranks_in_sync"] == 1


def test_a_checkpoint_of_one_process_resumed_by_two_is_one_sentence_from_each(base_run, tmp_path):
    """Process 0 said it resumed while process 1 stopped (no data_1.json), and process 0's collective then failed
    with a gloo traceback that buried the sentence; now both stop before any collective, with the same sentence."""
    run = copy_run(base_run, tmp_path / "one")
    steps = ["train.dalle.steps=4", "train.dalle.checkpoint_every=2", "train.dalle.batch_size=4"]
    train_dalle.main(args_for(run, *steps[:2], steps[2], "train.dalle.steps=2"))
    proc = launch_two("train.dalle", args_for(run, *steps))
    said = "was written by 1 process and this run has 2, so processes past 1 have no data position; resume with 1"
    assert proc.returncode != 0 and proc.stderr.count(said) == 2, proc.stderr[-3000:]
    assert "resumed dalle" not in proc.stderr and "Connection closed" not in proc.stderr


def test_a_sigterm_to_one_process_stops_both_at_the_same_step_with_one_checkpoint(base_run, tmp_path):
    straight, stopped = copy_run(base_run, tmp_path / "straight"), copy_run(base_run, tmp_path / "stopped")
    steps = ["train.dalle.steps=4", "train.dalle.checkpoint_every=4", "train.dalle.batch_size=4"]
    result = launch("train.dalle", args_for(straight, *steps))
    # the logged parts of the loss are of the global batch, as the loss is (they were process 0's: no sum of them)
    w = 1 / 8  # transformer.text_loss_weight
    assert result["loss"] == pytest.approx(w * result["text_loss"] + (1 - w) * result["image_loss"], abs=1e-5)
    # as a scheduler may: SIGTERM to process 1 alone, during step 2; process 0 learns it through the all-reduce
    proc = launch_two("tests.kill_at", ["step:2:SIGTERM@1", "train.dalle", *args_for(stopped, *steps)])
    assert proc.returncode != 0 and "dalle: stopped by SIGTERM at step 2 of 4, checkpoint " in proc.stderr
    root = stopped / "checkpoints" / "dalle"
    (ckpt,) = list_checkpoints(root)
    assert ckpt.name == "step_00000002" and sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert (ckpt / "data_0.json").is_file() and (ckpt / "data_1.json").is_file()
    launch("train.dalle", args_for(stopped, *steps))
    a, b = load_file(str(straight / "transformer.safetensors")), load_file(str(stopped / "transformer.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed on 2 processes, the weights differ"


def test_the_tokenizer_is_trained_once_by_the_main_process(base_run, tmp_path):
    result = launch("train.tokenizer", args_for(tmp_path / "two"))  # one JSON line: only the main process trains
    assert result["vocab_size"] > 0
    assert (tmp_path / "two" / "text.model").read_bytes() == (base_run / "text.model").read_bytes()
    assert not [p.name for p in (tmp_path / "two").iterdir() if "tmp" in p.name]  # no temporary left


def test_two_processes_encode_the_shards_one_process_encodes(base_run, tmp_path):
    import shutil

    from dalle_mini_impl.data.tokens import read_shards, tokens_dir

    run = copy_run(base_run, tmp_path / "two")
    shutil.rmtree(run / "tokens")
    result = launch("train.encode", args_for(run))  # one JSON line: the main process writes the manifest
    assert [s["split"] for s in result["splits"]] == ["train", "validation"]
    # the counts of both processes' shares (once process 0's alone: 96 of 192), as one process counts them
    one = json.loads((base_run / "tokens" / "manifest.json").read_text())["splits"]
    for mine, theirs in zip(result["splits"], one):
        counts = ("examples", "rows", "skipped")
        assert [mine[k] for k in counts] == [theirs[k] for k in counts], mine
    assert json.loads((run / "tokens" / "manifest.json").read_text())["splits"] == result["splits"]
    for split in ("train", "validation"):  # the same rows, each process having written the shards of its share
        rows = lambda folder: sorted(zip(read_shards(folder)[1], read_shards(folder)[0].flatten(1).tolist()))  # noqa: E731
        assert rows(tokens_dir(run, split)) == rows(tokens_dir(base_run, split)), split


def test_clip_two_processes_stay_in_sync(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "clip")
    result = launch("train.clip", args_for(run, "train.clip.steps=2", "train.clip.checkpoint_every=2"))
    assert result["num_processes"] == 2 and result["ranks_in_sync"] == 1
    assert [p.name for p in list_checkpoints(run / "checkpoints" / "clip")] == ["step_00000002"]
    assert (run / "clip.safetensors").is_file()


@pytest.mark.parametrize("critic", ["vae.disc_start=-1", "vae.disc_start=1"])
def test_the_tokenizers_decoder_phase_trains_on_two_processes(base_run, tmp_path, critic):
    """train.vae's second phase wraps the same model for DDP a second time (and with the critic, whose parameters
    the first steps leave unused); both phases end with the ranks in sync."""
    run = tokenizer_run(base_run, tmp_path / "vae")
    vq = ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]", critic]
    phases = ["train.vae.steps=2", "train.vae_decoder.steps=2", "train.vae_decoder.batch_size=8"]
    result = launch("train.vae", args_for(run, *vq, *phases, "train.vae_decoder.eval_batches=1"), reports=2)
    assert result["stage"] == "vae_decoder" and result["num_processes"] == 2 and result["ranks_in_sync"] == 1
    assert [p.name for p in list_checkpoints(run / "checkpoints" / "vae_decoder")] == ["step_00000002"]
    assert (run / "vae.safetensors").is_file()
    # its evaluation is both processes' shares (one batch of 8 each: the split's first 16 images), not the main's
    # 8 alone, as the exported tokenizer reconstructs them in one process
    cfg = read_config_json(run / "config.json")
    shares = itertools.islice(example_batches(cfg, cfg.data.val_split, 8, train=False, accelerator=ONE_PROCESS), 2)
    whole = recon_metrics(vae.load_pretrained(run), shares)
    assert whole["n"] == 16
    assert result["eval/val_psnr"] == pytest.approx(whole["psnr"], abs=1e-3)
    assert result["eval/val_usage"] == pytest.approx(whole["usage"], abs=1e-5)


def test_one_process_with_a_non_finite_step_stops_every_process_from_taking_it():
    """The flags were reduced by "min", which accelerate does not know and sums: rank 0's finite step outvoted
    rank 1's non-finite one."""
    proc = launch_two("tests.agree_worker", [])
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert said == [{"all_finite": [[True, False, False, False]] * 2}]
