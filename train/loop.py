"""The one training loop every stage runs on: accelerate, checkpoints, resume, TensorBoard, progress bar.

A stage (`train.vae`, `train.dalle`, `train.clip`) builds a `Stage`: its model, its optimizer, an endless
per-process stream of batches, and a few hooks (loss, evaluation, image grids, export). `run(stage, ...)`
does the rest, the same way for every stage:

- accelerate for devices, DDP/FSDP/DeepSpeed, mixed precision and gradient accumulation. The data is
  split across processes by the data stream itself (`dalle_mini_impl.data.streams`), never also by accelerate:
  batches are not passed through `accelerator.prepare`.
- warmup + cosine learning rate, gradient clipping, optional EMA weights.
- a step whose loss or gradient is not finite is skipped and counted; `max_bad_steps` in a row stop
  the run with a message, leaving the last good checkpoint intact.
- checkpoints every `checkpoint_every` steps: accelerate's `save_state` (model, optimizer,
  RNG) plus the data position, EMA weights and counters, written to a temporary folder and renamed
  into place, so a run killed at any moment resumes from the last complete one. The last
  `keep_checkpoints` are kept. A restarted command resumes from the latest by default.
- Ctrl-C (SIGINT) or SIGTERM (`kill`, a scheduler's preemption) stops the run at the end of the step it is in,
  with a checkpoint of that step (`StopRequest`), so a restart loses nothing; a second Ctrl-C stops at once.
- fine-tuning is the stage's business before `run`: it loads the weights `--init-from` names into its model
  when there is no checkpoint to resume, and freezes the groups `freeze` names (`train.finetune`); the
  optimizer it gives holds only what trains.
- TensorBoard scalars and image grids, and a tqdm bar, on the main process only.
- runs whose processes hold only shards of the weights (FSDP, DeepSpeed ZeRO-3) run the evaluation,
  image-grid and export hooks on every process with the weights gathered (`train.sharded`).

Reading order: `run` is the outline. It calls `prepare` (model, optimizer, LR schedule, EMA), `resume`,
then per step `compute_gradients` and `take_step` (or `skip_step` when not finite), and when due
`log_scalars`, `evaluate`, `log_image_grids` and `save_checkpoint`; at the end `export`, unless a
`StopRequest` ends it early.

Fault injection for tests: set `on_event` to a function of (event, step); it is called with ("step", N)
after step N and ("checkpoint", N) in the middle of writing checkpoint N (`tests/kill_at.py` kills there).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dalle_mini_impl.config import RunConfig, TrainConfig, add_config_args, config_from_args, save_config
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.files import LockHeld, locked
from dalle_mini_impl.model.generate import NonFiniteLogits
from dalle_mini_impl.pipeline.bundle import load_state_dict, record_stage_config, save_module, save_state_dict
from train.common import destroy_process_group_at_exit, process_state, progress_bar

from .sharded import full_state_dict, shards_weights, whole_weights

ATTENTION_KERNELS = ("auto", "math")  # train.<stage>.attention
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # stop a run after its step, with a checkpoint (StopRequest)
STOPPED_EXIT_CODES = tuple(128 + signum for signum in STOP_SIGNALS)  # 130, 143: how such a run exits
CKPT_RE = re.compile(r"^step_(\d{8})$")

# the test seam described in the module docstring; production code never sets it
on_event: Callable[[str, int], None] | None = None


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(
    argv: list[str] | None, description: str, refused: tuple[str, ...] = ()
) -> tuple[RunConfig, argparse.Namespace]:
    """The arguments every training entry point takes: config, overrides, data, resume, the weights to start from.

    `refused` names the options (`"split"`, `"init_from"`) a stage still parses, to refuse them in a sentence of its
    own, but does not list in its --help."""
    entry = Path(sys.argv[0])  # train/dalle.py under `python -m train.dalle`: usage names the module, not the file
    prog = f"python -m train.{entry.stem}" if entry.suffix == ".py" and entry.parent.name == "train" else None
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument(
        "--resume",
        default="latest",
        metavar="CHECKPOINT",
        help="checkpoint folder to resume from; 'latest' (default) resumes the newest one if any",
    )
    parser.add_argument("--no-resume", action="store_true", help="start from step 0 even if checkpoints exist")
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="BUNDLE_OR_RUN",
        help="start from this bundle's or run's weights for the stage (a folder, or a shipped model's name); "
        "read only when the run has no checkpoint of its own (train.finetune)",
    )
    for action in parser._actions:
        if action.dest in refused:
            action.help = argparse.SUPPRESS
    args = parser.parse_args(argv)
    return config_from_args(args), args


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def lr_lambda(tc: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio`, as a multiplier of the base LR."""

    def f(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        own = model.state_dict()
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(self.shadow[k].to(v.dtype))


@dataclass
class Stage:
    """What a stage gives the loop. Hooks receive the unwrapped model where they say so."""

    name: str  # "vae", "dalle", "clip": names the checkpoint and log folders
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Any  # an iterable of batches for this process, with state_dict() / load_state_dict()
    # (model, batch, step, micro) -> (loss, scalars to log: numbers or 0-d tensors, read once the step's backward is
    # queued), micro the micro-batch's index within the step (0 .. grad_accum - 1: a stage that seeds its draws by
    # step adds it, so that micro-batches draw apart); runs under autocast as the forward of a wrapper module, so
    # everything that needs gradients must happen inside it
    loss: Callable[[torch.nn.Module, dict, int, int], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]
    items_per_batch: Callable[[dict], int] = lambda batch: len(next(iter(batch.values())))
    item_name: str = "images"  # throughput is logged as <item_name>/s
    # (unwrapped model, step) -> scalars; run on every process (they may all-gather), logged by the main one
    evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None
    # (unwrapped model, step) -> {tag: image grid (3, H, W) in [0, 1], or text} for TensorBoard; run on the
    # main process, or on every process when the weights are sharded (FSDP, ZeRO-3: see train.sharded)
    log_images: Callable[[torch.nn.Module, int], dict[str, torch.Tensor | str]] | None = None
    # (unwrapped model, whole weights as CPU tensors) on the main process at the end: write the stage's
    # weights into the bundle; the module gives the hyperparameters, the state dict the values
    export: Callable[[torch.nn.Module, dict[str, torch.Tensor]], None] | None = None
    # called after every optimizer step with (unwrapped model, batch, step, accelerator): extra updates
    after_step: Callable[[torch.nn.Module, dict, int, Any], dict[str, float]] | None = None
    # extra state to checkpoint: modules (safetensors) and objects with a state_dict of tensors (an optimizer, a
    # metric's window)
    extra_state: dict[str, Any] = field(default_factory=dict)
    # what needs every process to hold the whole weights, when something does ("" : nothing): a part trained by
    # after_step outside the wrapper, say. Such a stage refuses FSDP and ZeRO-3 with this reason
    needs_whole_weights: str = ""
    # () -> the parameters whose gradient is clipped and logged as grad_norm (None: the model's); a part that
    # after_step trains (a critic) is left out, since the stage's loss leaves gradients in it that its step drops
    clip_parameters: Callable[[], Iterable[torch.nn.Parameter]] | None = None
    # where its training settings are set, as messages name them ("": `train.<name>.`; the judge's `judge.train.`)
    settings_key: str = ""

    @property
    def key(self) -> str:
        return self.settings_key or f"train.{self.name}."


class Replay:
    """Called, the first `limit` batches of an evaluation stream, from its start, every time; `skipped` counts the
    records the last pass skipped (unreadable images, empty captions), for a stage's evaluation to log."""

    def __init__(self, batches: Any, limit: int):
        self.batches, self.limit, self.start = batches, limit, batches.state_dict()

    def __call__(self) -> Iterator[dict]:
        self.batches.load_state_dict(self.start)
        # islice stops before drawing the batch after the last: its records, read and skipped, counted as this pass's
        yield from itertools.islice(self.batches, self.limit)

    @property
    def skipped(self) -> int:
        return int(getattr(self.batches, "n_skipped", 0))  # token shards skip nothing


def report(name: str, result: dict[str, float], accelerator) -> None:
    """The stage's last logged scalars as one JSON line, printed by the main process only."""
    if accelerator.is_main_process:
        print(json.dumps({"stage": name, **{k: round(float(v), 5) for k, v in result.items()}}), flush=True)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones (temporary names) are never listed, nor a folder
    without the trainer_state.json that a complete one is written with last."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and CKPT_RE.match(p.name) and (p / "trainer_state.json").is_file()
    )


