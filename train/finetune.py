"""Fine-tuning: start a stage from a trained model's weights (`--init-from`), and leave parameter groups untrained
(`train.<stage>.freeze`).

    python -m train.dalle --config configs/shapes.toml --init-from shapes --out runs/ft \\
        --set 'train.dalle.freeze=["embeddings"]'

`--init-from` names a bundle or run folder, or a shipped bundle (`shapes`). The stage builds its model from the
run's config as always, then copies the source's weights for that stage into it (`vae.safetensors`,
`transformer.safetensors`, `clip.safetensors`, `unclip.safetensors`, `prior.safetensors`), each cast to the
model's dtype; the optimizer, the LR schedule and the step start fresh. A tensor whose shape differs, or one that
only one side has, stops the stage with one sentence naming it. The weights are read only when the run has no
checkpoint of its own: a restarted command resumes its checkpoint and ignores `--init-from`.

The source's text tokenizer is kept, since its weights read that tokenizer's ids: a stage that reads text copies
the source's `text.model` into a run folder without one, and stops if the run holds another one; the stages that
read image ids (`train.dalle`, `train.unclip`) copy the source's image tokenizer (`vae.safetensors`, `vae.json`)
into a run folder without one, and keep a run's own (one fine-tuned by `train.vae --init-from`, say). The run's
config.json then describes the copied parts (the source's `text` and `vae` sections), so later stages, export and
sampling read the run folder as any other. unCLIP's decoder and prior read CLIP's embeddings: started from a
source whose CLIP is not the run's, they say so in one warning (`warn_if_other_clip`).

`freeze` names groups of one model (the `GROUPS` table below; every parameter belongs to exactly one). A frozen
group's parameters get `requires_grad = False`, so the optimizer (`train.common.adamw`) leaves them out and they
end the run bit-identical to where they started. `blocks.N` names one block of the models that have `blocks`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch

from dalle_mini_impl.config import RunConfig, read_config_json, save_config
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.files import write_atomic
from dalle_mini_impl.pipeline.bundle import (
    FILES,
    bundle_path,
    load_state_dict,
    part_path,
    read_bundle_config,
    shipped_models,
)
from train.common import process_state, text_mismatch

# Each model's parameter groups: a group holds the parameters named by one of its entries, or under it ("blocks"
# holds "blocks.0.attn.qkv.weight"). Earlier groups win, so "projections" takes CLIP's visual.proj before
# "image_tower" takes the rest of visual.*.
GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    # dalle_mini_impl.model.transformer.DALLE: train.dalle, and unCLIP's decoder (train.unclip)
    "transformer": {
        "embeddings": ("text_emb", "image_emb", "text_pos", "row_pos", "col_pos"),  # token and position tables
        # unCLIP's decoder only: the CLIP embedding's projections (of the grid's cells too) and position vectors
        "condition": ("cond_proj", "cond_pos", "cond_token_proj"),
        "blocks": ("blocks",),
        "norm": ("norm",),  # the final norm
        "head": ("head",),
    },
    # dalle_mini_impl.clip.model.CLIP: train.clip
    "clip": {
        "projections": ("visual.proj", "text.proj"),  # each tower's map into the shared embedding
        "image_tower": ("visual",),
        "text_tower": ("text",),
        "logit_scale": ("logit_scale",),
    },
    # vae.DiscreteVAE and vae.VQ: train.vae
    "vae": {
        "encoder": ("encoder", "ink_encoder", "to_lookup"),
        # a frozen VQ codebook also stops its moving-average updates and dead-code restarts
        "codebook": ("codebook", "quantizer"),
        "decoder": ("from_lookup", "decoder"),
        "discriminator": ("discriminator",),  # VQ with vae.disc_start >= 0: the patch critic
    },
    # dalle_mini_impl.model.prior.EmbeddingPrior: train.prior
    "prior": {
        "embeddings": ("text_emb", "text_pos"),
        "inputs": ("text_in", "level_in", "x_in", "slots"),  # text embedding, noise level, noisy x, slot vectors
        "blocks": ("blocks",),
        "norm": ("norm",),
        "head": ("out",),
    },
}
MODEL_NAMES = {"transformer": "transformer", "clip": "CLIP", "vae": "image tokenizer", "prior": "unCLIP prior"}
# what a size mismatch suggests
FIX = "fine-tune with the sizes it was trained with (its config.json), or leave out --init-from"


# ----------------------------------------------------------------------------------------------
# --init-from
# ----------------------------------------------------------------------------------------------


def init_source(cfg: RunConfig, args, stage: str, *phases: str) -> Path | None:
    """The folder `--init-from` names, or None: none given, or the run resumes a checkpoint of its own (of the
    stage, or of a later phase of it: train.vae's vae_decoder)."""
    given = getattr(args, "init_from", None)
    if not given:
        return None
    source = checked_source(given)
    if any(resuming(cfg, args, name) for name in (stage, *phases)):
        if _is_main():
            print(f"{stage}: the run resumes its own checkpoint; --init-from {given} is not read", flush=True)
        return None
    return source


def resuming(cfg: RunConfig, args, stage: str) -> bool:
    """Whether the stage's run continues a checkpoint of its own (`loop.checkpoint_to_resume`)."""
    from train.loop import checkpoint_to_resume

    return checkpoint_to_resume(Path(cfg.out_dir) / "checkpoints" / stage, args, say=False) is not None


def checked_source(given: str) -> Path:
    """The bundle or run folder a `--init-from` value names; anything else is a one-sentence error."""
    source = bundle_path(given)
    if not source.is_dir():
        raise UserError(
            f"--init-from '{given}' is not a folder; pass a bundle or run folder, or a shipped model's name "
            f"({', '.join(shipped_models())})"
        )
    return source


def load_weights(
    model: torch.nn.Module, path: Path, what: str, *, keep_own: tuple[str, ...] = (), fix: str = FIX, adapt=None
) -> None:
    """Copy a safetensors file into `model` in place, each tensor cast to the model's dtype. Every tensor of the
    model must be in the file with its shape, but those in `keep_own`, which keep their initialisation when the
    file lacks them; the file may hold nothing else. A difference is one sentence naming the tensor, and `fix`.
    adapt(state, model) -> state: a change of the file's tensors first (e.g. `train.dalle.widen_to_grid`)."""
    state = load_state_dict(path)
    if adapt is not None:
        state = adapt(state, model)
    own = model.state_dict()
    for name, tensor in own.items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"'{name}' is {tuple(state[name].shape)} in '{path}' but {tuple(tensor.shape)} in the {what} "
                f"this config builds; {fix}"
            )
    unexpected = [name for name in state if name not in own]
    if unexpected:
        raise UserError(f"'{path}' holds '{unexpected[0]}', which the {what} this config builds has not; {fix}")
    missing = [name for name in own if name not in state and name not in keep_own]
    if missing:
        raise UserError(f"'{path}' has no '{missing[0]}', which the {what} this config builds has; {fix}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype))


def start_from(model: torch.nn.Module, source: Path, part: str, what: str, cfg: RunConfig, stage: str, **kw) -> None:
    """Load the `part` of `source` into `model` (`load_weights`), and note where the run started in
    RUN/logs/<stage>/init_from.json."""
    path = part_path(source, part)
    load_weights(model, path, what, **kw)
    if _is_main():
        logs = Path(cfg.out_dir) / "logs" / stage
        logs.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"source": str(source), "weights": str(path)}, indent=2) + "\n"
        write_atomic(logs / "init_from.json", lambda tmp: tmp.write_text(text))
        print(f"{stage}: starts from the weights of {path}", flush=True)


