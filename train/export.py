"""Copy a trained run folder into a compact bundle: `python -m train.export RUN DEST [--dtype fp16]`.

Copies config.json, text.model, vae.json and transformer.json (and unclip.json, prior.json when the run has
unCLIP's parts), and rewrites each safetensors file (vae, transformer, clip, unclip, prior) with its
floating-point tensors cast to `--dtype` (fp16 halves the size; loading casts back to the model's dtype).
A VQ's patch critic (`vae.disc_start`) only trains the decoder, so it stays behind: the bundle's vae.json has
`disc_start` -1 and its weights no `discriminator.*` (a fine-tune from the bundle starts a fresh critic).
`--set sample.KEY=VALUE` changes the bundle's sampling defaults (the `[sample]` settings `python -m sample`
starts from) when they were chosen after training, as `eval --set sample.KEY=VALUE` measures them; nothing
else of a trained model's config can change.
A data source that names files on this machine is not carried into the bundle (`data.source` becomes
empty: an evaluation of the bundle asks for `--data`); `shapes` and hub names are. Checkpoints, logs and
token shards stay behind. The shipped models in dalle_mini_impl/assets are such
bundles (`--dtype fp16`).

An evaluation CLIP's folder (`python -m train.judge`: config.json, text.model, clip.safetensors and no image
tokenizer or transformer) exports the same way, as those three files: the judge shipped in
dalle_mini_impl/assets/judges is one (`--judge emoji`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from dalle_mini_impl.config import apply_sample_overrides, read_config_json, save_config
from dalle_mini_impl.data.streams import is_local_source
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.files import file_above, write_atomic
from dalle_mini_impl.pipeline.bundle import FILES, UNCLIP_PARTS, load_state_dict, part_path, save_state_dict
from dalle_mini_impl.pipeline.pipeline import check_settings
from train.judge import is_judge
from vae.vq import CRITIC_PREFIX

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIDE_FILES = ("vae.json", "transformer.json")


def clip_only(run: Path) -> bool:
    """Whether `run` is an evaluation CLIP's folder: its config a judge's (train.judge's), and a CLIP in it. A run
    folder with a CLIP and no transformer yet is an unfinished run, refused as one."""
    config = run / FILES["config"]
    return config.is_file() and is_judge(read_config_json(config)) and (run / FILES["clip"]).is_file()


def check_paths(run: Path, dest: Path) -> list[str]:
    """Every file the bundle needs is in the run and DEST can be a folder beside it, checked before anything is
    written (a half-written bundle would load as a broken one): the parts to copy (["clip"] alone for a judge)."""
    if not run.is_dir():
        raise UserError(f"run folder '{run}' does not exist; pass the folder train.all (or train.<stage>) wrote")
    if dest.resolve() == run.resolve():
        raise UserError(f"DEST '{dest}' is the run folder itself; write the bundle to another folder")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"DEST '{dest}' is a file; pass a folder (new, or a bundle to replace)")
    above = file_above(dest)
    if above is not None:
        raise UserError(f"DEST '{dest}' is under '{above}', which is a file; pass another folder")
    for kept in ("checkpoints", "tokens", "logs"):  # a run folder: its files would be written over, and its stages
        if (dest / kept).exists():  # then look done to train.all
            raise UserError(f"DEST '{dest}' holds {kept}/, so it is a run folder; write the bundle to another folder")
    judge = clip_only(run)
    for name in (FILES["config"], FILES["text"], *(() if judge else SIDE_FILES)):
        if not (run / name).is_file():
            raise UserError(f"run folder '{run}' has no {name}; finish training every stage first")
    if judge:
        return ["clip"]
    parts = ["vae", "transformer", "clip"] + [p for p in UNCLIP_PARTS if (run / FILES[p]).is_file()]
    for part in parts:
        part_path(run, part)  # one sentence naming a missing weights file
        if part in UNCLIP_PARTS and not (run / f"{part}.json").is_file():
            raise UserError(f"run folder '{run}' has {FILES[part]} but no {part}.json; retrain that stage")
    return parts


def without_critic(state: dict[str, torch.Tensor], vae_json: Path) -> dict[str, torch.Tensor]:
    """The tokenizer's weights without a VQ's patch critic, and `vae_json` (the bundle's copy) rewritten to build
    none (`disc_start` -1); a tokenizer without one is returned as it is."""
    meta = json.loads(vae_json.read_text())
    kwargs = meta["kwargs"]
    if kwargs.get("disc_start", -1) < 0:
        return state
    kwargs["disc_start"] = -1
    text = json.dumps(meta, indent=2) + "\n"
    write_atomic(vae_json, lambda tmp: tmp.write_text(text))
    return {name: t for name, t in state.items() if not name.startswith(CRITIC_PREFIX)}


def copy_atomic(source: Path, dest: Path) -> None:
    """A copy written whole or not at all (`files.write_atomic`): a bundle being loaded while it is exported again
    read half-copied files (text.model, transformer.json)."""
    write_atomic(dest, lambda tmp: shutil.copyfile(source, tmp))


def export(run: Path, dest: Path, dtype: torch.dtype, sample_overrides: list[str] = ()) -> dict:
    """Write the bundle; returns {file: bytes}. Parts a bundle in DEST had from an earlier export, and this run
    lacks (unCLIP's; for a judge, the image tokenizer's and transformer's too), are removed: the bundle is this
    run's alone."""
    parts = check_paths(run, dest)
    cfg = apply_sample_overrides(read_config_json(part_path(run, "config")), list(sample_overrides))
    # a bundle whose own defaults python -m sample refuses would refuse every use
    check_settings(cfg.sample, "the bundle's sampling settings (the run's, with --set)")
    if is_local_source(cfg.data.source):  # a path on this machine: meaningless, and private, where a bundle goes
        cfg.data.source = ""
    dest.mkdir(parents=True, exist_ok=True)
    sizes = {}
    save_config(cfg, dest / FILES["config"])
    copy_atomic(part_path(run, "text"), dest / FILES["text"])
    for name in () if parts == ["clip"] else SIDE_FILES:
        copy_atomic(run / name, dest / name)
    for part in parts:
        if part in UNCLIP_PARTS:
            copy_atomic(run / f"{part}.json", dest / f"{part}.json")
        state = load_state_dict(part_path(run, part))
        if part == "vae":
            state = without_critic(state, dest / "vae.json")
        save_state_dict(state, dest / FILES[part], dtype=dtype)
    for part in set(FILES) - {"config", "text"} - set(parts):
        for stale in (dest / FILES[part], dest / f"{part}.json"):
            stale.unlink(missing_ok=True)
    for path in sorted(dest.iterdir()):
        if path.is_file():
            sizes[path.name] = path.stat().st_size
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run folder (every stage done)")
    parser.add_argument("dest", help="the bundle folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="the weights' dtype (default: fp16)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="sample.KEY=VALUE",
        help="change a sampling default of the bundle (repeatable); e.g. --set sample.guidance_scale=2",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sizes = export(Path(args.run), Path(args.dest), DTYPES[args.dtype], args.overrides)
    print(json.dumps({"bundle": args.dest, "dtype": args.dtype, "bytes": sizes, "total_bytes": sum(sizes.values())}))
    return 0


if __name__ == "__main__":
    run_cli(main)