# ----------------------------------------------------------------------------------------------
# The loop: `run` is the outline, the steps follow in the order it calls them
# ----------------------------------------------------------------------------------------------


def check_training_values(tc: TrainConfig, key: str = "") -> None:
    """One sentence for a stage setting no run can use, before anything is read or built (a batch of 0 rows would
    never finish an epoch; negative steps would export untrained weights; a checkpoint every 0 steps divides by
    zero). key: the settings' config prefix ("train.dalle."), named in the sentence."""

    def refuse(name: str, fix: str) -> None:
        raise UserError(f"{key}{name} is {getattr(tc, name)!r}; {fix}")

    if tc.steps < 0:
        refuse("steps", "use 0 (with --init-from: the source's weights as they are) or more")
    if tc.batch_size < 1:
        refuse("batch_size", "use at least 1 example per process")
    if not (math.isfinite(tc.lr) and tc.lr > 0):
        refuse("lr", "use a positive learning rate such as 1e-3")
    if len(tc.betas) != 2 or not all(0 <= b < 1 for b in tc.betas):
        refuse("betas", "give AdamW's two, each in [0, 1), such as [0.9, 0.99]")
    if not (math.isfinite(tc.weight_decay) and tc.weight_decay >= 0):
        refuse("weight_decay", "use 0 (none) or a positive value such as 0.05")
    if not 0 <= tc.ema_decay < 1:
        refuse("ema_decay", "use 0 (no EMA weights) or a decay in (0, 1) such as 0.999")
    if tc.warmup_steps < 0:
        refuse("warmup_steps", "use 0 (no warmup) or more")
    if not 0 <= tc.min_lr_ratio <= 1:
        refuse("min_lr_ratio", "use a share of the peak learning rate in [0, 1]")
    if tc.keep_checkpoints < 0:
        refuse("keep_checkpoints", "keep 0 (every checkpoint) or more")
    if tc.mixed_precision not in ("no", "bf16", "fp16"):
        raise UserError(f"{key}mixed_precision is '{tc.mixed_precision}'; use no, bf16 or fp16")
    if tc.grad_accum < 1:
        refuse("grad_accum", "set it to 1 (no accumulation) or more")
    if tc.num_workers != 0:
        refuse(
            "num_workers",
            "the data streams are read in the training process, which keeps their resume position "
            "exact, so set it to 0",
        )
    if tc.attention not in ATTENTION_KERNELS:
        raise UserError(f"{key}attention is '{tc.attention}'; use {' or '.join(ATTENTION_KERNELS)}")
    for name in ("log_every", "eval_every", "image_every", "checkpoint_every"):
        if getattr(tc, name) < 1:
            refuse(name, "set it to 1 or more (above the stage's steps: only at its last step)")
    if tc.eval_batches < 1:  # an evaluation over no batch has no number to report (once a StopIteration or a 0.0)
        refuse("eval_batches", "evaluate on 1 batch or more; eval_every above the stage's steps evaluates only once")


