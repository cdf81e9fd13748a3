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
- TensorBoard scalars and image grids, and a tqdm bar, on the main process only.
- runs whose processes hold only shards of the weights (FSDP, DeepSpeed ZeRO-3) run the evaluation,
  image-grid and export hooks on every process with the weights gathered (`train.sharded`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dalle_mini_impl.config import RunConfig, TrainConfig, add_config_args, config_from_args
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.pipeline.bundle import load_state_dict, record_stage_config, save_state_dict

from .sharded import full_state_dict, shards_weights, whole_weights

CKPT_RE = re.compile(r"^step_(\d{8})$")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, description: str) -> tuple[RunConfig, argparse.Namespace]:
    """The arguments every training entry point takes: config, overrides, data, resume."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    parser.add_argument(
        "--resume",
        default="latest",
        metavar="CHECKPOINT",
        help="checkpoint folder to resume from; 'latest' (default) resumes the newest one if any",
    )
    parser.add_argument("--no-resume", action="store_true", help="start from step 0 even if checkpoints exist")
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
    # (model, batch, step) -> (loss, scalars to log); runs under autocast as the forward of a wrapper
    # module, so everything that needs gradients must happen inside it
    loss: Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, dict[str, float]]]
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
    # extra modules whose state must be checkpointed (a discriminator and its optimizer, say)
    extra_state: dict[str, Any] = field(default_factory=dict)


def replay(batches: Any, limit: int) -> Callable[[], Iterator[dict]]:
    """A function giving the first `limit` batches of an evaluation stream, from its start, on every call."""
    start = batches.state_dict()

    def first() -> Iterator[dict]:
        batches.load_state_dict(start)
        for i, batch in enumerate(batches):
            if i >= limit:
                return
            yield batch

    return first


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
    """Complete checkpoints, oldest first; half-written ones (temporary names) are never listed."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and CKPT_RE.match(p.name))