def same_weights(ours: Path, theirs: Path) -> bool:
    """Whether two safetensors files hold the same model: the same tensors, each compared in the lower of the two
    precisions (an exported bundle's fp16 CLIP is its run's fp32 one, cast)."""
    a, b = load_state_dict(ours), load_state_dict(theirs)
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            return False
        low = x.dtype if x.element_size() <= y.element_size() else y.dtype
        if not torch.equal(x.to(low), y.to(low)):
            return False
    return True


def warn_if_other_clip(source: Path, cfg: RunConfig, what: str) -> None:
    """unCLIP's decoder and prior read CLIP's embeddings: started from a source trained on another CLIP than the
    run's, they start from weights for another embedding space. Said once, in one line (a warning, not an error:
    fine-tuning can relearn it, at a cost the user should choose knowingly)."""
    theirs, ours = source / FILES["clip"], Path(cfg.out_dir) / FILES["clip"]
    if not (theirs.is_file() and ours.is_file()) or same_weights(ours, theirs) or not _is_main():
        return
    warnings.warn(
        f"the run's {FILES['clip']} is not the CLIP '{source}' was trained with, so its {what} starts reading "
        f"another CLIP's embeddings; copy '{theirs}' into '{cfg.out_dir}' to fine-tune it on "
        "the CLIP it knows",
        stacklevel=2,
    )


def adopt_text_tokenizer(source: Path, cfg: RunConfig, accelerator=None) -> None:
    """Make the run's text.model the source's: copied into a run without one; another one is an error. The
    run's `text.text_len` and `text.lowercase` must be the source's, which encode captions into its ids."""
    theirs = part_path(source, "text")
    mismatch = text_mismatch(cfg.text, read_bundle_config(source).text)
    if mismatch is not None:
        key, mine, want = mismatch
        literal = str(want).lower() if isinstance(want, bool) else want
        raise UserError(
            f"config key 'text.{key}' is {mine!r} but '{source}' was trained with {want!r}; "
            f"add --set text.{key}={literal} to fine-tune it"
        )
    _copy_if_missing(source, cfg, [FILES["text"]], "text", accelerator)
    ours = Path(cfg.out_dir) / FILES["text"]
    if ours.read_bytes() != theirs.read_bytes():
        raise UserError(
            f"'{ours}' is not the text tokenizer of '{source}', whose weights read that tokenizer's ids; "
            "fine-tune into a new run folder, or copy its text.model there"
        )