def make_accelerator(tc: TrainConfig, find_unused_parameters: bool = False, key: str = ""):
    """An Accelerator for one stage; launch settings (DDP, FSDP, DeepSpeed) come from `accelerate launch`.
    key: the stage's config prefix ("train.dalle."), named in the sentence of a setting refused."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    check_training_values(tc, key)
    destroy_process_group_at_exit()
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=1,  # accumulation is done by the loop itself
        # never accelerate's compile: its state is shared by every Accelerator of a process, so train.all's later
        # stages would keep the first one's choice; `prepare` compiles (train.<stage>.compile)
        dynamo_backend="no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    # accelerate's own choice of device (never a bare PartialState() before it: that one ignores
    # ACCELERATE_USE_CPU, and two CPU processes each took itself for the only one)
    check_precision(tc, accelerator.device, key)
    set_tf32(accelerator.device, tc.tf32)
    plugin = accelerator.state.deepspeed_plugin
    check_deepspeed_accumulation(tc.grad_accum, None if plugin is None else plugin.gradient_accumulation_steps)
    return accelerator


def check_precision(tc: TrainConfig, device: torch.device, key: str = "") -> None:
    """fp16 is a GPU's: on the CPU accelerate builds neither fp16 autocast nor a GradScaler, and the stage trained in
    fp32 under the fp16 name, in silence (sampling refuses --dtype fp16 on the CPU the same way)."""
    if tc.mixed_precision == "fp16" and device.type == "cpu":
        raise UserError(
            f"{key}mixed_precision is 'fp16', which accelerate runs on a GPU only (on the CPU the stage would train "
            "in fp32); use 'bf16' or 'no'"
        )


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TensorFloat-32 for fp32 matmuls and cuDNN convolutions on a CUDA device (`train.<stage>.tf32`); set both
    ways, since train.all's stages share no process but a library caller's may. PyTorch refuses to read the flags
    after a mix of its legacy `allow_tf32` and its newer `fp32_precision` settings, so the newer one is used where
    it exists. Never torch.set_float32_matmul_precision: it would also switch the CPU's oneDNN matmuls."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def check_deepspeed_accumulation(grad_accum: int, deepspeed_accum: object | None) -> None:
    """Under DeepSpeed (`deepspeed_accum`: its config's gradient_accumulation_steps; None: another engine) each
    backward is an optimizer step of DeepSpeed's engine, which clips by its config's gradient_clipping and skips
    fp16 overflows itself: the loop's accumulation over micro-batches would step once per micro-batch, so it is
    refused in one sentence, as DeepSpeed's own accumulation is (the loop never opens accelerate's accumulate)."""
    if deepspeed_accum is None:
        return
    if grad_accum > 1:
        raise UserError(
            f"grad_accum is {grad_accum}, and under DeepSpeed every backward is an optimizer step; set grad_accum=1 "
            "and raise the batch size, or launch with DDP or FSDP to accumulate"
        )
    if deepspeed_accum not in (1, "auto"):
        raise UserError(
            f"the DeepSpeed config's gradient_accumulation_steps is {deepspeed_accum}, which this loop does not "
            "drive; set it to 1 (or auto) and raise the batch size"
        )


@contextlib.contextmanager
def one_trainer(out: Path, name: str, is_main: bool, processes: int = 1) -> Iterator[None]:
    """Hold an exclusive lock on RUN/.NAME.lock while a stage trains there, so that a second trainer of the stage
    in the folder (a rerun while the first still runs, say after a terminal closed) stops in one sentence instead
    of writing the same checkpoints. A killed trainer leaves no lock behind (`files.locked`); the file stays,
    holding the last trainer's process id for the sentence. The main process locks.
    `processes`: how many accelerate sees; fewer than the launch's WORLD_SIZE means each took itself for the only
    one (a CPU launch without ACCELERATE_USE_CPU=true), and the sentence says that instead."""
    if not is_main:
        yield
        return
    try:
        with locked(out / f".{name}.lock", wait=False, note=str(os.getpid())):
            yield
    except LockHeld as held:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > processes:  # a launch of several processes in which each took itself for the only one
            raise UserError(
                f"train.{name} was launched as {world} processes, but each takes itself for the only one, so "
                f"they collide in '{out}'; on a CPU launch with ACCELERATE_USE_CPU=true (docs/SCALING.md)"
            ) from None
        raise UserError(
            f"train.{name} is already running in '{out}' (process {held.holder}); stop it (or wait for it) "
            "before running it again"
        ) from None


def run(cfg: RunConfig, tc: TrainConfig, stage: Stage, accelerator, args: argparse.Namespace) -> dict[str, float]:
    """Train `stage` for `tc.steps` optimizer steps; returns the last logged scalars."""
    with one_trainer(Path(cfg.out_dir), stage.name, accelerator.is_main_process, accelerator.num_processes):
        return _run(cfg, tc, stage, accelerator, args)


def _run(cfg: RunConfig, tc: TrainConfig, stage: Stage, accelerator, args: argparse.Namespace) -> dict[str, float]:
    t = prepare(cfg, tc, stage, accelerator)
    resume(t, checkpoint_to_resume(t.ckpt_root, args))
    t.start_step = t.step
    if t.is_main:
        say_what_the_schedule_misses(t)
    set_aside_later_checkpoints(t)
    t.writer = open_writer(t)
    batches: Iterator[dict] = iter(stage.batches)
    bar = progress_bar(t.is_main, total=tc.steps, initial=t.step, desc=stage.name)
    logged: dict[str, float] = {}
    window = Throughput()
    t.model.train()
    # the data's warnings (a skipped record) printed above the bar, not glued to its line; the bar closed on any
    # way out, so that an error's sentence comes after its last frame, not before
    with StopRequest() as stop, logging_redirect_tqdm(), bar:
        while t.step < tc.steps:
            g = compute_gradients(t, batches)
            window.items += g.items
            if not g.finite:
                skip_step(t, bar)
                continue
            scalars = take_step(t, g)
            bar.update(1)
            bar.set_postfix(loss=f"{g.loss:.4f}", refresh=False)  # drawn with the bar, at its own interval

            if _due(t.step, tc.log_every, tc.steps):
                logged = log_scalars(t, g, scalars, window)
                window = Throughput()
            if stage.evaluate is not None and _due(t.step, tc.eval_every, tc.steps):
                logged.update(evaluate(t))
            if stage.log_images is not None and (t.step == 1 or _due(t.step, tc.image_every, tc.steps)):
                log_image_grids(t)
            if _due(t.step, tc.checkpoint_every, tc.steps):
                save_checkpoint(t)
            if on_event is not None:
                on_event("step", t.step)
            if t.step < tc.steps and stop.agreed(t.accelerator):
                bar.close()
                stop.save_and_exit(t)
    logged.update(end_of_run_scalars(t))
    if stage.evaluate is not None and not any(k.startswith("eval/") for k in logged):
        # a run resumed at its last step trains nothing: evaluated here, else weights refused as diverged by the
        # run before would be exported by a plain rerun of its command; not logged again (the run before did)
        logged.update(evaluate(t, log=False))
    check_not_diverged(t, logged)
    export(t)
    close(t)
    return logged


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM while training: finish the step, save a checkpoint there, stop.

    The signal handler only records the signal; the loop asks `agreed` after each step, which under several
    processes takes the largest signal any of them received (one all-reduce), so that all stop, and save,
    at the same step: a terminal's Ctrl-C reaches every process, a scheduler's SIGTERM may reach one.
    A second Ctrl-C raises KeyboardInterrupt (stop now, as without this); further SIGTERMs are ignored
    (torchrun's agent sends one after the terminal's Ctrl-C). Signal handlers can only be set in the main
    thread: elsewhere this does nothing."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            again = " (Ctrl-C again: stop now, without one)" if signum == signal.SIGINT else ""
            note = f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint{again}\n"
            # os.write, not print: the handler may run inside a write of the progress bar to the same stream,
            # where print would raise "reentrant call"
            try:
                os.write(2, note.encode())
            except OSError:  # the terminal is gone (a hangup): what the stop still writes goes nowhere, not fails
                quiet = os.open(os.devnull, os.O_WRONLY)
                os.dup2(quiet, 1)
                os.dup2(quiet, 2)

    def agreed(self, accelerator) -> int:
        """The signal to stop for, 0 for none: this process's, or under several the largest any received.
        Collective when there are several processes."""
        if accelerator.num_processes == 1 or not torch.distributed.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum

    def save_and_exit(self, t: Training) -> None:
        """Checkpoint this step (unless the loop just did, it being due), close the writer, say how to resume, exit
        with 128 + the signal's number (STOPPED_EXIT_CODES: 130 for Ctrl-C, 143 for SIGTERM). Collective."""
        if not _due(t.step, t.tc.checkpoint_every, t.tc.steps):
            save_checkpoint(t)
        close(t)
        if t.is_main:
            print(
                f"{t.stage.name}: stopped by {signal.Signals(self.signum).name} at step {t.step} of {t.tc.steps}, "
                f"checkpoint {t.ckpt_root / f'step_{t.step:08d}'} saved; run the same command again to resume",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(128 + self.signum)


@dataclass
class Training:
    """One run of the loop: the stage, its prepared model and optimizer, and the counters a checkpoint keeps."""

    tc: TrainConfig
    stage: Stage
    accelerator: Any
    out: Path  # the run folder
    model: torch.nn.Module  # the prepared `_LossModule`: its forward is the stage's loss
    forward: Callable  # what a step calls: the model, or (train.<stage>.compile) the model through torch.compile
    unwrapped: torch.nn.Module  # the stage's own model, the one the hooks receive
    optimizer: torch.optim.Optimizer  # the prepared optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sharded: bool  # each process holds only a shard of the weights (FSDP, ZeRO-3)
    ema: EMA | None
    writer: Any = None  # TensorBoard's SummaryWriter, on the main process only
    step: int = 0  # optimizer steps taken
    bad_in_row: int = 0  # non-finite steps since the last finite one
    bad_total: int = 0  # non-finite steps skipped in the whole run, resumes included
    start_step: int = 0  # the step this run started at: a resumed checkpoint's
    cfg: RunConfig | None = None  # the run's config, recorded in config.json when the stage exports

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints" / self.stage.name


@dataclass
class Gradients:
    """What one step's forward and backward passes leave for the optimizer (the gradients are in `.grad`)."""

    loss: float  # this process's loss, the mean over its micro-batches
    grad_norm: float  # before clipping; nan when accelerate reports none
    finite: bool  # loss and gradient finite on every process
    scalars: dict[str, float]  # the stage's scalars for the last micro-batch
    batch: dict  # the last micro-batch
    items: int  # items in all the micro-batches


@dataclass
class Throughput:
    """Items this process trained on since the last log line, and when that window started."""

    items: int = 0
    t0: float = field(default_factory=time.perf_counter)


def _due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (logging, evaluation, checkpoint) is due: every `every` steps, and at the last."""
    return step % every == 0 or step == last


def prepare(cfg: RunConfig, tc: TrainConfig, stage: Stage, accelerator) -> Training:
    """Keep the stage's config beside its logs; prepare its model (wrapped with its loss) and optimizer, the LR
    schedule and the EMA weights. The run's config.json takes the stage's sections only when it exports (`export`):
    a retrain that stops before then leaves it describing the files still in the folder."""
    out = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "logs" / stage.name / "config.json")

    # the loss runs as the forward of a wrapper so DDP/FSDP see it and synchronise gradients
    model, optimizer = accelerator.prepare(_LossModule(stage), stage.optimizer)
    # not prepared: accelerate would step it once per process per step; the LR is a function of the step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    unwrapped = accelerator.unwrap_model(model).model
    forward = torch.compile(model) if tc.compile else model  # inductor, over the DDP/FSDP wrapper as accelerate does
    sharded = shards_weights(model, accelerator)
    if sharded and tc.ema_decay > 0:
        raise UserError(
            f"{stage.key}ema_decay needs every process to hold all the weights, which FSDP and ZeRO-3 "
            f"do not; set {stage.key}ema_decay=0 or launch with DDP or ZeRO-2"
        )
    if sharded and stage.needs_whole_weights:
        raise UserError(
            f"{stage.needs_whole_weights} needs every process to hold all the weights, which FSDP and ZeRO-3 do not; "
            "launch this stage with DDP or ZeRO-2 (configs/accelerate/ddp.yaml)"
        )
    ema = EMA(unwrapped, tc.ema_decay) if tc.ema_decay > 0 else None
    return Training(tc, stage, accelerator, out, model, forward, unwrapped, optimizer, scheduler, sharded, ema, cfg=cfg)


def trainable_digest(model: torch.nn.Module) -> str:
    """A digest of the names of the parameters that train (those `freeze` leaves), kept in each checkpoint; the
    names as the model has them, without the prefixes FSDP's and activation checkpointing's wrappers add."""
    wrappers = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
    names = "\n".join(wrappers.sub("", name) for name, p in model.named_parameters() if p.requires_grad)
    return hashlib.sha256(names.encode()).hexdigest()[:16]


def checkpoint_damage(path: Path) -> str | None:
    """What makes a complete-looking checkpoint folder unreadable, or None: a file cut short or emptied (a power loss
    before the disk wrote it, a full disk, an interrupted copy of the run) or one missing. Reads the JSON files, the
    safetensors headers and the torch files' zip directories (at their ends: a cut file has none), not the tensors."""
    import zipfile

    from safetensors import safe_open

    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    if not isinstance(state, dict) or "step" not in state:
        return "trainer_state.json holds no step"
    entries = list(path.iterdir())
    files = sorted(p for p in entries if p.is_file())
    if not any(p.is_dir() for p in entries):  # FSDP's and DeepSpeed's layouts keep these in folders
        for needed, prefixes in (("model weights", ("model", "pytorch_model")), ("optimizer state", ("optimizer",))):
            if not any(file.name.startswith(prefixes) for file in files):
                return f"its {needed} file is missing"
    for file in files:
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".bin", ".pt"):
                zipfile.ZipFile(file).close()
        except Exception as e:  # noqa: BLE001 - any reader's error means the same: this file cannot be loaded
            return f"{file.name} is unreadable ({type(e).__name__})"
    return None


