"""The training loop on a two-weight linear model, in process: the order of its steps, the `on_event`
test seam, skipped non-finite steps and exact resume. The stage entry points are tested in test_train."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal

import pytest
import torch

from dalle_mini_impl.config import RunConfig, TrainConfig
from train import loop

pytestmark = pytest.mark.usefixtures("one_thread")


class Numbers:
    """An endless stream of batches of 4 random points on y = 2x - 1, with a position to checkpoint."""

    def __init__(self):
        self.position = 0

    def __iter__(self):
        while True:
            self.position += 1
            g = torch.Generator().manual_seed(self.position)
            x = torch.randn(4, 1, generator=g)
            yield {"x": x, "y": 2 * x - 1}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def train(
    run, steps: int, nan_at: set[int] = frozenset(), critic=None, resume="latest", no_resume=False, clip=None, **kw
) -> tuple[dict[str, float], torch.nn.Module]:
    """`loop.run` for `steps` steps on a fresh linear model; the loss is nan at the steps in `nan_at`.

    critic: a module trained by Adam after every step beside the model, checkpointed as extra state.
    clip: (model) -> the parameters the stage clips (Stage.clip_parameters); None: the model's.
    """
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    calls = itertools.count()
    draws.clear()
    extra, after_step = {}, None
    if critic is not None:
        critic_optimizer = torch.optim.Adam(critic.parameters(), lr=0.1)
        extra = {"critic": critic, "critic_optimizer": critic_optimizer}

        def after_step(m, batch, step, accelerator):
            critic_optimizer.zero_grad()
            torch.nn.functional.mse_loss(critic(batch["x"]), batch["y"] * 3).backward()
            critic_optimizer.step()
            return {}

    def loss(m, batch, step, micro):
        draws.append((step, micro))
        value = torch.nn.functional.mse_loss(m(batch["x"]), batch["y"])
        if next(calls) in nan_at:
            value = value * float("nan")
        return value, {"mse": float(value.detach())}

    stage = loop.Stage(
        name="dalle",
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        batches=Numbers(),
        loss=loss,
        item_name="points",
        after_step=after_step,
        extra_state=extra,
        clip_parameters=None if clip is None else lambda: clip(model),
    )
    tc = TrainConfig(**{"steps": steps, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1} | kw)
    accelerator = loop.make_accelerator(tc)
    args = argparse.Namespace(resume=resume, no_resume=no_resume)
    return loop.run(RunConfig(out_dir=str(run)), tc, stage, accelerator, args), model


draws: list[tuple[int, int]] = []  # (step, micro) of every loss call of the last `train`


@pytest.fixture
def events(monkeypatch):
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(loop, "on_event", lambda event, step: seen.append((event, step)))
    return seen


def test_on_event_sees_every_step_and_every_checkpoint_write(tmp_path, events):
    logged, _ = train(tmp_path, 4)
    assert events == [("step", 1), ("checkpoint", 2), ("step", 2), ("step", 3), ("checkpoint", 4), ("step", 4)]
    assert list(logged)[:4] == ["loss", "mse", "lr", "grad_norm"]
    assert logged["skipped_nonfinite_steps"] == 0 and logged["ranks_in_sync"] == 1.0
    assert [p.name for p in loop.list_checkpoints(tmp_path / "checkpoints" / "dalle")] == [
        "step_00000002",
        "step_00000004",
    ]


def test_a_stage_clips_and_logs_the_gradient_of_the_parameters_it_names(tmp_path):
    """The VQ's critic: its loss leaves gradients in the critic, which the generator's clipping must not count."""
    whole, _ = train(tmp_path / "whole", 1)
    weight_only, _ = train(tmp_path / "weight", 1, clip=lambda m: [m.weight])
    assert 0 < weight_only["grad_norm"] < whole["grad_norm"]  # the bias's gradient left out
    assert weight_only["loss"] == whole["loss"]


def test_on_event_is_unset_by_default():
    assert loop.on_event is None


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, events):
    logged, model = train(tmp_path, 3, nan_at={1})
    assert [e for e in events if e[0] == "step"] == [("step", 1), ("step", 2), ("step", 3)]
    assert logged["skipped_nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_under_fp16_a_skipped_step_backs_off_the_loss_scale_and_training_goes_on(tmp_path, monkeypatch):
    """fp16 on a GPU: accelerate's GradScaler scales the loss and unscales in clip_grad_norm_, which may not run twice
    before the scaler's update. The CPU gets no scaler from accelerate, so a real CPU GradScaler takes its place."""
    from accelerate.state import AcceleratorState

    make, scaler = loop.make_accelerator, torch.amp.GradScaler("cpu", init_scale=256.0)

    def with_scaler(tc, **kw):
        accelerator = make(tc, **kw)
        accelerator.native_amp, accelerator.scaler = True, scaler
        return accelerator

    monkeypatch.setattr(loop, "make_accelerator", with_scaler)
    monkeypatch.setattr(loop, "check_precision", lambda *_: None)  # the refusal of fp16 on a CPU, below
    AcceleratorState._reset_state(True)  # the process's accelerate state is a singleton: fp16 here, then as it was
    try:
        logged, model = train(tmp_path, 3, nan_at={1}, mixed_precision="fp16")
    finally:
        AcceleratorState._reset_state(True)
    assert logged["skipped_nonfinite_steps"] == 1 and scaler.get_scale() == 128.0  # halved once, for the skip
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_on_a_cpu_is_refused_in_one_sentence(tmp_path):
    """It trained in fp32 under the fp16 name: accelerate makes no fp16 autocast or GradScaler on a CPU."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the process's accelerate state is a singleton: fp16 here, then as it was
    try:
        with pytest.raises(loop.UserError, match="^train.dalle.mixed_precision is 'fp16', which accelerate runs on a "):
            loop.make_accelerator(loop.TrainConfig(mixed_precision="fp16"), key="train.dalle.")
    finally:
        AcceleratorState._reset_state(True)
    loop.check_precision(loop.TrainConfig(mixed_precision="fp16"), torch.device("cuda"))  # a GPU's
    loop.check_precision(loop.TrainConfig(mixed_precision="bf16"), torch.device("cpu"))


def test_each_micro_batch_of_a_step_gets_its_own_index(tmp_path):
    """Stages seed their random draws (caption dropout, crops, noise) by step and micro-batch: the micro-batches of
    one accumulated step must not repeat each other's draws."""
    train(tmp_path, 2, grad_accum=3)
    assert draws == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    train(tmp_path / "one", 2)
    assert draws == [(0, 0), (1, 0)]