def adopt_image_tokenizer(source: Path, cfg: RunConfig, accelerator=None) -> None:
    """Copy the source's image tokenizer (vae.safetensors, vae.json) into a run that has none; a run's own is kept."""
    _copy_if_missing(source, cfg, [FILES["vae"], "vae.json"], "vae", accelerator)


def _copy_if_missing(source: Path, cfg: RunConfig, names: list[str], section: str, accelerator) -> None:
    """When the run folder lacks names[0]: copy `names` from `source` into it, and the config section that
    describes them from the source's config.json into the run's. The main process copies; every process takes
    the same decision and waits for the copy."""
    run = Path(cfg.out_dir)
    wait = accelerator.wait_for_everyone if accelerator is not None else lambda: None
    wait()  # every process looks before any copies
    missing = not (run / names[0]).is_file()
    wait()
    if not missing:
        return
    for name in names:
        if not (source / name).is_file():
            raise UserError(
                f"model folder '{source}' has no {name}; it is incomplete: retrain or copy the whole bundle"
            )
    if _is_main():
        run.mkdir(parents=True, exist_ok=True)
        for name in names[1:]:
            _copy_atomic(source / name, run / name)
        path = run / FILES["config"]
        recorded = read_config_json(path) if path.is_file() else cfg
        save_config(dataclasses.replace(recorded, **{section: getattr(read_bundle_config(source), section)}), path)
        _copy_atomic(source / names[0], run / names[0])  # last: its presence marks the copy complete
        print(f"copied {', '.join(names)} from {source} into {run}", flush=True)
    wait()


def _copy_atomic(source: Path, dest: Path) -> None:
    """Copy a file through a temporary name, so that a killed copy never leaves a truncated `dest`."""
    write_atomic(dest, lambda tmp: shutil.copyfile(source, tmp))


def _is_main() -> bool:
    """Whether this is the main process (of `accelerate launch`, or the only one)."""
    return process_state().is_main_process


# ----------------------------------------------------------------------------------------------
# freeze
# ----------------------------------------------------------------------------------------------


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def group_of(kind: str, name: str) -> str:
    """The group (a key of GROUPS[kind]) that the parameter or saved buffer `name` of a `kind` model belongs to."""
    for group, prefixes in GROUPS[kind].items():
        if any(_under(name, p) for p in prefixes):
            return group
    raise KeyError(f"parameter '{name}' of the {kind} model is in no group of train.finetune.GROUPS; add it there")


def group_names(model: torch.nn.Module, kind: str) -> list[str]:
    """The groups `model` has weights in (parameters, or saved buffers such as an EMA codebook), in GROUPS order,
    then `blocks.N` for each of its blocks."""
    names = list(model.state_dict())
    present = {group_of(kind, n) for n in names}
    groups = [g for g in GROUPS[kind] if g in present]
    blocks = sorted({int(n.split(".")[1]) for n in names if group_of(kind, n) == "blocks"})
    return groups + [f"blocks.{i}" for i in blocks]


def freeze(model: torch.nn.Module, kind: str, groups: list[str], stage: str, key: str = "") -> None:
    """Turn off the gradients of the named groups' parameters (`train.<stage>.freeze`, or `<key>freeze` where the
    settings are elsewhere: the judge's `judge.train.`); an unknown name, or one that leaves nothing to train, is
    a one-sentence error."""
    if not groups:
        return
    key = key or f"train.{stage}."
    valid = group_names(model, kind)
    for g in groups:
        if g not in valid:
            raise UserError(
                f"{key}freeze names '{g}', which is not a parameter group of the {MODEL_NAMES[kind]}; "
                f"choose from: {', '.join(valid)}"
            )
    for name, p in model.named_parameters():
        if group_of(kind, name) in groups or any(_under(name, g) for g in groups if g.startswith("blocks.")):
            p.requires_grad_(False)
    # the VQ's patch critic has an optimizer of its own: the main one needs something besides it
    if not any(p.requires_grad for n, p in model.named_parameters() if not _under(n, "discriminator")):
        raise UserError(
            f"{key}freeze = {groups} freezes every parameter of the {MODEL_NAMES[kind]}; leave a group to train"
        )
    quantizer = getattr(model, "quantizer", None)
    if kind == "vae" and "codebook" in groups and quantizer is not None:
        # the VQ codebook also moves without the optimizer (EMA, dead-code restarts): its update does nothing now
        quantizer.update = lambda z, ids: torch.zeros((), dtype=torch.long, device=z.device)


def main(argv: list[str] | None = None) -> int:
    """`python -m train.finetune` is no command (it printed nothing and exited 0): one sentence naming the ones."""
    raise UserError(
        "train.finetune is what --init-from runs, not a command of its own; fine-tune with python -m train.all "
        "--init-from BUNDLE or python -m train.STAGE --init-from BUNDLE (docs/TRAINING.md)"
    )


if __name__ == "__main__":
    run_cli(main)
