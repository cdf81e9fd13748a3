"""A tiny but complete model bundle, built from scratch in about a second, for tests of what reads bundles.

    from tests.bundle_factory import make_tiny_bundle
    bundle = make_tiny_bundle(tmp_path / "bundle")      # config.json, text.model, vae.*, transformer.*, clip.*
    pipe = Pipeline.from_pretrained(bundle)

Every part is a real model of the real classes, with random weights (nothing is trained but the
sentencepiece tokenizer), sized to the numbers in `tiny_config`: 16 px images, a 4x4 grid of 32 codes,
12 text ids. The layout is the one `dalle_mini_impl.pipeline.bundle` documents and `train.all` writes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

import vae
from dalle_mini_impl.clip.model import clip_from_config
from dalle_mini_impl.config import CLIPConfig, RunConfig, config_to_dict
from dalle_mini_impl.pipeline.bundle import save_module, write_bundle_config
from dalle_mini_impl.text.tokenizer import TextTokenizer
from train.dalle import build_model
from train.prior import build_prior, prior_geometry

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "gray")
SHAPES = ("circle", "square", "triangle")
PLACES = ("", " on the left", " on the right", " at the top", " in the center")


# a CLIP small enough to build and train in milliseconds (tests/test_clip.py uses it too)
TINY_CLIP = dict(
    patch_size=4,
    image_width=32,
    image_depth=1,
    image_heads=2,
    text_width=32,
    text_depth=1,
    text_heads=2,
    embed_dim=16,
)


def tiny_captions() -> list[str]:
    """Shapes-style captions: every color, shape and place once."""
    return [f"a {c} {s}{p}" for c in COLORS for s in SHAPES for p in PLACES]


def tiny_config() -> RunConfig:
    """A RunConfig whose every stage is a few thousand parameters."""
    cfg = RunConfig(name="tiny", out_dir="unused")
    cfg.data.image_size = 16
    cfg.text.vocab_size = 320  # byte fallback alone takes about 280 pieces
    cfg.text.text_len = 12
    cfg.vae.kind = "dvae"
    cfg.vae.codebook_size = 32
    cfg.vae.factor = 4
    cfg.vae.hidden = 8
    cfg.vae.code_dim = 16
    cfg.transformer.dim = 32
    cfg.transformer.depth = 2
    cfg.transformer.heads = 2
    cfg.clip = CLIPConfig(**TINY_CLIP)
    cfg.sample.num_images = 2
    cfg.sample.candidates = 4
    cfg.sample.guided_steps = 8
    cfg.sample.guided_cutouts = 4
    cfg.unclip.cond_len = 2
    cfg.unclip.prior.dim = 32
    cfg.unclip.prior.depth = 1
    cfg.unclip.prior.heads = 2
    cfg.unclip.prior.sample_steps = 4
    return cfg


def make_tiny_bundle(
    folder: str | Path, *, clip: bool = True, seed: int = 0, cfg: RunConfig | None = None, unclip: bool = False
) -> Path:
    """Write a complete bundle of random models into `folder` (created); without clip.safetensors if not clip;
    with unCLIP's decoder and prior (unclip.*, prior.*) if unclip.

    cfg: the sizes (default `tiny_config()`); e.g. `load_config("shapes")` gives the shipped model's sizes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    text = TextTokenizer.train(tiny_captions(), cfg.text, folder / "text.model")
    image = vae.build(cfg.vae.kind, **vae.model_kwargs(cfg.vae.kind, dataclasses.asdict(cfg.vae)))
    vae.save_pretrained(image, folder)
    transformer = build_model(cfg, text, image)  # as train.dalle builds it
    save_module(transformer, folder / "transformer.safetensors")
    (folder / "transformer.json").write_text(json.dumps(config_to_dict(transformer.cfg), indent=2) + "\n")
    if clip:
        save_module(clip_from_config(cfg, text), folder / "clip.safetensors")
    if unclip:  # as train.unclip and train.prior build them
        grid = cfg.unclip.grid**2 * cfg.clip.image_width  # unclip.grid: CLIP's spatial features after the embedding
        decoder = build_model(cfg, text, image, cond_dim=cfg.clip.embed_dim + grid)
        save_module(decoder, folder / "unclip.safetensors")
        (folder / "unclip.json").write_text(json.dumps(config_to_dict(decoder.cfg), indent=2) + "\n")
        prior = build_prior(cfg, text, cfg.clip.embed_dim)
        save_module(prior, folder / "prior.safetensors")
        (folder / "prior.json").write_text(json.dumps(prior_geometry(prior), indent=2) + "\n")
    write_bundle_config(cfg, folder)
    return folder