def test_a_resumed_run_ends_with_the_same_weights(tmp_path):
    _, straight = train(tmp_path / "straight", 4)
    train(tmp_path / "stopped", 2)
    _, resumed = train(tmp_path / "stopped", 4)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def signals_after(step: int, *signums: int):
    """An `on_event` that sends this process `signums`, in order, right after `step` (as if during it)."""

    def on_event(event: str, at: int) -> None:
        if (event, at) == ("step", step):
            for signum in signums:
                os.kill(os.getpid(), signum)

    return on_event


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint_there_and_it_resumes_exactly(
    tmp_path, monkeypatch, capsys, signum
):
    _, straight = train(tmp_path / "straight", 6)
    handler = signal.getsignal(signal.SIGINT)
    # the signal arrives during step 3, between the periodic checkpoints of steps 2 and 4
    monkeypatch.setattr(loop, "on_event", signals_after(3, signum))
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path / "stopped", 6)
    assert stopped.value.code == 128 + signum
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handlers are gone with it
    names = [p.name for p in loop.list_checkpoints(tmp_path / "stopped" / "checkpoints" / "dalle")]
    assert names == ["step_00000002", "step_00000003"]
    name = signal.Signals(signum).name
    assert f"dalle: stopped by {name} at step 3 of 6, checkpoint " in capsys.readouterr().err
    monkeypatch.setattr(loop, "on_event", None)
    _, resumed = train(tmp_path / "stopped", 6)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_a_signal_at_a_checkpoint_step_saves_once_and_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "on_event", signals_after(4, signal.SIGINT))
    with pytest.raises(SystemExit):
        train(tmp_path / "at4", 6)
    assert [p.name for p in loop.list_checkpoints(tmp_path / "at4" / "checkpoints" / "dalle")] == [
        "step_00000002",
        "step_00000004",
    ]
    monkeypatch.setattr(loop, "on_event", signals_after(3, signal.SIGINT, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):  # the second: no checkpoint of step 3
        train(tmp_path / "twice", 6)
    assert [p.name for p in loop.list_checkpoints(tmp_path / "twice" / "checkpoints" / "dalle")] == ["step_00000002"]


def test_a_signal_in_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "on_event", signals_after(4, signal.SIGTERM, signal.SIGTERM))  # the second ignored
    logged, _ = train(tmp_path, 4)  # nothing left to save for: the run ends as usual
    assert logged["num_processes"] == 1.0