def checkpoint_to_resume(ckpt_root: Path, args: argparse.Namespace, say: bool = True) -> Path | None:
    """The checkpoint `--resume` names (for 'latest' the newest under `ckpt_root` that is readable: a damaged one is
    passed over with a warning unless not `say` (a question asked before the run, which says it), and set aside by
    the run), or None to start at step 0."""
    if getattr(args, "no_resume", False):
        return None
    if args.resume in (None, "", "latest"):
        for found in reversed(list_checkpoints(ckpt_root)):
            damage = checkpoint_damage(found)
            if damage is None:
                return found
            if say and process_state().is_main_process:
                said = f"checkpoint '{found}' is damaged ({damage}); resuming from the one before it"
                tqdm.write(said, file=sys.stderr)
        return None
    path = Path(args.resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"checkpoint '{path}' is not a complete checkpoint folder; pass one under {ckpt_root}")
    stage = path.parent.name  # a sibling stage's folder (a set-aside one, `dalle.set-aside-TIME`, is this stage's)
    if path.parent.parent.name == "checkpoints" and stage != ckpt_root.name and "." not in stage:
        raise UserError(f"checkpoint '{path}' is the {stage} stage's; pass one under {ckpt_root}")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise UserError(f"checkpoint '{path}' is damaged ({damage}); pass an older one, or start over with --no-resume")
    return path


