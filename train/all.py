"""Train the whole pipeline from nothing: `python -m train.all --config configs/shapes.toml`.

Runs, in order, each as its own process with the same config and overrides:

    python -m train.tokenizer   sentencepiece on the captions      -> RUN/text.model
    python -m train.vae         the image tokenizer (then, with train.vae_decoder.steps, its decoder
                                alone on the fixed codes)          -> RUN/vae.safetensors, vae.json
    python -m train.encode      the data set, once, into token ids -> RUN/tokens/
    python -m train.dalle       the transformer                    -> RUN/transformer.safetensors
    python -m train.clip        CLIP, for reranking                -> RUN/clip.safetensors
    python -m train.unclip      unCLIP's decoder (unclip.enabled)  -> RUN/unclip.safetensors
    python -m train.prior       unCLIP's prior (unclip.enabled)    -> RUN/prior.safetensors

RUN (`out_dir`) is then a complete bundle: `python -m sample "a red circle" --model RUN`. A stage
whose output already exists is skipped, and a stage that was interrupted resumes from its last
checkpoint, so rerunning the command after a kill continues the work; `--force` runs every stage again, the
training stages from step 0, and a `--force` run that stopped is continued by the command without `--force`
(RUN/.force-pending.json lists the stages it has not redone). Ctrl-C (or SIGTERM to this
command) is passed to the stage running: a training stage finishes its step, saves a checkpoint there and
stops, and the command exits with its code (130 or 143); a second Ctrl-C stops the stage at once. On
several GPUs, run the same sequence with `accelerate launch -m train.<stage>` (docs/SCALING.md). Prints one JSON
line per stage with its wall time, and at the end the total beside `cpu_matmul_gflops`: the CPU's dense fp32 matmul rate
at the start and at the end (a shared machine's speed moves by 2x within minutes, docs/RESULTS.md, so a wall
time on the CPU is read beside the speed it ran at).

`--init-from BUNDLE_OR_RUN` fine-tunes a trained model instead of starting from nothing: the tokenizer stage
copies its text.model, and every later stage but encode starts from its weights (train.finetune);
`train.<stage>.steps=0` keeps a stage's part as the source has it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dalle_mini_impl.bench.speed import measure_peak
from dalle_mini_impl.config import add_config_args, config_from_args, read_config_json
from dalle_mini_impl.data.streams import check_source
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.files import write_atomic
from train.clip import check_config as check_clip_config
from train.dalle import check_unclip
from train.encode import check_ends, mirror_rule
from train.finetune import checked_source
from train.loop import STOP_SIGNALS, STOPPED_EXIT_CODES, aside_folder, check_training_values
from train.vae import check_phases

# the stages with no checkpoints to resume: each runs whole every time (encode reuses only the shards its
# digests say hold the same rows from the same image tokenizer)
UNTRAINED = ("tokenizer", "encode")
# a --force run's stages not yet redone, in RUN: {stage: "fresh" (its earlier checkpoints still in place: set aside
# before it starts) or "resume" (started under this --force: its checkpoints are this run's)}. A stopped --force run
# is continued by the command without --force, which would otherwise skip every stage whose earlier output exists
FORCE_PENDING = ".force-pending.json"
PENDING_STATES = ("fresh", "resume")
# the checkpoint folders of a training stage (RUN/checkpoints/NAME): the image tokenizer's two phases
CHECKPOINT_FOLDERS = {"vae": ("vae", "vae_decoder")}


def read_pending(out: Path) -> dict[str, str]:
    """The stages an earlier --force run left to redo; a file that is not such a record is one sentence."""
    path = out / FORCE_PENDING
    if not path.is_file():
        return {}
    try:
        pending = json.loads(path.read_text())
    except (OSError, ValueError):
        pending = None
    names = [module.split(".")[1] for module, _ in stages(None)]
    if not (isinstance(pending, dict) and all(k in names and v in PENDING_STATES for k, v in pending.items())):
        raise UserError(
            f"'{path}' is not the record of a --force run's stages left to redo; run with --force again (every "
            "stage from step 0), or delete the file (the stages whose output exists count as done)"
        )
    return pending


def set_aside_checkpoints(out: Path, name: str) -> None:
    """A forced training stage's earlier checkpoints, moved beside them before it starts (the stage itself does so
    only once its loop begins: a --force run stopped while the stage started up resumed them, the old run)."""
    for folder in CHECKPOINT_FOLDERS.get(name, (name,)):
        path = out / "checkpoints" / folder
        if path.is_dir() and any(path.iterdir()):
            aside = aside_folder(path)
            os.replace(path, aside)
            print(f"{folder} starts at step 0 (--force): moved its earlier checkpoints to {aside}", file=sys.stderr)


def write_pending(out: Path, pending: dict[str, str]) -> None:
    path = out / FORCE_PENDING
    if pending:
        write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(pending)))
    else:
        path.unlink(missing_ok=True)


def stages(cfg) -> list[tuple[str, str]]:
    """(stage module, the path in the run folder that marks it done), in order; unCLIP's two when enabled (every
    stage there is when cfg is None)."""
    unclip = [("train.unclip", "unclip.safetensors"), ("train.prior", "prior.safetensors")]
    return [
        ("train.tokenizer", "text.model"),
        ("train.vae", "vae.safetensors"),
        ("train.encode", "tokens/manifest.json"),
        ("train.dalle", "transformer.safetensors"),
        ("train.clip", "clip.safetensors"),
    ] + (unclip if cfg is None or cfg.unclip.enabled else [])


def check_only(only: str | None, names: list[str]) -> set[str] | None:
    """--only's comma list as a set of this config's stage names (spaces allowed around them); None: every stage.
    A name that is no stage here would make the command do nothing: one sentence instead."""
    if only is None:
        return None
    chosen = {name.strip() for name in only.split(",") if name.strip()}
    unknown = sorted(chosen - set(names))
    if not chosen or unknown:
        what = f"names no stage ({', '.join(unknown)})" if unknown else "is empty"
        raise UserError(
            f"--only {what} of this config; choose from {', '.join(names)} (unCLIP's need unclip.enabled=true)"
        )
    return chosen


def run_stage(cmd: list[str]) -> int:
    """Run one stage to its end; its exit code. The stage runs in its own session, so a terminal's Ctrl-C
    reaches this process alone, which passes it (and SIGTERM, and a hangup as SIGTERM) on, once per signal: the
    first stops a training stage with a checkpoint, a second Ctrl-C stops it at once (train.loop.StopRequest)."""
    started: list[subprocess.Popen] = []
    pending: list[int] = []  # a signal that came before the stage started: passed on once it has

    hup = getattr(signal, "SIGHUP", None)  # none on Windows

    def forward(signum, frame):
        if os.name == "nt" and signum == signal.SIGINT:  # no sessions there: the console's Ctrl-C reached the stage
            return
        signum = signal.SIGTERM if signum == hup else signum
        if started:
            started[0].send_signal(signum)
        else:
            pending.append(signum)

    # a closed terminal's SIGHUP stops the stage as SIGTERM does (it would outlive this process, and a rerun would
    # train beside it), unless it is ignored (nohup). Installed before the stage starts: a signal this process
    # ignored (Ctrl-C, for a job a script started in the background) would be ignored by the stage too, whereas a
    # handled one is the default there again
    hangup = () if hup is None or signal.getsignal(hup) == signal.SIG_IGN else (hup,)
    previous = {signum: signal.signal(signum, forward) for signum in (*STOP_SIGNALS, *hangup)}
    try:
        started.append(subprocess.Popen(cmd, start_new_session=True))
        for signum in pending:
            started[0].send_signal(signum)
        return started[0].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def changed_settings(cfg, out: Path, name: str) -> list[str]:
    """The `train.<name>` settings (and the VQ's decoder phase's) that differ from those the finished stage ran
    with (its logs/<name>/config.json), as "key then (now value)": train.all skips a finished stage, and a rerun
    with more steps once said nothing about what it did not do."""
    sections = [s for s in (name, "vae_decoder" if name == "vae" else None) if s and hasattr(cfg.train, s)]
    path = out / "logs" / name / "config.json"
    if not sections or not path.is_file():
        return []
    try:
        then = read_config_json(path)
    except UserError:  # a damaged log is no reason to stop a skip
        return []
    changed = []
    for section in sections:
        old, new = getattr(then.train, section), getattr(cfg.train, section)
        for field in dataclasses.fields(new):
            if getattr(old, field.name) != getattr(new, field.name):
                changed.append(
                    f"train.{section}.{field.name} {getattr(old, field.name)!r} (now {getattr(new, field.name)!r})"
                )
    return changed


def cpu_matmul_gflops() -> float:
    """The CPU's dense fp32 matmul rate now, in GFLOP/s: the best of 4 at 1024^3 (a quarter of a second here). On
    the CPU only: measuring a GPU from this process would hold a CUDA context beside every stage's."""
    return round(measure_peak(torch.device("cpu"), "fp32", 1024, reps=4)["fp32_flops"] / 1e9, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--only", default=None, help="comma list of stages to run, e.g. vae,encode")
    parser.add_argument(
        "--force",
        action="store_true",
        help="run every stage again, the training stages from step 0 (their earlier checkpoints are set aside)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="BUNDLE_OR_RUN",
        help="fine-tune: every stage but encode starts from this model's weights and keeps its text tokenizer",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args)  # fail here, once, on a bad config
    check_source(cfg.data.source, cfg.data.split)  # a missing --data path, named before any other complaint
    check_clip_config(cfg)
    check_unclip(cfg)
    check_phases(cfg)
    for module, _ in stages(cfg):  # a later stage's bad setting, named before the stages ahead of it train (hours)
        section = module.split(".")[1]
        if hasattr(cfg.train, section):
            check_training_values(getattr(cfg.train, section), f"train.{section}.")
    mirror_rule(cfg, cfg.data.split)  # a bad data.encode_flip_exclude, named before the stages ahead of encode
    if args.init_from:
        checked_source(args.init_from)
    passthrough = ["--config", args.config] + [f"--set={o}" for o in args.overrides]
    if args.data:
        passthrough += ["--data", args.data]
    if args.split:
        passthrough += ["--split", args.split]
    if args.out:
        passthrough += ["--out", args.out]
    only = check_only(args.only, [module.split(".")[1] for module, _ in stages(cfg)])
    out = Path(cfg.out_dir)
    if (only is None or "encode" in only) and (args.force or not (out / dict(stages(cfg))["train.encode"]).exists()):
        check_ends(cfg)  # an endless training split, before the stages ahead of encode train
    chosen = [module.split(".")[1] for module, _ in stages(cfg) if only is None or module.split(".")[1] in only]
    try:
        pending = read_pending(out)  # an earlier --force run's, kept for the stages this one does not choose
    except UserError as e:
        if not args.force:
            raise
        print(f"warning: {e}: this --force run writes a new one", file=sys.stderr)  # the sentence's own way out
        pending = {}
    if args.force:
        pending |= {name: "fresh" for name in chosen}
    write_pending(out, pending)
    speed = {"start": cpu_matmul_gflops()}
    total = time.perf_counter()
    for module, marker in stages(cfg):
        name = module.split(".")[1]
        if name not in chosen:
            continue
        if (out / marker).exists() and name not in pending:
            print(json.dumps({"stage": name, "skipped": f"{out / marker} exists"}), flush=True)
            changed = changed_settings(cfg, out, name)
            if changed:
                print(
                    f"stage {name} was done with other settings than these ({', '.join(changed)}); --force trains it "
                    f"again from step 0 (python -m {module} with these settings resumes its last checkpoint instead)",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        t0 = time.perf_counter()
        init = ["--init-from", args.init_from] if args.init_from and name != "encode" else []
        if pending.get(name) == "fresh":  # it would resume its last checkpoint at its last step: nothing trained
            if name not in UNTRAINED:
                set_aside_checkpoints(out, name)
            pending[name] = "resume"  # from here, whatever checkpoints it has are this --force run's
            write_pending(out, pending)
        code = run_stage([sys.executable, "-m", module, *passthrough, *init])
        if code in STOPPED_EXIT_CODES:
            again = "the command without --force" if args.force else "the same command"
            print(f"stage {module} stopped (exit code {code}); rerun {again} to resume", file=sys.stderr)
            return code
        if code != 0:
            again = "without --force " if args.force else ""
            raise UserError(f"stage {module} failed with exit code {code}; fix it and rerun {again}to resume")
        pending.pop(name, None)
        write_pending(out, pending)
        print(json.dumps({"stage": name, "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
    total_wall_s = round(time.perf_counter() - total, 1)
    speed["end"] = cpu_matmul_gflops()
    print(json.dumps({"bundle": str(out), "total_wall_s": total_wall_s, "cpu_matmul_gflops": speed}), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