def test_a_run_started_over_sets_the_earlier_runs_later_checkpoints_aside(tmp_path):
    root = tmp_path / "checkpoints" / "dalle"
    names = lambda folder: [p.name for p in loop.list_checkpoints(folder)]  # noqa: E731
    train(tmp_path, 6)
    assert names(root) == ["step_00000004", "step_00000006"]
    # --no-resume: the new run's step 2 is kept (pruning would have kept the old 4 and 6 instead) and the old
    # checkpoints are moved, not deleted; a restart would resume this run, not the old one
    _, fresh = train(tmp_path, 2, no_resume=True)
    assert names(root) == ["step_00000002"]
    (aside,) = tmp_path.joinpath("checkpoints").glob("dalle.set-aside-*")
    assert names(aside) == ["step_00000004", "step_00000006"]
    _, straight = train(tmp_path / "straight", 2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), straight.parameters()))
    # --resume of an older checkpoint: the later ones move aside too
    train(tmp_path / "straight", 6)
    train(tmp_path / "straight", 6, resume=str(tmp_path / "straight" / "checkpoints" / "dalle" / "step_00000004"))
    assert names(tmp_path / "straight" / "checkpoints" / "dalle") == ["step_00000004", "step_00000006"]
    (aside,) = tmp_path.joinpath("straight", "checkpoints").glob("dalle.set-aside-*")
    assert names(aside) == ["step_00000006"]


def test_a_folder_without_its_trainer_state_is_not_a_checkpoint(tmp_path):
    train(tmp_path, 4)
    root = tmp_path / "checkpoints" / "dalle"
    (root / "step_00000004" / "trainer_state.json").unlink()  # as if killed while the folder was being replaced
    assert [p.name for p in loop.list_checkpoints(root)] == ["step_00000002"]


@pytest.mark.parametrize(
    "damage",
    ["model.safetensors cut", "optimizer.bin cut", "trainer_state.json empty", "data_0.json empty", "no model"],
)
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before_it(tmp_path, damage, capsys):
    """A checkpoint cut short by a power loss or a full disk was resumed, to a SafetensorError, a zip-reader
    RuntimeError or a JSONDecodeError traceback, on every rerun, while a good one lay beside it."""
    _, straight = train(tmp_path / "straight", 6)
    train(tmp_path / "run", 4)
    newest = tmp_path / "run" / "checkpoints" / "dalle" / "step_00000004"
    name, how = damage.split(" ", 1)
    if how == "cut":
        (newest / name).write_bytes((newest / name).read_bytes()[:100])
    elif how == "empty":
        (newest / name).write_text("")
    else:
        (newest / "model.safetensors").unlink()
    capsys.readouterr()
    _, resumed = train(tmp_path / "run", 6)
    err = capsys.readouterr().err
    assert f"checkpoint '{newest}' is damaged (" in err and "resuming from the one before it" in err
    assert "resumed dalle from" in err and "step_00000002 at step 2" in err
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    (aside,) = (tmp_path / "run" / "checkpoints").glob("dalle.set-aside-*")  # kept, never deleted
    assert [p.name for p in aside.iterdir()] == ["step_00000004"]
    with pytest.raises(loop.UserError, match="is damaged .*; pass an older one, or start over with --no-resume"):
        train(tmp_path / "run", 8, resume=str(aside / "step_00000004"))