def say_what_the_schedule_misses(t: Training) -> None:
    """One line each for a run that trains other than its settings read: resumed past its steps (nothing trains,
    and the checkpoint's later weights are exported), or all in warmup (its learning rate never reaches lr)."""
    tc, key = t.tc, t.stage.key.rstrip(".")
    if t.step > tc.steps:
        tqdm.write(
            f"{t.stage.name}: the checkpoint resumed is at step {t.step}, past {key}.steps={tc.steps}: nothing "
            f"trains, and the run exports the weights of step {t.step}; to end at step {tc.steps}, start over with "
            "--no-resume",
            file=sys.stderr,
        )
    elif 0 < tc.steps < tc.warmup_steps:
        tqdm.write(
            f"{t.stage.name}: {key}.warmup_steps={tc.warmup_steps} is above {key}.steps={tc.steps}, so the whole "
            f"run is warmup and its learning rate ends at {tc.steps / tc.warmup_steps:.2g} x {key}.lr; lower "
            "warmup_steps to reach lr",
            file=sys.stderr,
        )


def check_processes(t: Training, checkpoint: Path, state: dict) -> None:
    """A checkpoint resumed by another number of processes than wrote it: more is one sentence on every process
    (before any collective, so that none waits on one that stopped), fewer a warning (the global batch is smaller
    and the data position approximate: another run than the one that never stopped)."""
    saved = state.get("processes") or len(list(checkpoint.glob("data_*.json"))) or None  # older: its data files
    now = t.accelerator.num_processes
    if saved is None or saved == now:
        return
    if now > saved:
        raise UserError(
            f"checkpoint '{checkpoint}' was written by {saved} process{'es' * (saved != 1)} and this run has {now}, "
            f"so processes past {saved} have no data position; resume with {saved}, or start over with --no-resume"
        )
    if t.is_main:
        tqdm.write(
            f"{t.stage.name}: checkpoint '{checkpoint}' was written by {saved} processes and this run has {now}, so "
            f"the global batch is {now}/{saved} of what it was and the data position approximate: it goes on as "
            f"another run than the one that never stopped; launch {saved} processes to continue that one",
            file=sys.stderr,
        )


