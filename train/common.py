"""Pieces the stage entry points share: per-process data batches, the optimizer, seeding."""

from __future__ import annotations

import atexit
import functools
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dalle_mini_impl.config import RunConfig, TextConfig, TrainConfig

# seconds between two frames of a training bar written to a file or pipe (a log): a frame per step fills the log
LOG_BAR_SECONDS = 30.0


def progress_bar(main: bool, **kw) -> tqdm:
    """The bar of a stage's long work, on the main process: at a terminal redrawn as tqdm does; written to a
    file or pipe (a log), a frame every LOG_BAR_SECONDS. `TQDM_DISABLE=1` turns it off (an explicit `disable`
    would override tqdm's reading of it)."""
    if not main:
        kw["disable"] = True
    elif not sys.stderr.isatty():
        kw.setdefault("mininterval", LOG_BAR_SECONDS)
    return tqdm(dynamic_ncols=True, **kw)


def example_batches(cfg: RunConfig, split: str, batch_size: int, *, train: bool, accelerator):
    """Batches of (image, caption) for this process; the stream itself splits the data across processes."""
    from dalle_mini_impl.data.streams import ExampleStream, batches

    stream = ExampleStream(
        cfg.data,
        split,
        train=train,
        seed=cfg.seed,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    return batches(stream, batch_size)


# the stage that writes each part of a run folder, named when a later stage finds it missing
STAGE_OF = {"text": "tokenizer", "vae": "vae", "transformer": "dalle", "clip": "clip"}


def require_parts(run, *parts: str) -> None:
    """One sentence naming the stage to run first when the run folder lacks a part this stage reads (the bundle
    loaders' own sentence speaks of a model to pass with --model, which a training stage has no use for)."""
    from dalle_mini_impl.errors import UserError
    from dalle_mini_impl.pipeline.bundle import FILES

    for part in parts:
        if not (Path(run) / FILES[part]).is_file():
            raise UserError(
                f"run folder '{run}' has no {FILES[part]}; run python -m train.{STAGE_OF[part]} with the same "
                "--config and --out first (or python -m train.all, which runs every stage in order)"
            )


def check_text_settings(cfg: RunConfig) -> None:
    """The stage encodes captions with `cfg.text`; the run's text tokenizer was trained with the `text` section
    `train.tokenizer` recorded in config.json. A text_len or lowercase that differs builds a model the bundle's
    own config cannot load (or lowercases captions the tokenizer never saw so): one sentence instead."""
    from dalle_mini_impl.config import read_config_json
    from dalle_mini_impl.errors import UserError

    path = Path(cfg.out_dir) / "config.json"
    if not (path.is_file() and (Path(cfg.out_dir) / "text.model").is_file()):
        return
    mismatch = text_mismatch(cfg.text, read_config_json(path).text)
    if mismatch is not None:
        key, mine, want = mismatch
        raise UserError(
            f"config key 'text.{key}' is {mine!r} but the run's text tokenizer was trained with {want!r} "
            f"({path}); use the --config and --set the run was trained with, or train the tokenizer again with it in "
            "a new --out"
        )


def check_image_size(cfg: RunConfig) -> None:
    """One sentence when `data.image_size` differs from the run's config.json, which the run's other parts were
    trained at and which the bundle loads every part with: a part trained at another size could not be loaded."""
    from dalle_mini_impl.config import read_config_json
    from dalle_mini_impl.errors import UserError

    path = Path(cfg.out_dir) / "config.json"
    if not path.is_file():
        return
    recorded = read_config_json(path).data.image_size
    if cfg.data.image_size != recorded:
        raise UserError(
            f"config key 'data.image_size' is {cfg.data.image_size} but the run's config.json says {recorded} "
            f"({path}); use the --config and --set the run was trained with, or train at the new size in a new --out"
        )


def check_run_settings(cfg: RunConfig) -> None:
    """`check_text_settings` and `check_image_size`: a model trained into the run folder must read the captions and
    the image grid the run's other parts were made with, or the bundle could not load it."""
    check_text_settings(cfg)
    check_image_size(cfg)


def text_mismatch(mine: TextConfig, trained: TextConfig) -> tuple[str, object, object] | None:
    """(key, mine, trained) of the first setting that encodes captions into a tokenizer's ids (text_len,
    lowercase) where `mine` differs from what the tokenizer was trained with; None when none does."""
    for key in ("text_len", "lowercase"):
        if getattr(mine, key) != getattr(trained, key):
            return key, getattr(mine, key), getattr(trained, key)
    return None


def process_state():
    """accelerate's PartialState of this process (rank, count, device, barriers) for the stages that need no
    Accelerator, on the CPU too: `ACCELERATE_USE_CPU=true accelerate launch` sets up its processes through the
    Accelerator, which a bare PartialState() does not read, so that every process would take itself for the
    only one."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    destroy_process_group_at_exit()
    return state


@functools.cache  # registered once however many stages a process runs
def destroy_process_group_at_exit() -> None:
    """Destroy the process group when the process exits, while the interpreter is whole (pytorch issue 190489). It
    did not stop gloo's threads from aborting a finished process in finalisation now and then ("terminate called
    without an active exception", exit -6); the commands now exit without finalisation
    (`dalle_mini_impl.errors.exit_process`), and this stays for a process that ends another way."""

    def destroy() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(destroy)


def effective_lr(tc: TrainConfig, accelerator) -> float:
    """The base LR, linearly scaled by the number of processes and accumulation steps when asked."""
    return tc.lr * (accelerator.num_processes * tc.grad_accum if tc.scale_lr else 1)


def adamw(params, tc: TrainConfig, accelerator) -> torch.optim.AdamW:
    """AdamW with the stage's betas and LR over the parameters (or groups of them) that require gradients, which
    leaves out those `train.<stage>.freeze` froze; the fused kernel on GPUs."""
    fused = accelerator.device.type == "cuda"
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**group, "params": trainable(group["params"])} for group in params]
    else:
        params = trainable(params)
    return torch.optim.AdamW(
        params, lr=effective_lr(tc, accelerator), betas=tuple(tc.betas), weight_decay=tc.weight_decay, fused=fused
    )


def trainable(params) -> list[torch.nn.Parameter]:
    """The parameters that require gradients."""
    return [p for p in params if p.requires_grad]


def seed_everything(seed: int) -> None:
    """The same seed on every process, so every rank builds identical initial weights."""
    from accelerate.utils import set_seed

    set_seed(seed)