def test_a_damaged_checkpoint_is_said_once_when_a_stage_first_asks_whether_it_resumes(tmp_path, capsys):
    """train.unclip asks whether its run resumes (to read --init-from or not) before the loop resumes: the damaged
    checkpoint's line was printed twice."""
    import argparse

    from dalle_mini_impl.config import RunConfig
    from train import finetune

    train(tmp_path / "run", 4)
    newest = tmp_path / "run" / "checkpoints" / "dalle" / "step_00000004"
    (newest / "trainer_state.json").write_text("")
    cfg, args = RunConfig(), argparse.Namespace(resume="latest", no_resume=False)
    cfg.out_dir = str(tmp_path / "run")
    capsys.readouterr()
    assert finetune.resuming(cfg, args, "dalle")
    assert loop.checkpoint_to_resume(tmp_path / "run" / "checkpoints" / "dalle", args).name == "step_00000002"
    assert capsys.readouterr().err.count("is damaged") == 1


def test_a_run_that_trains_other_than_its_settings_read_says_so(tmp_path, capsys):
    """A rerun with fewer steps than its checkpoint's exported the checkpoint's later weights in silence; a run
    shrunk below the preset's warmup never reached its learning rate, in silence."""
    train(tmp_path / "run", 4)
    capsys.readouterr()
    _, model = train(tmp_path / "run", 2)
    err = capsys.readouterr().err
    assert "dalle: the checkpoint resumed is at step 4, past train.dalle.steps=2: nothing trains, and the run " in err
    assert "exports the weights of step 4; to end at step 2, start over with --no-resume" in err
    train(tmp_path / "short", 3, warmup_steps=10)
    err = capsys.readouterr().err
    assert "dalle: train.dalle.warmup_steps=10 is above train.dalle.steps=3, so the whole run is warmup" in err
    assert "learning rate ends at 0.3 x train.dalle.lr; lower warmup_steps to reach lr" in err
    train(tmp_path / "fine", 3, warmup_steps=3)  # its last step reaches lr: (step + 1) / warmup_steps = 1
    assert "warmup" not in capsys.readouterr().err


def test_a_sharded_checkpoint_layout_is_not_taken_for_a_damaged_one(tmp_path):
    """DeepSpeed keeps the weights and the optimizer in a `pytorch_model/` folder, FSDP in `pytorch_model_fsdp_0/`
    and `optimizer_0/`: no top-level optimizer file is missing there."""
    for folders in (["pytorch_model"], ["pytorch_model_fsdp_0", "optimizer_0"]):
        ckpt = tmp_path / folders[-1] / "step_00000002"
        for folder in folders:
            (ckpt / folder).mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2}))
        (ckpt / "data_0.json").write_text("{}")
        assert loop.checkpoint_damage(ckpt) is None
        (ckpt / "data_0.json").write_text("")
        assert loop.checkpoint_damage(ckpt) == "data_0.json is unreadable (JSONDecodeError)"


def test_resuming_another_stages_checkpoint_is_said_as_such(tmp_path):
    """`train.dalle --resume RUN/checkpoints/clip/step_N` said the checkpoint had other parameters frozen."""
    import shutil

    train(tmp_path, 2)
    other = tmp_path / "checkpoints" / "clip" / "step_00000002"
    shutil.copytree(tmp_path / "checkpoints" / "dalle" / "step_00000002", other)
    with pytest.raises(loop.UserError, match=f"^checkpoint '{other}' is the clip stage's; pass one under "):
        train(tmp_path, 4, resume=str(other))


def test_a_checkpoint_without_this_processs_data_position_is_one_sentence(tmp_path):
    train(tmp_path, 2)
    (tmp_path / "checkpoints" / "dalle" / "step_00000002" / "data_0.json").unlink()  # written by other processes
    with pytest.raises(loop.UserError, match="has no data position for process 0 \\(data_0.json\\), so it was"):
        train(tmp_path, 4)