def resume(t: Training, checkpoint: Path | None) -> None:
    """Continue from `checkpoint`, if any: weights, optimizer and RNG (accelerate), the LR schedule, this process's
    data position, the EMA weights, the stage's extra state and the step counters."""
    if checkpoint is None:
        return
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    # the optimizer's state is restored by position among the trainable parameters: under another freeze it would
    # fail to load, or (groups of the same shapes) load one block's moments into another's
    trainable = trainable_digest(t.unwrapped)
    if state.get("trainable", trainable) != trainable:  # a checkpoint written before the digest: not compared
        raise UserError(
            f"checkpoint '{checkpoint}' was trained with other parameters frozen than {t.stage.key}freeze "
            "freezes now; resume with the freeze it was trained with, or start over with --no-resume or another --out"
        )
    check_processes(t, checkpoint, state)
    try:
        t.accelerator.load_state(str(checkpoint))
    except RuntimeError as e:  # "size mismatch for ...", "Missing key(s) ...": another model's checkpoint
        if "size mismatch" not in str(e) and "Missing key" not in str(e) and "Unexpected key" not in str(e):
            raise
        raise UserError(
            f"checkpoint '{checkpoint}' holds another model than this config builds (another stage's, or sizes "
            "changed since); rerun with the config it was trained with, or start over with --no-resume or another --out"
        ) from None
    t.step, t.bad_total = state["step"], state["bad_steps"]
    _set_schedule_step(t.scheduler, t.step)
    rank = t.accelerator.process_index
    data_file = checkpoint / f"data_{rank}.json"
    if not data_file.is_file():  # a silent restart of this process's data would repeat what it has seen
        raise UserError(
            f"checkpoint '{checkpoint}' has no data position for process {rank} ({data_file.name}), so it was written "
            "by fewer processes; resume with as many processes as wrote it, or start over with --no-resume"
        )
    t.stage.batches.load_state_dict(json.loads(data_file.read_text()))
    if t.ema is not None and (checkpoint / "ema.safetensors").is_file():
        t.ema.shadow = {k: v.float() for k, v in load_state_dict(checkpoint / "ema.safetensors").items()}
    for name, obj in t.stage.extra_state.items():
        path = _extra_path(obj, checkpoint, name)
        if path.is_file():
            _load_extra(obj, path)
    if not t.is_main:
        return
    tqdm.write(f"resumed {t.stage.name} from {checkpoint} at step {t.step}", file=sys.stderr)
    threads, saved = torch.get_num_threads(), state.get("cpu_threads")
    if t.accelerator.device.type == "cpu" and saved not in (None, threads):
        tqdm.write(
            f"{t.stage.name}: checkpoint '{checkpoint}' was written at {saved} CPU thread{'s' * (saved != 1)} and "
            f"this run has {threads}, so it goes on as another run than the one that never stopped; set "
            f"OMP_NUM_THREADS={saved} to continue that one",
            file=sys.stderr,
        )


def aside_folder(ckpt_root: Path) -> Path:
    """Where a stage's checkpoints of another run go: `RUN/checkpoints/NAME.set-aside-TIME` (read as NAME's)."""
    return ckpt_root.with_name(f"{ckpt_root.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")


def set_aside_later_checkpoints(t: Training) -> None:
    """This stage's checkpoints past the step the run starts at (`--no-resume`, or `--resume` of an older one)
    belong to another run: move them to a sibling folder, so that neither pruning (which keeps the newest) nor a
    later resume takes them for this run's. Nothing is deleted. Collective."""
    later = [p for p in list_checkpoints(t.ckpt_root) if int(CKPT_RE.match(p.name)[1]) > t.step]
    if later and t.is_main:
        aside = aside_folder(t.ckpt_root)
        aside.mkdir(parents=True, exist_ok=True)
        for path in later:
            os.replace(path, aside / path.name)
        tqdm.write(
            f"{t.stage.name} starts at step {t.step}: moved the {len(later)} later checkpoints of an earlier run "
            f"to {aside}",
            file=sys.stderr,
        )
    t.accelerator.wait_for_everyone()


def open_writer(t: Training):
    """A TensorBoard writer for the stage's logs (RUN/logs/<stage>) on the main process; None on the others. What
    earlier runs in the folder logged from the step this one starts at is purged (TensorBoard drops it on reading):
    a resume from the last checkpoint would log the steps after it a second time, and `--no-resume` would show
    the earlier run's later steps as this one's."""
    if not t.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(t.out / "logs" / t.stage.name), purge_step=t.step + 1)


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """`train.<stage>.attention`: PyTorch's choice of kernel ("auto"), or matmul and softmax ("math"), whose
    autograd records them so that the backward is theirs too."""
    if name == "math":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def compute_gradients(t: Training, batches: Iterator[dict]) -> Gradients:
    """Forward and backward over `grad_accum` micro-batches, then clip the gradient; every process agrees on whether
    the step is finite. Collective: every process calls it."""
    tc, accelerator = t.tc, t.accelerator
    scalars: dict[str, float] = {}
    losses, items = [], 0
    for micro in range(tc.grad_accum):
        batch = _move(next(batches), accelerator.device)
        items += t.stage.items_per_batch(batch)
        # only the last micro-batch synchronises gradients across processes
        ctx = accelerator.no_sync(t.model) if micro < tc.grad_accum - 1 else contextlib.nullcontext()
        with ctx, accelerator.autocast(), attention_kernel(tc.attention):
            loss, scalars = t.forward(batch, t.step, micro)
        accelerator.backward(loss / tc.grad_accum)
        losses.append(loss.detach())
    # read once every backward is queued: read between a forward and its backward, a GPU sat idle there
    scalars = {k: float(v) for k, v in scalars.items()}
    loss_sum = 0.0
    for loss in losses:
        loss_sum += float(loss) / tc.grad_accum
    finite = math.isfinite(loss_sum)  # a NaN or inf micro-batch loss makes the sum one too
    clipped = t.model.parameters() if t.stage.clip_parameters is None else t.stage.clip_parameters()
    grad_norm = accelerator.clip_grad_norm_(clipped, tc.grad_clip if tc.grad_clip > 0 else 1e12)
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    # every rank sees the same all-reduced gradient, so every rank takes the same decision here
    finite = all_finite(accelerator, finite and math.isfinite(grad_norm))
    return Gradients(loss_sum, grad_norm, finite, scalars, batch, items)