def _resume_dir(ckpt_root: Path, args: argparse.Namespace) -> Path | None:
    if getattr(args, "no_resume", False):
        return None
    if args.resume in (None, "", "latest"):
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(args.resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"checkpoint '{path}' is not a complete checkpoint folder; pass one under {ckpt_root}")
    return path


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def make_accelerator(tc: TrainConfig, find_unused_parameters: bool = False):
    """An Accelerator for one stage; launch settings (DDP, FSDP, DeepSpeed) come from `accelerate launch`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if tc.mixed_precision not in ("no", "bf16", "fp16"):
        raise UserError(f"mixed_precision is '{tc.mixed_precision}'; use no, bf16 or fp16")
    return Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=1,  # accumulation is done by the loop itself
        # compile = true: accelerate wraps the prepared loss module in torch.compile (inductor)
        dynamo_backend="inductor" if tc.compile else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )


def run(cfg: RunConfig, tc: TrainConfig, stage: Stage, accelerator, args: argparse.Namespace) -> dict[str, float]:
    """Train `stage` for `tc.steps` optimizer steps; returns the last logged scalars."""
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints" / stage.name
    is_main = accelerator.is_main_process
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        record_stage_config(cfg, out, stage.name)

    # the loss runs as the forward of a wrapper so DDP/FSDP see it and synchronise gradients
    model, optimizer = accelerator.prepare(_LossModule(stage), stage.optimizer)
    # not prepared: accelerate would step it once per process per step; the LR is a function of the step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    unwrapped = accelerator.unwrap_model(model).model
    sharded = shards_weights(model, accelerator)
    if sharded and tc.ema_decay > 0:
        raise UserError(
            f"train.{stage.name}.ema_decay needs every process to hold all the weights, which FSDP and ZeRO-3 "
            f"do not; set train.{stage.name}.ema_decay=0 or launch with DDP or ZeRO-2"
        )
    ema = EMA(unwrapped, tc.ema_decay) if tc.ema_decay > 0 else None

    step, bad_in_row, bad_total = 0, 0, 0
    resume = _resume_dir(ckpt_root, args)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / "trainer_state.json").read_text())
        step, bad_total = state["step"], state["bad_steps"]
        _set_schedule_step(scheduler, step)
        data_file = resume / f"data_{accelerator.process_index}.json"
        if data_file.is_file():
            stage.batches.load_state_dict(json.loads(data_file.read_text()))
        if ema is not None and (resume / "ema.safetensors").is_file():
            ema.shadow = {k: v.float() for k, v in load_state_dict(resume / "ema.safetensors").items()}
        for name, obj in stage.extra_state.items():
            path = resume / f"{name}.safetensors"
            if path.is_file():
                _load_extra(obj, path)
        if is_main:
            tqdm.write(f"resumed {stage.name} from {resume} at step {step}", file=sys.stderr)

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "logs" / stage.name))

    def checkpoint() -> None:
        _save_checkpoint(accelerator, ckpt_root, step, bad_total, stage, ema, tc.keep_checkpoints)

    it: Iterator[dict] = iter(stage.batches)
    bar = tqdm(total=tc.steps, initial=step, disable=not is_main, desc=stage.name, dynamic_ncols=True)
    logged: dict[str, float] = {}
    window_items, window_t0 = 0, time.perf_counter()
    model.train()
    while step < tc.steps:
        scalars: dict[str, float] = {}
        loss_sum = 0.0
        finite = True
        for micro in range(tc.grad_accum):
            batch = _move(next(it), accelerator.device)
            window_items += stage.items_per_batch(batch)
            # only the last micro-batch synchronises gradients across processes
            ctx = accelerator.no_sync(model) if micro < tc.grad_accum - 1 else _null()
            with ctx, accelerator.autocast():
                loss, scalars = model(batch, step)
            finite &= bool(torch.isfinite(loss.detach()).all())
            accelerator.backward(loss / tc.grad_accum)
            loss_sum += float(loss.detach()) / tc.grad_accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e12)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        # every rank sees the same all-reduced gradient, so every rank takes the same decision here
        finite = finite and math.isfinite(grad_norm)
        finite = bool(accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), "min").item())
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            bad_in_row += 1
            bad_total += 1
            if writer is not None:
                writer.add_scalar(f"{stage.name}/skipped_nonfinite_steps", bad_total, step)
            if bad_in_row >= tc.max_bad_steps:
                bar.close()
                raise UserError(
                    f"{stage.name} training stopped at step {step}: {bad_in_row} steps in a row had a non-finite "
                    f"loss or gradient; lower train.{stage.name}.lr or use mixed_precision=bf16, then rerun "
                    "to resume from the last good checkpoint"
                )
            continue
        bad_in_row = 0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if stage.after_step is not None:
            scalars.update(stage.after_step(unwrapped, batch, step, accelerator) or {})
        if ema is not None:
            ema.update(unwrapped)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}")

        if step % tc.log_every == 0 or step == tc.steps:
            elapsed = time.perf_counter() - window_t0
            # the loss of the global batch: the mean over processes (every rank reaches this line)
            loss_mean = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean"))
            logged = {"loss": loss_mean, **scalars, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
            logged[f"{stage.item_name}_per_s"] = window_items * accelerator.num_processes / max(elapsed, 1e-9)
            skipped = getattr(stage.batches, "n_skipped", None)
            if skipped is not None:
                logged["data_skipped"] = skipped
            logged["skipped_nonfinite_steps"] = bad_total
            if writer is not None:
                for k, v in logged.items():
                    writer.add_scalar(f"{stage.name}/{k}", float(v), step)
            window_items, window_t0 = 0, time.perf_counter()
        if stage.evaluate is not None and (step % tc.eval_every == 0 or step == tc.steps):
            model.eval()
            with accelerator.autocast(), whole_weights(model, accelerator):
                results = stage.evaluate(unwrapped, step)
            model.train()
            logged.update({f"eval/{k}": v for k, v in results.items()})
            if writer is not None:
                for k, v in results.items():
                    writer.add_scalar(f"{stage.name}/eval/{k}", float(v), step)
        grid_step = step % tc.image_every == 0 or step == 1
        if stage.log_images is not None and grid_step and (writer is not None or sharded):
            model.eval()
            with whole_weights(model, accelerator):
                grids = stage.log_images(unwrapped, step)
            model.train()
            for tag, value in grids.items() if writer is not None else ():
                if isinstance(value, str):
                    writer.add_text(tag, value, step)
                else:
                    writer.add_image(tag, value, step)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            checkpoint()
        _fault_point("step", step)
    bar.close()
    if not sharded:  # shards differ by design; the digest compares whole weights
        logged["ranks_in_sync"] = float(_ranks_in_sync(accelerator, unwrapped))
    logged["num_processes"] = float(accelerator.num_processes)

    accelerator.wait_for_everyone()
    if stage.export is not None:
        if ema is not None:
            ema.copy_to(unwrapped)
        state = full_state_dict(model, accelerator, prefix="model.")  # every process joins the gather
        if is_main:
            stage.export(unwrapped, state)
    if writer is not None:
        writer.flush()
        writer.close()
    accelerator.wait_for_everyone()
    return logged


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


def _fault_point(where: str, step: int) -> None:
    """Fault injection for the reliability tests: DALLE_MINI_IMPL_KILL_AT=step:N or checkpoint:N.

    `step:N` SIGKILLs the process right after step N; `checkpoint:N` SIGKILLs it in the middle of
    writing checkpoint N (after the model and optimizer, before the folder is complete). Unset, it
    does nothing.
    """
    target = os.environ.get("DALLE_MINI_IMPL_KILL_AT")
    if target and target == f"{where}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class _LossModule(torch.nn.Module):
    def __init__(self, stage: Stage):
        super().__init__()
        self.model = stage.model
        self._loss = stage.loss

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(self.model, batch, step)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _save_extra(obj: Any, path: Path) -> None:
    """Checkpoint an extra module or optimizer; optimizers go through torch.save of tensors only."""
    if isinstance(obj, torch.nn.Module):
        save_state_dict({k: v.clone() for k, v in obj.state_dict().items()}, path)
    else:
        torch.save(obj.state_dict(), path.with_suffix(".pt"))


def _load_extra(obj: Any, path: Path) -> None:
    if isinstance(obj, torch.nn.Module):
        obj.load_state_dict(load_state_dict(path))
    else:
        obj.load_state_dict(torch.load(path.with_suffix(".pt"), map_location="cpu", weights_only=True))


def _save_checkpoint(accelerator, root: Path, step: int, bad_total: int, stage: Stage, ema, keep: int) -> None:
    """Write a checkpoint to a temporary folder, then rename it into place; keep the newest `keep`."""
    final = root / f"step_{step:08d}"
    tmp = root / f"tmp-step_{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    _fault_point("checkpoint", step)
    (tmp / f"data_{accelerator.process_index}.json").write_text(json.dumps(stage.batches.state_dict()))
    if accelerator.is_main_process:
        if ema is not None:
            save_state_dict(ema.shadow, tmp / "ema.safetensors")
        for name, obj in stage.extra_state.items():
            _save_extra(obj, tmp / f"{name}.safetensors")
        # trainer_state.json is written last: its presence marks the folder complete
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "bad_steps": bad_total}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