def test_a_checkpoint_of_more_processes_resumes_with_one_sentence_saying_it_is_another_run(tmp_path, capsys):
    """A 2-process checkpoint resumed by one process (its data_0.json there) went on in silence, at half the global
    batch; now it says so. (More processes than wrote it: tests/test_distributed.py.)"""
    train(tmp_path, 2)
    state_file = tmp_path / "checkpoints" / "dalle" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))  # as two processes write it
    capsys.readouterr()
    train(tmp_path, 4)
    said = [line for line in capsys.readouterr().err.splitlines() if "processes and this run has" in line]
    assert said == [
        f"dalle: checkpoint '{state_file.parent}' was written by 2 processes and this run has 1, so the global batch "
        "is 1/2 of what it was and the data position approximate: it goes on as another run than the one that never "
        "stopped; launch 2 processes to continue that one"
    ]


def test_extra_state_resumes_with_its_optimizer(tmp_path):
    critics = [torch.nn.Linear(1, 1) for _ in range(3)]
    for c in critics:
        c.load_state_dict(critics[0].state_dict())
    train(tmp_path / "straight", 4, critic=critics[0])
    train(tmp_path / "stopped", 2, critic=critics[1])
    assert {p.name for p in (tmp_path / "stopped" / "checkpoints" / "dalle" / "step_00000002").iterdir()} >= {
        "critic.safetensors",
        "critic_optimizer.pt",
    }
    train(tmp_path / "stopped", 4, critic=critics[2])  # a fresh critic and Adam: both must come back
    for a, b in zip(critics[0].parameters(), critics[2].parameters()):
        assert torch.equal(a, b)


def test_gradient_accumulation_below_one_is_one_sentence():
    with pytest.raises(loop.UserError, match="grad_accum is 0; set it to 1 \\(no accumulation\\) or more"):
        loop.make_accelerator(TrainConfig(grad_accum=0))


@pytest.mark.parametrize(
    "values, says",
    [
        ({"batch_size": 0}, "train.dalle.batch_size is 0; use at least 1"),  # once a hang: no row ever came
        ({"steps": -1}, "train.dalle.steps is -1; use 0"),  # once exported untrained weights with exit 0
        ({"lr": float("nan")}, "train.dalle.lr is nan; use a positive learning rate"),
        ({"lr": 0.0}, "train.dalle.lr is 0.0; use a positive learning rate"),
        ({"betas": [0.9]}, "train.dalle.betas is [0.9]; give AdamW's two"),
        ({"betas": [1.5, 0.9]}, "train.dalle.betas is [1.5, 0.9]"),
        ({"weight_decay": -1.0}, "train.dalle.weight_decay is -1.0"),
        ({"ema_decay": 1.5}, "train.dalle.ema_decay is 1.5; use 0 (no EMA weights) or a decay in (0, 1)"),
        ({"warmup_steps": -5}, "train.dalle.warmup_steps is -5"),
        ({"keep_checkpoints": -1}, "train.dalle.keep_checkpoints is -1; keep 0 (every checkpoint) or more"),
    ],
)
def test_optimisation_settings_no_run_can_use_are_one_sentence_naming_the_key(values, says):
    with pytest.raises(loop.UserError) as info:
        loop.make_accelerator(TrainConfig(**values), key="train.dalle.")
    assert str(info.value).startswith(says)


def test_data_loader_workers_are_refused_in_one_sentence():
    with pytest.raises(loop.UserError, match="num_workers is 2; the data streams are read in the training process"):
        loop.make_accelerator(TrainConfig(num_workers=2))


def test_accumulation_under_deepspeed_is_refused_in_one_sentence():
    """Under DeepSpeed every backward is its engine's optimizer step: the loop's micro-batches would each step."""
    loop.check_deepspeed_accumulation(4, None)  # another engine: the loop accumulates
    loop.check_deepspeed_accumulation(1, 1)
    loop.check_deepspeed_accumulation(1, "auto")
    with pytest.raises(loop.UserError, match="grad_accum is 4, and under DeepSpeed every backward is an optimizer st"):
        loop.check_deepspeed_accumulation(4, 1)
    with pytest.raises(loop.UserError, match="DeepSpeed config's gradient_accumulation_steps is 8, which this loop"):
        loop.check_deepspeed_accumulation(1, 8)