def all_finite(accelerator, finite: bool) -> bool:
    """Whether every process's step is finite (collective). accelerate's reduce knows sum, mean and max, and sums
    any other name: a "min" over the flags once let one finite process outvote another's non-finite step."""
    bad = torch.tensor(0.0 if finite else 1.0, device=accelerator.device)
    return not bool(accelerator.reduce(bad, "max").item())


def skip_step(t: Training, bar) -> None:
    """Drop a non-finite step's gradients and count it; after `max_bad_steps` in a row, stop the run."""
    scaler = t.accelerator.scaler
    if scaler is not None:  # fp16's loss scale backs off; its unscale_ (clip_grad_norm_) may run again after
        scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.bad_in_row += 1
    t.bad_total += 1
    if t.writer is not None:
        t.writer.add_scalar(f"{t.stage.name}/skipped_nonfinite_steps", t.bad_total, t.step)
    if t.bad_in_row >= t.tc.max_bad_steps:
        bar.close()
        rerun = "then rerun to resume from the last good checkpoint"
        if t.step == t.start_step > 0:  # not one step since the resume: the checkpoint's weights may be the fault
            rerun = (
                f"the checkpoint it resumed (step {t.step}) may hold weights that diverged already: rerun with "
                f"--resume of an earlier one in '{t.ckpt_root}' or with --no-resume"
            )
        raise UserError(
            f"{t.stage.name} training stopped at step {t.step}: {t.bad_in_row} steps in a row had a non-finite "
            f"loss or gradient; lower {t.stage.key}lr or use mixed_precision=bf16, {rerun}"
        )


def take_step(t: Training, g: Gradients) -> dict[str, float]:
    """The optimizer and LR-schedule step, then the stage's `after_step` and the EMA; returns the step's scalars
    (the loss's, with `after_step`'s added)."""
    t.bad_in_row = 0
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
    scalars = g.scalars
    if t.stage.after_step is not None:
        scalars.update(t.stage.after_step(t.unwrapped, g.batch, t.step, t.accelerator) or {})
    if t.ema is not None:
        t.ema.update(t.unwrapped)
    return scalars


def log_scalars(t: Training, g: Gradients, scalars: dict[str, float], window: Throughput) -> dict[str, float]:
    """The step's scalars, written to TensorBoard under <stage>/: the global batch's loss, the stage's scalars, LR,
    gradient norm, throughput and skip counts. Collective (the loss and the stage's scalars are averaged over
    processes, the skips summed)."""
    elapsed = time.perf_counter() - window.t0
    # the loss of the global batch: the mean over processes (every rank reaches this line)
    loss_mean = float(t.accelerator.reduce(torch.tensor(g.loss, device=t.accelerator.device), "mean"))
    if scalars and t.accelerator.num_processes > 1:  # the stage's parts of it too (they were process 0's alone)
        keys = list(scalars)
        values = torch.tensor([float(scalars[k]) for k in keys], dtype=torch.float64, device=t.accelerator.device)
        scalars = dict(zip(keys, t.accelerator.reduce(values, "mean").tolist()))
    logged = {"loss": loss_mean, **scalars, "lr": t.scheduler.get_last_lr()[0], "grad_norm": g.grad_norm}
    logged[f"{t.stage.item_name}_per_s"] = window.items * t.accelerator.num_processes / max(elapsed, 1e-9)
    skipped = getattr(t.stage.batches, "n_skipped", None)
    if skipped is not None:  # every process's skips: each reads its own share of the data
        logged["data_skipped"] = int(
            t.accelerator.reduce(torch.tensor(float(skipped), device=t.accelerator.device), "sum")
        )
    logged["skipped_nonfinite_steps"] = t.bad_total
    if t.writer is not None:
        for k, v in logged.items():
            t.writer.add_scalar(f"{t.stage.name}/{k}", float(v), t.step)
    return logged


def evaluate(t: Training, log: bool = True) -> dict[str, float]:
    """The stage's `evaluate` hook with the weights whole, written to TensorBoard (unless `log` is false: a step
    an earlier run logged already) and returned under eval/. Collective: every process calls it."""
    t.model.eval()
    with t.accelerator.autocast(), whole_weights(t.model, t.accelerator):
        results = t.stage.evaluate(t.unwrapped, t.step)
    t.model.train()
    if "data_skipped" in results and t.accelerator.num_processes > 1:  # each process's share of the split, summed
        skipped = torch.tensor(float(results["data_skipped"]), dtype=torch.float64, device=t.accelerator.device)
        results["data_skipped"] = float(t.accelerator.reduce(skipped, "sum"))
    if t.writer is not None and log:
        for k, v in results.items():
            t.writer.add_scalar(f"{t.stage.name}/eval/{k}", float(v), t.step)
    return {f"eval/{k}": v for k, v in results.items()}


def log_image_grids(t: Training) -> None:
    """The stage's `log_images` hook, written to TensorBoard. It runs on the main process alone, or on every process
    when the weights are sharded, since gathering them is a collective."""
    if t.writer is None and not t.sharded:
        return
    t.model.eval()
    try:
        with whole_weights(t.model, t.accelerator):
            grids = t.stage.log_images(t.unwrapped, t.step)
    except NonFiniteLogits:  # a diverging model: no samples to draw, but the run goes on (`check_not_diverged`)
        grids = {}
        if t.is_main:
            tqdm.write(
                f"{t.stage.name}: no sample grid at step {t.step}: the model's logits are not finite (its weights "
                "are diverging)",
                file=sys.stderr,
            )
    t.model.train()
    if t.writer is None:
        return
    for tag, value in grids.items():
        if isinstance(value, str):
            t.writer.add_text(tag, value, t.step)
        else:
            t.writer.add_image(tag, value, t.step)


