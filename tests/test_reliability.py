"""Training survives SIGKILL at any moment and non-finite steps (issue: reliability).

A run of `train.dalle` is killed between steps and again in the middle of writing a checkpoint, then
restarted with the same command; its final weights must equal those of an uninterrupted run, and the
half-written checkpoint must never be picked up. Every run here is a subprocess with one thread, so
the three runs compute exactly the same floating-point operations.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dalle_mini_impl.eval.runs import compare_runs
from tests.test_train import ROOT, VQ, args_for, copy_run, encoded_run, tokenizer_run
from train.loop import list_checkpoints

pytestmark = pytest.mark.slow

DALLE = ["train.dalle.steps=6", "train.dalle.checkpoint_every=2", "train.dalle.keep_checkpoints=5"]


def run_stage(stage: str, run, *settings: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`python -m train.STAGE` on `run` with the tiny settings and `settings`; with `kill_at` ("step:N" or
    "checkpoint:N") through `tests.kill_at`, which SIGKILLs the process at that point."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # tests.kill_at from any folder
    entry = ["-m", "tests.kill_at", kill_at, f"train.{stage}"] if kill_at else ["-m", f"train.{stage}"]
    cmd = [sys.executable, *entry, *args_for(run, *settings)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def run_dalle(run, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return run_stage("dalle", run, *DALLE, *extra, kill_at=kill_at)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return encoded_run(tmp_path_factory.mktemp("rel") / "base")


def test_killed_runs_resume_to_the_same_weights(base_run, tmp_path):
    straight = copy_run(base_run, tmp_path / "straight")
    assert run_dalle(straight).returncode == 0
    reference = load_file(str(straight / "transformer.safetensors"))

    # killed right after step 3 (between checkpoints 2 and 4), then restarted with the same command
    between = copy_run(base_run, tmp_path / "between")
    killed = run_dalle(between, kill_at="step:3")
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(between / "checkpoints" / "dalle")] == ["step_00000002"]
    resumed = run_dalle(between)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed dalle from" in resumed.stderr and "at step 2" in resumed.stderr

    # killed while writing checkpoint 4: the half-written folder exists but is never listed or loaded
    midwrite = copy_run(base_run, tmp_path / "midwrite")
    killed = run_dalle(midwrite, kill_at="checkpoint:4")
    assert killed.returncode == -signal.SIGKILL
    root = midwrite / "checkpoints" / "dalle"
    assert (root / "tmp-step_00000004").is_dir()
    assert not (root / "tmp-step_00000004" / "trainer_state.json").exists()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    resumed = run_dalle(midwrite)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 2" in resumed.stderr
    assert not (root / "tmp-step_00000004").exists()  # rewritten whole, then renamed into place

    # Ctrl-C during step 3: the run saves a checkpoint of step 3, says so in one sentence and exits 130
    interrupted = copy_run(base_run, tmp_path / "interrupted")
    stopped = run_dalle(interrupted, kill_at="step:3:SIGINT")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert "SIGINT: stopping after this step with a checkpoint (Ctrl-C again: stop now, without one)" in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith("dalle: stopped by SIGINT at step 3 of 6, checkpoint ")
    root = interrupted / "checkpoints" / "dalle"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    resumed = run_dalle(interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 3" in resumed.stderr

    for run in (between, midwrite, interrupted):
        weights = load_file(str(run / "transformer.safetensors"))
        assert weights.keys() == reference.keys()
        for k in reference:
            assert torch.equal(weights[k], reference[k]), f"{run.name}: {k} differs from the uninterrupted run"
        # and so is everything else both runs wrote: the checkpoints both kept, every logged number (step 3 was
        # logged twice by `between` and `interrupted`: before the kill and after the resume)
        same = compare_runs(straight, run)
        assert same["same"] and same["logs"]["dalle"]["dalle/loss"]["equal"] == 6, (run.name, same["first_difference"])


def test_non_finite_steps_are_skipped_then_stop_the_run(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "nan")
    # an absurd learning rate blows the weights up after the first step: every later step is non-finite
    proc = run_dalle(
        run,
        "train.dalle.lr=1e30",
        "train.dalle.warmup_steps=0",
        "train.dalle.checkpoint_every=1",
        "train.dalle.max_bad_steps=3",
    )
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: dalle training stopped at step ")
    assert "3 steps in a row had a non-finite loss or gradient" in message
    assert "Traceback" not in proc.stderr
    # the first step's grid could not be drawn from the blown-up weights: said, and training went on to the stop
    # (once the sampler's sentence stopped the run there, before the bar's last frame)
    assert "dalle: no sample grid at step 1: the model's logits are not finite" in proc.stderr
    good = list_checkpoints(run / "checkpoints" / "dalle")
    assert good, "the last good checkpoint must be kept"
    state = json.loads((good[-1] / "trainer_state.json").read_text())
    assert state["step"] >= 1
    assert all(torch.isfinite(v).all() for v in load_file(str(good[-1] / "model.safetensors")).values())
    # rerun as told: it resumes the last checkpoint, whose weights diverged already (finite, but every step after
    # them is not): once the same sentence again, which no lower learning rate got out of
    again = run_dalle(run, "train.dalle.lr=1e-4", "train.dalle.checkpoint_every=1", "train.dalle.max_bad_steps=3")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    said = again.stderr.strip().splitlines()[-1]
    assert f"the checkpoint it resumed (step {state['step']}) may hold weights that diverged already" in said
    assert "--no-resume" in said


def test_a_tokenizer_killed_in_its_decoder_phase_resumes_there_to_the_same_weights(base_run, tmp_path):
    """train.vae's two phases (train.vae_decoder): RUN/vae.safetensors is written only at the end of the second, so
    a kill between them leaves the stage undone for train.all, and the rerun resumes the second phase."""
    phases = [
        *VQ,
        *("train.vae.steps=2", "train.vae.checkpoint_every=2"),
        *("train.vae_decoder.steps=4", "train.vae_decoder.checkpoint_every=2", "train.vae_decoder.batch_size=8"),
        "train.vae_decoder.log_every=1",
    ]
    runs = {name: tokenizer_run(base_run, tmp_path / name) for name in ("straight", "killed")}
    assert run_stage("vae", runs["straight"], *phases).returncode == 0
    killed = run_stage("vae", runs["killed"], *phases, kill_at="step:3")  # the decoder phase's step 3 of 4
    assert killed.returncode == -signal.SIGKILL
    assert not (runs["killed"] / "vae.safetensors").exists()
    assert [p.name for p in list_checkpoints(runs["killed"] / "checkpoints" / "vae_decoder")] == ["step_00000002"]
    resumed = run_stage("vae", runs["killed"], *phases)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed vae from" in resumed.stderr and "resumed vae_decoder from" in resumed.stderr
    assert "at step 2" in resumed.stderr
    reference, weights = (load_file(str(runs[n] / "vae.safetensors")) for n in ("straight", "killed"))
    assert weights.keys() == reference.keys()
    for k in reference:
        assert torch.equal(weights[k], reference[k]), f"{k} differs from the uninterrupted run"
    # the logged numbers too, the codebook usage over its window of recent batches among them
    same = compare_runs(runs["straight"], runs["killed"])
    assert same["same"] and same["logs"]["vae_decoder"]["vae_decoder/usage"]["equal"] == 4, same["first_difference"]


def test_a_vq_with_its_critic_killed_and_resumed_is_the_uninterrupted_run(base_run, tmp_path):
    """Once: the generator's loss left gradients in the patch critic and the critic's step left its own there, so
    the next step clipped (and logged) a norm over both; a resumed run starts without them and clipped another."""
    critic = [*VQ, "vae.disc_start=0", "train.vae.steps=6", "train.vae.checkpoint_every=2", "train.vae.log_every=1"]
    runs = {name: tokenizer_run(base_run, tmp_path / name) for name in ("straight", "killed")}
    assert run_stage("vae", runs["straight"], *critic).returncode == 0
    assert run_stage("vae", runs["killed"], *critic, kill_at="step:3").returncode == -signal.SIGKILL
    resumed = run_stage("vae", runs["killed"], *critic)
    assert resumed.returncode == 0 and "resumed vae from" in resumed.stderr, resumed.stderr[-2000:]
    same = compare_runs(runs["straight"], runs["killed"])
    assert same["same"] and same["logs"]["vae"]["vae/grad_norm"]["equal"] == 6, same["first_difference"]
    assert same["files"]["vae.safetensors"]["equal"] == same["files"]["vae.safetensors"]["tensors"]


def test_a_retrain_stopped_before_its_end_leaves_config_json_describing_the_files(base_run, tmp_path):
    """Once a stage wrote its settings into config.json when it started: a retrain with another CLIP size, stopped
    with a checkpoint, left a run folder whose config no longer fit its clip.safetensors (nothing could load it)."""
    from dalle_mini_impl.config import read_config_json

    run = copy_run(base_run, tmp_path / "run")
    assert run_stage("clip", run, "train.clip.steps=2").returncode == 0
    before = read_config_json(run / "config.json").clip
    shutil.rmtree(run / "checkpoints" / "clip")  # a new CLIP from nothing (as --no-resume sets the old aside)
    stopped = run_stage("clip", run, "train.clip.steps=6", "clip.embed_dim=8", kill_at="step:3:SIGINT")
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-2000:]
    assert read_config_json(run / "config.json").clip == before  # the files in the folder: the first CLIP's
    assert read_config_json(run / "logs" / "clip" / "config.json").clip.embed_dim == 8  # the stopped run's own
    resumed = run_stage("clip", run, "train.clip.steps=6", "clip.embed_dim=8")
    assert resumed.returncode == 0 and read_config_json(run / "config.json").clip.embed_dim == 8


def test_a_stage_train_all_starts_takes_ctrl_c_though_train_all_was_started_ignoring_it(tmp_path):
    """A script's background job starts with SIGINT ignored, and the stage inherited that: `kill -INT` stopped
    train.all's encode stage not at all (it ran to its end and train.all reported success). Its handlers are
    installed before the stage starts, so the stage has SIGINT's default (Python's KeyboardInterrupt)."""
    from train.all import run_stage

    seen = tmp_path / "handler"
    child = f"import signal; open({str(seen)!r}, 'w').write(repr(signal.getsignal(signal.SIGINT)))"
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert run_stage([sys.executable, "-c", child]) == 0
    finally:
        signal.signal(signal.SIGINT, before)
    assert "default_int_handler" in seen.read_text(), seen.read_text()


def test_train_all_passes_each_signal_to_the_stage_running_once(tmp_path):
    """The stage runs in its own session (a terminal's Ctrl-C reaches train.all alone), and each SIGINT or SIGTERM
    train.all receives is passed on once: the first stops a training stage with a checkpoint, a second Ctrl-C
    at once (two copies of one Ctrl-C would be that second). A hangup (a closed terminal) goes on as SIGTERM: once
    it killed train.all alone, and the stage trained on beside the rerun's."""
    import threading
    import time

    from train.all import run_stage
    from train.loop import STOPPED_EXIT_CODES

    ready, log = tmp_path / "ready", tmp_path / "signals"
    child = (
        "import os, signal, sys, time\n"
        "seen = []\n"
        "def note(signum, frame):\n"
        f"    seen.append(signum); open({str(log)!r}, 'a').write(f'{{signum}} {{os.getsid(0)}}\\n')\n"
        "    if len(seen) == 3: sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGINT, note); signal.signal(signal.SIGTERM, note)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "while True: time.sleep(0.05)\n"
    )

    def signal_when_ready():
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            os.kill(os.getpid(), signum)
            time.sleep(0.5)

    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal (nohup would ignore it, and so would this)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    sender = threading.Thread(target=signal_when_ready)
    sender.start()
    try:
        code = run_stage([sys.executable, "-c", child])
    finally:
        sender.join()
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, hangup)
    assert code == 128 + signal.SIGINT and code in STOPPED_EXIT_CODES
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [int(signum) for signum, _ in lines] == [signal.SIGTERM, signal.SIGTERM, signal.SIGINT]  # once, in order
    assert all(int(sid) != os.getsid(0) for _, sid in lines)  # its own session
    assert after == handlers


def test_weights_that_diverged_in_their_last_step_are_not_exported(base_run, tmp_path):
    """One step at an absurd learning rate leaves finite weights (its loss and gradient were finite) whose forward
    pass overflows: the final evaluation's loss is NaN. Once they were exported and the run exited 0 (train.all
    went on), and every code sampled from the bundle was the vocabulary's last."""
    run = copy_run(base_run, tmp_path / "diverged")
    proc = run_dalle(run, "train.dalle.lr=1e6", "train.dalle.warmup_steps=0", "train.dalle.steps=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    said = proc.stderr.strip().splitlines()[-1]
    assert said.startswith("error: dalle trained to step 1, but its weights give a NaN eval/val_loss on the valid")
    assert "lower train.dalle.lr and rerun with --no-resume" in said
    assert not (run / "transformer.safetensors").exists()
    # the same command again resumes the last checkpoint, at the last step: nothing trains, and once nothing was
    # evaluated either, so the weights refused a moment ago were exported
    again = run_dalle(run, "train.dalle.lr=1e6", "train.dalle.warmup_steps=0", "train.dalle.steps=1")
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == said
    assert not (run / "transformer.safetensors").exists()
