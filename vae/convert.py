"""Convert the field's pretrained image tokenizers, once, into this package's safetensors + JSON format.

    python -m vae.convert openai encoder.pkl decoder.pkl OUT_DIR --trust-pickle
    python -m vae.convert taming last.ckpt model.yaml OUT_DIR --trust-pickle      # or the config as .json
    python -m vae.convert llamagen vq_ds16_c2i.pt OUT_DIR --trust-pickle

OUT_DIR then holds vae.safetensors and vae.json like any tokenizer trained here, so `vae.load_pretrained`
(and a bundle or run folder holding those two files) uses it without unpickling anything:
- openai: DALL-E's dVAE from OpenAI's encoder.pkl and decoder.pkl (`vae.imported.openai`);
- taming: a taming-transformers VQGAN (`VQModel`, e.g. the ImageNet f16 1024 / 16384 models) or Gumbel
  VQGAN (`GumbelVQ`, the f8 8192 model) from its Lightning checkpoint and the YAML config beside it
  (`vae.imported.taming`);
- llamagen: LlamaGen's VQ tokenizer (vq_ds16_c2i.pt, vq_ds8_c2i.pt), its architecture read off the tensors'
  shapes (`vae.imported.llamagen`).

The original files are pickles, which can run code when loaded. They are read here and nowhere else,
through `vae.unpickle`'s restricted unpickler, which builds tensors and turns every other object into
an inert record; still, the command asks for `--trust-pickle` to say the user knows the file is one.
Reading a YAML config needs PyYAML (`pip install pyyaml`), imported only here and only for a .yaml file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import ImageTokenizer, VAEError
from .imported import LlamaGenVQ, OpenAIDVAE, TamingVQGAN
from .io import copy_state, load_pretrained, save_pretrained
from .unpickle import Inert, load_untrusted, module_tensors

SOURCES = {
    "openai": ("encoder.pkl", "decoder.pkl"),
    "taming": ("CHECKPOINT.ckpt", "CONFIG.yaml"),
    "llamagen": ("CHECKPOINT.pt",),
}


# -- helpers -------------------------------------------------------------------------------------------


def load_into(model: ImageTokenizer, tensors: dict[str, torch.Tensor], source: str) -> ImageTokenizer:
    """Copy converted tensors into `model`; a missing, extra or mis-shaped tensor is a one-sentence error."""
    return copy_state(model, tensors, source, "pass the files that belong together").eval()


def _pickled_module(path: str, expected: str) -> Inert:
    """The stand-in of a whole pickled module of class `expected` (a dotted name)."""
    module = load_untrusted(path)
    found = module.name if isinstance(module, Inert) else type(module).__name__
    if found != expected:
        raise VAEError(f"'{path}' holds {found}, not {expected}; pass the files in the order the usage shows")
    return module


# -- OpenAI's dVAE -------------------------------------------------------------------------------------


def convert_openai(encoder_path: str, decoder_path: str) -> OpenAIDVAE:
    """DALL-E's dVAE from OpenAI's encoder.pkl and decoder.pkl (whole pickled `dall_e` modules)."""
    encoder = module_tensors(_pickled_module(encoder_path, "dall_e.encoder.Encoder"))
    decoder = module_tensors(_pickled_module(decoder_path, "dall_e.decoder.Decoder"))
    # the architecture from the tensors' shapes: the widths of the stems, the blocks of the first group
    model = OpenAIDVAE(
        codebook_size=encoder["blocks.output.conv.w"].shape[0],
        hidden=encoder["blocks.input.w"].shape[0],
        blocks_per_group=sum(1 for k in encoder if k.startswith("blocks.group_1.") and k.endswith("conv_1.w")),
        init_channels=decoder["blocks.input.w"].shape[0],
    )
    tensors = {f"encoder.{k}": v for k, v in encoder.items()} | {f"decoder.{k}": v for k, v in decoder.items()}
    return load_into(model, tensors, f"'{encoder_path}' with '{decoder_path}'")


# -- taming-transformers' VQGAN ------------------------------------------------------------------------

# the state_dict's parts that encode and decode; the rest (`loss.*`: LPIPS and the discriminator) trains
TAMING_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantize")
TAMING_TARGETS = {"taming.models.vqgan.VQModel": "vq", "taming.models.vqgan.GumbelVQ": "gumbel"}


def read_config(path: str) -> dict[str, Any]:
    """A YAML (needs PyYAML) or JSON config file as a dict."""
    file = Path(path)
    if not file.is_file():
        raise VAEError(f"config file '{path}' does not exist; pass the .yaml that came with the checkpoint")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VAEError(
            f"config file '{path}' is not text (a checkpoint?); the command takes CHECKPOINT then CONFIG, in that order"
        ) from None
    if file.suffix.lower() == ".json":
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise VAEError(f"'{path}' is not valid JSON ({e}); pass the config that came with the checkpoint") from None
    else:
        try:
            import yaml  # optional: only this command reads YAML
        except ImportError:
            raise VAEError(f"reading '{path}' needs PyYAML: pip install pyyaml, or pass the config as JSON") from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            reason = str(e).splitlines()[0]
            raise VAEError(
                f"'{path}' is not valid YAML ({reason}); pass the config that came with the checkpoint"
            ) from None
    if not isinstance(config, dict):
        raise VAEError(f"'{path}' does not hold a mapping; pass the config that came with the checkpoint")
    return config


def taming_kwargs(config: dict[str, Any], path: str) -> dict[str, Any]:
    """`TamingVQGAN`'s arguments from a taming config (`model: {target, params: {ddconfig, ...}}`)."""
    model = config.get("model", config)
    target = model.get("target") if isinstance(model, dict) else None
    if target not in TAMING_TARGETS:
        raise VAEError(f"'{path}' describes {target!r}, not {' or '.join(TAMING_TARGETS)}; pass the VQGAN's own config")
    try:
        params = model["params"]
        dd = params["ddconfig"]
        unsupported = (
            params.get("remap") is not None or dd.get("double_z") or (dd["in_channels"], dd["out_ch"]) != (3, 3)
        )
        kwargs = dict(
            codebook_size=int(params["n_embed"]),
            embed_dim=int(params["embed_dim"]),
            ch=int(dd["ch"]),
            ch_mult=[int(m) for m in dd["ch_mult"]],
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=[int(r) for r in dd["attn_resolutions"]],
            resolution=int(dd["resolution"]),
            z_channels=int(dd["z_channels"]),
            resamp_with_conv=bool(dd.get("resamp_with_conv", True)),
            quantizer=TAMING_TARGETS[target],
        )
    except KeyError as e:
        raise VAEError(f"'{path}' lacks the setting {e}; pass the config that came with the checkpoint") from None
    except (TypeError, ValueError) as e:  # a setting of the wrong type or shape: say what Python said of it
        raise VAEError(
            f"'{path}' has a setting of the wrong type ({e}); pass the config that came with the checkpoint"
        ) from None
    if unsupported:
        raise VAEError(f"'{path}' uses remap, double_z or non-RGB images, which this converter does not support")
    return kwargs


