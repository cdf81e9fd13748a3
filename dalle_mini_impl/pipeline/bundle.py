"""Bundles: a trained model as a folder of plain files, loaded without unpickling anything.

    BUNDLE/
      config.json              the resolved RunConfig
      text.model               the sentencepiece model
      vae.safetensors          image tokenizer weights (+ vae.json, its own config: loadable by `vae` alone)
      transformer.safetensors  the DALL-E transformer (+ transformer.json, its resolved TransformerConfig)
      clip.safetensors         CLIP
      unclip.safetensors       optional: unCLIP's decoder, a transformer reading CLIP image embeddings (+ unclip.json)
      prior.safetensors        optional: unCLIP's prior, captions to CLIP image embeddings (+ prior.json)

Every write goes to a temporary name first and is renamed into place, so a killed run never leaves a
half-written file behind. Every read checks that the file exists, parses, and fits the model built from
the config (its shapes compared on the meta device first, so a side file edited to huge sizes allocates
nothing), and says in one sentence what to do when it does not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vae.io import first_line, shape_mismatch

from ..config import RunConfig, TransformerConfig, config_from_dict, config_to_dict, read_config_json, save_config
from ..errors import UserError
from ..files import locked, write_atomic

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the bundles shipped in the package, one folder each
# the model `python -m sample` and `python -m dalle_mini_impl.clip` use when no --model is given
SHIPPED_MODEL = ASSETS / "shapes"
# evaluation CLIPs (`python -m train.judge`, exported), one folder each: `eval emoji --judge NAME`. Not bundles: a
# judge holds config.json, text.model and clip.safetensors only, and grades models it is not part of
JUDGES = ASSETS / "judges"
SHIPPED_JUDGE = "emoji"  # the judge `eval emoji` and `eval recon --judge` grade with when none is named

FILES = {
    "config": "config.json",
    "text": "text.model",
    "vae": "vae.safetensors",
    "transformer": "transformer.safetensors",
    "clip": "clip.safetensors",
    "unclip": "unclip.safetensors",
    "prior": "prior.safetensors",
}
UNCLIP_PARTS = ("unclip", "prior")  # optional: a bundle without them refuses unCLIP's uses in one sentence


def shipped_models() -> list[str]:
    """The names of the bundles shipped in the package (`--model NAME`)."""
    return sorted(p.name for p in ASSETS.iterdir() if (p / FILES["config"]).is_file()) if ASSETS.is_dir() else []


def shipped_judges() -> list[str]:
    """The names of the evaluation CLIPs shipped in the package (`--judge NAME`)."""
    return sorted(p.name for p in JUDGES.iterdir() if (p / FILES["config"]).is_file()) if JUDGES.is_dir() else []


def judge_path(judge: str | os.PathLike) -> Path:
    """The folder `--judge` names: a folder `python -m train.judge` wrote, the name of a shipped judge (`emoji`), or
    else of a shipped bundle (whose CLIP then grades another model); a folder that exists wins over a shipped name,
    as for `--model`."""
    path = Path(judge)
    if not path.exists() and str(judge) in shipped_judges():
        return JUDGES / str(judge)
    path = bundle_path(path)
    if not path.is_dir():
        shipped = ", ".join(shipped_judges()) or "none in this install"
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UserError(
            f"--judge '{judge}' {what}; pass the folder python -m train.judge wrote or the name of a "
            f"shipped judge ({shipped})"
        )
    return path


def bundle_path(model: str | os.PathLike | None) -> Path:
    """The folder `--model` names: a folder path, the name of a shipped bundle (`emoji`), or None for shapes.

    A folder that exists wins over a shipped bundle of the same name.
    """
    if model is None:
        if not SHIPPED_MODEL.is_dir():
            raise UserError(
                f"the shipped model is missing at '{SHIPPED_MODEL}'; pass --model RUN_FOLDER with a trained bundle"
            )
        return SHIPPED_MODEL
    path = Path(model)
    if not path.exists() and str(model) in shipped_models():
        return ASSETS / str(model)
    return path


JUDGE_SUFFIX = "-judge"  # a judge's config name (train.judge): its preset's, with this after it


def _is_judge(folder: Path) -> bool:
    """Whether a folder is what train.judge writes, by its config.json's name (a CLIP-only run folder holds the
    same three files)."""
    try:
        return str(json.loads((folder / FILES["config"]).read_text()).get("name", "")).endswith(JUDGE_SUFFIX)
    except (OSError, ValueError, AttributeError):
        return False


def part_path(bundle: str | os.PathLike, part: str) -> Path:
    """The path of one part of a bundle; a missing folder or file is a one-sentence error."""
    bundle = bundle_path(bundle)
    if not bundle.is_dir():
        what = "is a file, not a folder" if bundle.exists() else "does not exist"
        raise UserError(
            f"model folder '{bundle}' {what}; pass --model with a trained bundle folder "
            f"or the name of a shipped one ({', '.join(shipped_models())})"
        )
    path = bundle / FILES[part]
    if not path.is_file() and _is_judge(bundle):
        raise UserError(
            f"model folder '{bundle}' is an evaluation CLIP (python -m train.judge wrote it), not a bundle; pass it "
            "to python -m dalle_mini_impl.eval emoji --judge, and a trained bundle to --model"
        )
    if not path.is_file():
        raise UserError(
            f"model folder '{bundle}' has no {FILES[part]}; it is incomplete: retrain or copy the whole bundle"
        )
    return path


def read_bundle_config(bundle: str | os.PathLike) -> RunConfig:
    return read_config_json(part_path(bundle, "config"))


def write_bundle_config(cfg: RunConfig, bundle: str | os.PathLike) -> None:
    save_config(cfg, Path(bundle) / FILES["config"])


# the config sections each training stage decides; the others belong to the stages that made them
STAGE_SECTIONS = {
    "tokenizer": ("text",),
    "vae": ("data", "vae", "train.vae", "train.vae_decoder"),
    "encode": ("data",),
    "dalle": ("transformer", "train.dalle", "sample"),
    "clip": ("clip", "train.clip"),
    "unclip": (
        "unclip.enabled",
        "unclip.cond_len",
        "unclip.init_from_transformer",
        "unclip.embedding_dropout",
        "unclip.caption_dropout",
        "unclip.grid",
        "unclip.grid_dropout",
        "unclip.grid_tokens",
        "train.unclip",
    ),
    "prior": ("unclip.prior", "train.prior"),
}
STAGE_SECTIONS["vae_decoder"] = STAGE_SECTIONS["vae"]  # train.vae's second phase decides the same sections


def record_stage_config(cfg: RunConfig, run: str | os.PathLike, stage: str) -> None:
    """Write the run's config.json so that it describes every artifact in the folder.

    The stage's own sections come from `cfg`; every other section is kept as the stage that trained
    it wrote it, so a later stage run with other overrides never misdescribes an earlier artifact.
    The stage's complete resolved config also goes to RUN/logs/<stage>/config.json.
    """
    run = Path(run)
    save_config(cfg, run / "logs" / stage / "config.json")
    path = run / FILES["config"]
    with locked(run / ".config.lock"):  # two stages of a run ending at once: each keeps the other's sections
        if not path.is_file():
            save_config(cfg, path)
            return
        merged = config_to_dict(read_config_json(path))
        mine = config_to_dict(cfg)
        for section in STAGE_SECTIONS[stage]:
            *parents, leaf = section.split(".")
            src, dst = mine, merged
            for p in parents:
                src, dst = src[p], dst[p]
            dst[leaf] = src[leaf]
        save_config(config_from_dict(merged), path)


def save_state_dict(
    state: dict[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors as safetensors atomically; floating tensors are cast to `dtype` when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    write_atomic(path, lambda tmp: save_file(out, str(tmp), metadata=metadata))


def save_module(module: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    # tied weights appear twice in state_dict(); safetensors refuses shared storage, so clone
    state = {k: v.clone() for k, v in module.state_dict().items()}
    save_state_dict(state, path, dtype=dtype)


_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def _corrupted(path, e: Exception) -> UserError:
    return UserError(
        f"weights file '{path}' is corrupted or not a safetensors file ({str(e).splitlines()[0][:80]}); "
        "re-download or retrain it"
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupted file is a one-sentence error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist; check the path or retrain")
    try:
        return load_file(str(path))
    except _READ_ERRORS as e:
        raise _corrupted(path, e) from None


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a safetensors file, read from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except _READ_ERRORS as e:
        raise _corrupted(path, e) from None


def _check_transformer_size(values: dict, shapes: dict, weights: Path, config: Path) -> None:
    """The config's depth and width must be the weights' (`shapes`, from their header) before a model of that size
    is built.

    A hand-edited transformer.json (depth 2**70, say) would otherwise spend forever building the model
    that `load_module` then finds does not fit.
    """
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    dim = shapes.get("text_pos.weight", (0, 0))[-1]
    for key, have in (("depth", depth), ("dim", dim)):
        if values.get(key) != have:
            raise UserError(
                f"'{config}' says {key} {values.get(key)!r} but '{weights}' holds a model of {key} {have}; "
                "use the transformer.json saved beside the weights"
            )


def _check_side_file(
    build: Callable[[], torch.nn.Module], shapes: dict, weights: Path, side: str, restore: str
) -> None:
    """The model `build()` makes from a side file's sizes must have the weights' names and shapes (`shapes`, from
    their header), compared on the meta device (`vae.io.shape_mismatch`) before the model is built for real.

    A hand-edited or corrupt side file ("heads": 1000000, a vocabulary of millions) would otherwise allocate
    gigabytes, or run out of memory, before `load_module` found that the weights do not fit it.
    """
    differs = shape_mismatch(build, shapes)
    if differs is not None:
        raise UserError(
            f"{side} does not describe the weights in '{weights}' ({differs}); restore the {restore} saved with "
            "them, or export the bundle again"
        )


def load_module(module: torch.nn.Module, path: str | os.PathLike, what: str | None = None) -> torch.nn.Module:
    """Load weights into `module` in place (cast to its dtypes); a mismatch says which config to use."""
    state = load_state_dict(path)
    own = module.state_dict()
    what = what or Path(path).stem
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            detail = f"'{k}' is {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model"
        elif missing:
            detail = f"'{missing[0]}' is missing from the file"
        else:
            detail = f"'{unexpected[0]}' is in the file but not in the model"
        raise UserError(
            f"weights file '{path}' does not fit the {what} built from this config ({detail}); "
            "load it with the config.json saved beside it, not another preset"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))
    return module


def load_vae(bundle: str | os.PathLike):
    """The image tokenizer of a bundle or run folder (vae.safetensors + vae.json), in eval mode."""
    import vae

    bundle = bundle_path(bundle)
    part_path(bundle, "vae")
    if not (Path(bundle) / "vae.json").is_file():
        raise UserError(f"model folder '{bundle}' has no vae.json; it is incomplete: retrain or copy the whole bundle")
    try:
        return vae.load_pretrained(bundle).eval()
    except vae.VAEError as e:
        raise UserError(str(e)) from None


def load_text_tokenizer(bundle: str | os.PathLike, cfg: RunConfig):
    """The sentencepiece tokenizer of a bundle or run folder, encoding to `cfg.text.text_len` ids."""
    from ..text.tokenizer import TextTokenizer

    return TextTokenizer.load(part_path(bundle, "text"), cfg.text.text_len, cfg.text.lowercase)


# what reading a side JSON and building its model raise when the file is no such model's: unreadable, not JSON,
# wrong types; sizes no tensor can have (negative, overflowing) fail as RuntimeErrors, on the meta device too, as
# do buffers the weights do not record (a rotary grid's attention masks) that this machine cannot hold
_SIDE_ERRORS = (OSError, UnicodeDecodeError, ValueError, TypeError, RuntimeError, OverflowError)


def _side_json(bundle: Path, part: str) -> Path:
    path = bundle / f"{part}.json"
    if not path.is_file():
        raise UserError(
            f"model folder '{bundle}' has no {path.name}; it is incomplete: retrain or copy the whole bundle"
        )
    return path


def load_transformer(bundle: str | os.PathLike, part: str = "transformer"):
    """The DALL-E transformer of a bundle or run folder (transformer.json + transformer.safetensors), in eval mode;
    part "unclip": unCLIP's decoder (unclip.json + unclip.safetensors)."""
    from ..model.transformer import DALLE

    bundle = bundle_path(bundle)
    weights = part_path(bundle, part)
    path = _side_json(Path(bundle), part)
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError("not an object")
        shapes = weight_shapes(weights)  # the header, read once for both checks
        _check_transformer_size(values, shapes, weights, path)
        cfg = _side_config(values, TransformerConfig)
        _check_side_file(lambda: DALLE(cfg), shapes, weights, f"'{path}'", path.name)
        model = DALLE(cfg)
    except _SIDE_ERRORS as e:
        raise UserError(
            f"'{path}' is not a valid transformer config ({first_line(e)}); retrain or copy the whole bundle"
        ) from None
    return load_module(model, weights, "transformer" if part == "transformer" else "unCLIP decoder").eval()