def save_checkpoint(t: Training) -> None:
    """Write a checkpoint to a temporary folder, then rename it into place; keep the newest `keep_checkpoints`.
    Collective: every process writes its part (accelerate's state, its data position)."""
    accelerator, stage = t.accelerator, t.stage
    final = t.ckpt_root / f"step_{t.step:08d}"
    tmp = t.ckpt_root / f"tmp-step_{t.step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if on_event is not None:
        on_event("checkpoint", t.step)
    (tmp / f"data_{accelerator.process_index}.json").write_text(json.dumps(stage.batches.state_dict()))
    if accelerator.is_main_process:
        if t.ema is not None:
            save_state_dict(t.ema.shadow, tmp / "ema.safetensors")
        for name, obj in stage.extra_state.items():
            _save_extra(obj, _extra_path(obj, tmp, name))
        # trainer_state.json is written last: its presence marks the folder complete
        # the CPU threads too: float sums split across another number of threads part within a few steps
        trainer_state = {
            "step": t.step,
            "bad_steps": t.bad_total,
            "cpu_threads": torch.get_num_threads(),
            "trainable": trainable_digest(t.unwrapped),
            "processes": accelerator.num_processes,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # no checkpoint of this step is there to replace: those past the run's start were set aside when it began
        # (`set_aside_later_checkpoints`)
        os.replace(tmp, final)
        keep = t.tc.keep_checkpoints
        for old in list_checkpoints(t.ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def end_of_run_scalars(t: Training) -> dict[str, float]:
    """Whether every process ended with the same weights (unless they are sharded), and how many processes ran.
    Collective."""
    result: dict[str, float] = {}
    if not t.sharded:  # shards differ by design; the digest compares whole weights
        result["ranks_in_sync"] = float(_ranks_in_sync(t.accelerator, t.unwrapped))
    result["num_processes"] = float(t.accelerator.num_processes)
    return result


def check_not_diverged(t: Training, logged: dict[str, float]) -> None:
    """Refuse to export weights that diverged: a parameter not finite, or a NaN from the last evaluation (weights
    whose forward pass overflows, though each is finite: the step that made them had a finite loss). Once such a
    transformer was exported, `train.all` went on, and every sampled code was the vocabulary's last. Collective."""
    bad = next((n for n, p in t.unwrapped.named_parameters() if not torch.isfinite(p).all()), None)
    nan = next((k for k, v in logged.items() if k.startswith("eval/") and math.isnan(float(v))), None)
    local = torch.tensor(float(bad is not None or nan is not None), device=t.accelerator.device)
    if not t.accelerator.reduce(local, "max").item():
        return
    if bad is not None:
        what = f"hold values that are not finite ({bad})"
    elif nan is not None:
        what = f"give a NaN {nan} on the validation split"
    else:  # another process's share
        what = "hold values that are not finite on another process"
    raise UserError(
        f"{t.stage.name} trained to step {t.step}, but its weights {what}: the run diverged, and they are not "
        f"exported; lower {t.stage.key}lr and rerun with --no-resume, or with --resume of a checkpoint from before "
        f"it diverged in '{t.ckpt_root}'"
    )


def export(t: Training) -> None:
    """Once every process has finished training: the stage's `export` hook on the main process, with the whole
    weights (the EMA ones when kept). Collective (the weights are gathered)."""
    t.accelerator.wait_for_everyone()
    if t.stage.export is None:
        return
    if t.ema is not None:
        t.ema.copy_to(t.unwrapped)
    state = full_state_dict(t.model, t.accelerator, prefix="model.")  # every process joins the gather
    if t.is_main:
        if t.cfg is not None:  # config.json first, then the weights that mark the stage done (train.all)
            record_stage_config(t.cfg, t.out, t.stage.name)
        t.stage.export(t.unwrapped, state)


def close(t: Training) -> None:
    """Flush and close the TensorBoard writer, then wait for every process."""
    if t.writer is not None:
        t.writer.flush()
        t.writer.close()
    t.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Helpers of the steps above
# ----------------------------------------------------------------------------------------------


def _set_schedule_step(scheduler, step: int) -> None:
    """Put a LambdaLR at `step`: the optimizer's LR and the scheduler's counter, as if it had stepped there."""
    scheduler.last_epoch = step
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _ranks_in_sync(accelerator, model: torch.nn.Module) -> bool:
    """Whether every process holds the same weights (a digest compared across ranks; True alone)."""
    with torch.no_grad():
        digest = torch.stack(
            [torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()]
        ).flatten()
    everyone = accelerator.gather(digest.to(accelerator.device)[None])  # (processes, 2 * params)
    return bool((everyone == everyone[0]).all())


class _LossModule(torch.nn.Module):
    def __init__(self, stage: Stage):
        super().__init__()
        self.model = stage.model
        self._loss = stage.loss

    def forward(self, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(self.model, batch, step, micro)


def _extra_path(obj: Any, folder: Path, name: str) -> Path:
    """Where an extra module (safetensors) or optimizer (torch.save of tensors only) is checkpointed."""
    return folder / (f"{name}.safetensors" if isinstance(obj, torch.nn.Module) else f"{name}.pt")


def _save_extra(obj: Any, path: Path) -> None:
    if isinstance(obj, torch.nn.Module):
        save_module(obj, path)
    else:
        torch.save(obj.state_dict(), path)


def _load_extra(obj: Any, path: Path) -> None:
    if isinstance(obj, torch.nn.Module):
        obj.load_state_dict(load_state_dict(path))
    else:
        obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