@pytest.mark.parametrize("name", ["log_every", "eval_every", "image_every", "checkpoint_every"])
def test_a_period_below_one_step_is_one_sentence(name):
    # once a ZeroDivisionError traceback at the first step (`--set train.clip.eval_every=0`)
    with pytest.raises(loop.UserError, match=f"^train.clip.{name} is 0; set it to 1 or more"):
        loop.make_accelerator(TrainConfig(**{name: 0}), key="train.clip.")


def test_an_evaluation_over_no_batch_is_one_sentence():
    # once a StopIteration traceback (train.vae, train.clip, train.unclip) or a made-up val_loss of 0.0 (train.dalle)
    with pytest.raises(loop.UserError, match="^train.dalle.eval_batches is 0; evaluate on 1 batch or more"):
        loop.make_accelerator(TrainConfig(eval_batches=0), key="train.dalle.")


def test_the_math_attention_kernel_records_matmul_and_softmax_for_the_backward():
    q = torch.rand(2, 4, 65, 32, requires_grad=True)
    kernels = {}
    for name in loop.ATTENTION_KERNELS:
        with loop.attention_kernel(name):
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        kernels[name] = type(out.grad_fn).__name__
        out.sum().backward()
    assert "Attention" in kernels["auto"] and "Attention" not in kernels["math"]  # no fused kernel, its backward
    with loop.attention_kernel("math"):
        math = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(math, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    with pytest.raises(loop.UserError, match="attention is 'flash'; use auto or math"):
        loop.make_accelerator(TrainConfig(attention="flash"))


def test_a_second_trainer_of_a_stage_in_one_folder_is_one_sentence_and_a_killed_ones_lock_is_gone(tmp_path):
    """Once a rerun trained beside a first trainer that outlived its terminal, both writing the same checkpoints
    (a traceback: "Directory not empty")."""
    import subprocess
    import sys

    lock = tmp_path / ".dalle.lock"
    holder = (  # a first trainer: holds the stage's lock as one_trainer does, then sleeps
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        says = f"train.dalle is already running in '.*' \\(process {other.pid}\\); stop it"
        with pytest.raises(loop.UserError, match=says):
            train(tmp_path, 2)
        # the lock met inside a launch of several processes: they all took themselves for the main one (the
        # cpu_2proc launch without ACCELERATE_USE_CPU=true), once blamed on "already training"
        with pytest.MonkeyPatch.context() as env:
            env.setenv("WORLD_SIZE", "2")
            with pytest.raises(loop.UserError, match="launched as 2 processes, but each takes itself for the only"):
                train(tmp_path, 2)
            with pytest.raises(loop.UserError, match="already running"):  # two processes that know it: a real run
                with loop.one_trainer(tmp_path, "dalle", True, processes=2):
                    pass
    finally:
        other.kill()
        other.wait()
    logged, _ = train(tmp_path, 2)  # killed: its lock went with it
    assert logged["loss"] >= 0 and lock.read_text() == str(os.getpid())  # the last trainer's id, for the sentence
    train(tmp_path, 3)  # a finished trainer holds nothing: the same process trains the stage again


def test_a_stop_signal_after_the_terminal_closed_still_stops_cleanly(tmp_path):
    """A closed terminal's hangup reaches a stage as SIGTERM (train.all), while its stderr is still that terminal:
    once the handler's note raised EIO there, and the stage died without its checkpoint. What the stop writes
    after (the bar, the last lines) now goes nowhere instead of failing."""
    import pty
    import subprocess
    import sys
    import time

    ready, result = tmp_path / "ready", tmp_path / "result"
    child = (
        "import sys, time\n"
        "from train.loop import StopRequest\n"
        "stop = StopRequest().__enter__()\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "try:\n"
        "    while not stop.signum: time.sleep(0.02)\n"
        "    print('the bar', file=sys.stderr, flush=True); print('the last line', flush=True)\n"
        f"    open({str(result)!r}, 'w').write(f'stopped {{stop.signum}}')\n"
        "except BaseException as e:\n"
        f"    open({str(result)!r}, 'w').write(repr(e))\n"
    )
    terminal, side = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=side, stderr=side, start_new_session=True, env=env)
    os.close(side)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.close(terminal)  # the terminal window closes
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert result.read_text() == f"stopped {int(signal.SIGTERM)}"


def test_the_logs_hold_one_value_a_step_after_a_resume_and_only_this_runs_after_no_resume(tmp_path):
    """Once a stage killed between checkpoints logged the steps after its last one twice in TensorBoard (again when
    resumed), and a `--no-resume` run showed the earlier run's later steps as its own."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def logged_steps():
        events = EventAccumulator(str(tmp_path / "logs" / "dalle"))
        events.Reload()
        return [e.step for e in events.Scalars("dalle/loss")]

    train(tmp_path, 4)
    shutil.rmtree(tmp_path / "checkpoints" / "dalle" / "step_00000004")  # killed before its last checkpoint
    train(tmp_path, 4)  # resumes at step 2: logs steps 3 and 4 again
    assert logged_steps() == [1, 2, 3, 4]
    train(tmp_path, 3, no_resume=True)
    assert logged_steps() == [1, 2, 3]


def test_weights_that_are_not_finite_or_give_a_nan_evaluation_are_not_exported(tmp_path):
    from types import SimpleNamespace

    model = torch.nn.Linear(1, 1)
    t = SimpleNamespace(
        unwrapped=model, accelerator=loop.make_accelerator(TrainConfig()), step=3, ckpt_root=tmp_path / "ckpt",
        stage=SimpleNamespace(name="dalle", key="train.dalle."),
    )  # fmt: skip
    loop.check_not_diverged(t, {"loss": 1.0, "eval/val_loss": 2.0, "eval/val_psnr": float("inf")})  # a perfect PSNR
    with pytest.raises(loop.UserError, match=r"dalle trained to step 3, but its weights give a NaN eval/val_loss"):
        loop.check_not_diverged(t, {"eval/val_loss": float("nan")})
    with torch.no_grad():
        model.bias.fill_(float("inf"))
    with pytest.raises(loop.UserError, match=r"its weights hold values that are not finite \(bias\): the run diver"):
        loop.check_not_diverged(t, {})


def test_a_training_bar_in_a_log_draws_a_frame_every_30_seconds_and_tqdm_disable_turns_it_off():
    """Every training bar passed `disable=` itself, which overrides tqdm's TQDM_DISABLE, and drew a frame a step
    into a log file."""
    import subprocess
    import sys

    code = (
        "from train.common import progress_bar\nb = progress_bar(True, total=3)\n"
        "print(b.disable, b.__dict__.get('mininterval'))"
    )
    for env, said in (({}, "False 30.0"), ({"TQDM_DISABLE": "1"}, "True")):  # stdout and stderr are pipes here
        unset = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the caller's own setting too
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**unset, **env})
        assert run.stdout.startswith(said), run.stderr[-2000:]
    from train.common import progress_bar

    assert progress_bar(False, total=3).disable  # another process than the main one draws none


def test_tf32_is_set_both_ways_on_cuda_and_left_alone_elsewhere():
    """`train.<stage>.tf32` sets PyTorch's CUDA flags (plain flags: a CPU build holds them too), never the CPU's."""
    matmul = torch.backends.cuda.matmul
    newer = hasattr(matmul, "fp32_precision")
    read = (lambda: matmul.fp32_precision) if newer else (lambda: matmul.allow_tf32)
    conv_before = torch.backends.cudnn.conv.fp32_precision if newer else torch.backends.cudnn.allow_tf32
    before, cpu_before = read(), torch.get_float32_matmul_precision()
    try:
        loop.set_tf32(torch.device("cuda", 0), True)
        assert read() == ("tf32" if newer else True)
        loop.set_tf32(torch.device("cpu"), False)  # not a CUDA device: nothing moves
        assert read() == ("tf32" if newer else True)
        if newer:
            assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        loop.set_tf32(torch.device("cuda"), False)
        assert read() == ("ieee" if newer else False)
        if newer:
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == cpu_before
    finally:
        if newer:
            matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before, conv_before
        else:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before, conv_before


def test_every_stages_accelerator_sets_tf32_as_its_setting_says(monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "set_tf32", lambda device, enabled: calls.append((device.type, enabled)))
    accelerator = loop.make_accelerator(loop.TrainConfig(tf32=False))
    assert calls == [(accelerator.device.type, False)]