def _side_config(values: dict, cls: type):
    """A side JSON's config section; an unknown key or a wrong type is a ValueError, which the loaders report
    naming the file (a UserError of its own would name a key no --set of the user's holds)."""
    try:
        return config_from_dict(values, cls)
    except UserError as e:
        raise ValueError(str(e)) from None


def load_prior(bundle: str | os.PathLike):
    """unCLIP's prior of a bundle or run folder (prior.json + prior.safetensors), in eval mode."""
    from ..config import PriorConfig
    from ..model.prior import EmbeddingPrior

    bundle = bundle_path(bundle)
    weights = part_path(bundle, "prior")
    path = _side_json(Path(bundle), "prior")
    try:
        values = json.loads(path.read_text())
        geometry = {k: int(values[k]) for k in ("embed_dim", "text_vocab", "text_len", "pad_id")}
        if min(geometry["embed_dim"], geometry["text_vocab"], geometry["text_len"]) < 1:
            raise ValueError(f"sizes below 1: {geometry}")
        cfg = _side_config(values["prior"], PriorConfig)
        _check_side_file(
            lambda: EmbeddingPrior(cfg, **geometry), weight_shapes(weights), weights, f"'{path}'", path.name
        )
        model = EmbeddingPrior(cfg, **geometry)
    # a JSON that is no prior's: wrong types (a list for "prior" has no keys), sizes no model can have, or a noise
    # schedule (timesteps, which the weights do not record) longer than this machine can hold
    except (*_SIDE_ERRORS, KeyError, AttributeError) as e:
        raise UserError(f"'{path}' is not a valid prior config ({e!r}); retrain or copy the whole bundle") from None
    return load_module(model, weights, "unCLIP prior").eval()