def convert_taming(checkpoint_path: str, config_path: str) -> TamingVQGAN:
    """A taming VQGAN from its Lightning checkpoint (`state_dict` inside) and its YAML or JSON config."""
    kwargs = taming_kwargs(read_config(config_path), config_path)
    checkpoint = load_untrusted(checkpoint_path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise VAEError(f"'{checkpoint_path}' has no state_dict; pass the Lightning checkpoint (.ckpt) of the VQGAN")
    tensors = {k: v for k, v in state.items() if k.split(".")[0] in TAMING_PARTS}
    try:
        model = TamingVQGAN(**kwargs)
    except (ValueError, RuntimeError) as e:  # e.g. a channel count GroupNorm's 32 groups do not divide
        raise VAEError(
            f"config '{config_path}' describes no VQGAN taming's layers can build ({e}); pass the config that came "
            "with the checkpoint"
        ) from None
    return load_into(model, tensors, f"'{checkpoint_path}'")


# -- LlamaGen's VQ -------------------------------------------------------------------------------------

# where LlamaGen's checkpoints keep the weights, in the order its vq_demo looks for them
LLAMAGEN_WEIGHTS = ("ema", "model", "state_dict")


def _count(tensors: dict[str, torch.Tensor], prefix: str, suffix: str) -> int:
    """How many consecutive indices i have a tensor named f"{prefix}{i}{suffix}"."""
    n = 0
    while f"{prefix}{n}{suffix}" in tensors:
        n += 1
    return n


def llamagen_kwargs(tensors: dict[str, torch.Tensor], l2_norm: bool, source: str) -> dict[str, Any]:
    """`LlamaGenVQ`'s arguments read off the tensors' names and shapes (LlamaGen ships no config file)."""
    if any(k.startswith(("encoder.", "decoder.")) and k.endswith("running_mean") for k in tensors):
        raise VAEError(f"{source} uses batch norm (norm_type 'batch'), which this converter does not support")
    if "encoder.conv_blocks.0.res.0.conv1.weight" not in tensors:  # e.g. taming's names, encoder.down.*
        raise VAEError(f"{source} does not hold LlamaGen's encoder.conv_blocks; pass a LlamaGen tokenizer checkpoint")
    try:
        ch = tensors["encoder.conv_in.weight"].shape[0]
        levels = _count(tensors, "encoder.conv_blocks.", ".res.0.conv1.weight")
        decoder_mult = [
            tensors[f"decoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)
        ]  # the decoder's blocks run coarsest first
        return dict(
            codebook_size=tensors["quantize.embedding.weight"].shape[0],
            embed_dim=tensors["quantize.embedding.weight"].shape[1],
            ch=ch,
            encoder_ch_mult=[
                tensors[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)
            ],
            decoder_ch_mult=decoder_mult[::-1],
            num_res_blocks=_count(tensors, "encoder.conv_blocks.0.res.", ".conv1.weight"),
            z_channels=tensors["encoder.conv_out.weight"].shape[0],
            l2_norm=l2_norm,
        )
    except KeyError as e:
        raise VAEError(f"{source} lacks {e}, which every LlamaGen VQ model has; is it a LlamaGen tokenizer?") from None


def convert_llamagen(checkpoint_path: str) -> LlamaGenVQ:
    """LlamaGen's VQ tokenizer from its .pt checkpoint ({"model": state_dict}, or "ema" / "state_dict")."""
    checkpoint = load_untrusted(checkpoint_path)
    key = next(
        (k for k in LLAMAGEN_WEIGHTS if isinstance(checkpoint, dict) and isinstance(checkpoint.get(k), dict)), None
    )
    if key is None:
        raise VAEError(
            f"'{checkpoint_path}' has no {', '.join(LLAMAGEN_WEIGHTS)} weights; pass LlamaGen's tokenizer .pt file"
        )
    tensors = {k: v for k, v in checkpoint[key].items() if k != "quantize.codebook_used"}  # a training statistic
    # the released models normalise their codebook; a training run's saved args say so if they differ
    args = checkpoint.get("args")
    state = args.state if isinstance(args, Inert) and isinstance(args.state, dict) else {}
    l2_norm = bool(state.get("codebook_l2_norm", True))
    source = f"'{checkpoint_path}'"
    return load_into(LlamaGenVQ(**llamagen_kwargs(tensors, l2_norm, source)), tensors, source)


# -- the command ---------------------------------------------------------------------------------------


def convert(source: str, inputs: Sequence[str], out_dir: str) -> ImageTokenizer:
    """Convert the original files `inputs` of `source`, write OUT_DIR, and return the tokenizer read back
    from OUT_DIR through safetensors (so a conversion that would not load fails here, not later)."""
    if source not in SOURCES:
        raise VAEError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    if len(inputs) != len(SOURCES[source]):
        raise VAEError(f"{source} takes {' and '.join(SOURCES[source])} before OUT_DIR, got {len(inputs)} file(s)")
    converters = {"openai": convert_openai, "taming": convert_taming, "llamagen": convert_llamagen}
    model = converters[source](*inputs)
    try:
        save_pretrained(model, out_dir)
    except OSError as e:
        raise VAEError(
            f"cannot write the converted tokenizer to '{out_dir}' ({e.strerror}); pass a writable folder"
        ) from None
    return load_pretrained(out_dir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vae.convert",
        description="Convert a pretrained image tokenizer (pickled original files) to safetensors + vae.json.",
        epilog="openai: encoder.pkl decoder.pkl OUT_DIR; taming: CHECKPOINT.ckpt CONFIG.yaml|.json OUT_DIR; "
        "llamagen: CHECKPOINT.pt OUT_DIR",
    )
    parser.add_argument("source", choices=sorted(SOURCES), help="whose tokenizer the files hold")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="the original files, then the output folder")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read the original pickle files (only tensors are built; every other object stays an inert record)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.trust_pickle:
        raise VAEError(
            "the original checkpoint files are pickles, which can run code when loaded, so vae.convert reads "
            "them only when you pass --trust-pickle for files from a source you trust"
        )
    if len(args.paths) < 2:
        raise VAEError("pass the original files and then the output folder OUT_DIR")
    *inputs, out_dir = args.paths
    model = convert(args.source, inputs, out_dir)
    params = sum(p.numel() for p in model.parameters())
    summary = {"out": out_dir, "kind": model.kind, "codebook_size": model.codebook_size, "factor": model.factor}
    print(json.dumps(summary | {"parameters": params}))
    return 0


def run(argv: Sequence[str] | None = None) -> None:
    """`main` with a user's mistake reported as one sentence on stderr and exit code 2, no traceback."""
    try:
        code = main(argv)
    except VAEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