def load_clip(bundle: str | os.PathLike, device: str | torch.device = "cpu"):
    """The CLIP of a bundle folder (config.json, text.model, clip.safetensors) as a `BundleClipScorer`."""
    import hashlib

    from ..clip.model import clip_from_config
    from ..clip.uses import BundleClipScorer
    from .pipeline import resolve_device  # one sentence for a device this machine lacks; "auto" picks one

    bundle = bundle_path(bundle)
    cfg = read_bundle_config(bundle)
    weights = part_path(bundle, "clip")
    device = resolve_device(device) if isinstance(device, str) else device
    tokenizer = load_text_tokenizer(bundle, cfg)
    config = part_path(bundle, "config")
    side = f"'{config}' (its clip, data and text sections, with the vocabulary of text.model)"
    try:
        shapes = weight_shapes(weights)
        _check_side_file(lambda: clip_from_config(cfg, tokenizer), shapes, weights, side, "config.json and text.model")
        model = clip_from_config(cfg, tokenizer)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:  # sizes no tensor can have: negative, overflowing
        raise UserError(
            f"'{config}' holds CLIP sizes no model can have ({first_line(e)}); restore the config.json saved with "
            "the bundle, or export it again"
        ) from None
    model = load_module(model, weights, "CLIP")
    digest = hashlib.sha256(part_path(bundle, "text").read_bytes()).hexdigest()
    return BundleClipScorer(model, tokenizer, source=str(bundle), device=device, tokenizer_digest=digest)
