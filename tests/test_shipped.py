"""The model shipped in the package: it loads, its config matches its weights, and it draws shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dalle_mini_impl
from dalle_mini_impl.pipeline.bundle import FILES, read_bundle_config
from dalle_mini_impl.pipeline.pipeline import Pipeline
from dalle_mini_impl.shapes.judge import judge

SHIPPED = Path(dalle_mini_impl.__file__).parent / "assets" / "shapes"


def test_the_shipped_bundle_is_complete_and_small():
    names = {p.name for p in SHIPPED.iterdir()}
    assert set(FILES.values()) | {"vae.json", "transformer.json"} <= names
    total = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert total <= 25 * 2**20, f"the shipped bundle is {total / 2**20:.1f} MB, over 25 MB"


def test_config_matches_weights():
    cfg = read_bundle_config(SHIPPED)
    pipe = Pipeline.from_pretrained(SHIPPED, device="cpu")  # every part loads, shapes checked one by one
    t = pipe.transformer.cfg
    assert (t.grid_h, t.grid_w) == pipe.image_tokenizer.grid(cfg.data.image_size)
    assert t.image_vocab == pipe.image_tokenizer.codebook_size == cfg.vae.codebook_size
    assert t.text_vocab == pipe.text_tokenizer.vocab_size and t.text_len == cfg.text.text_len
    assert pipe.clip.image_size == cfg.data.image_size
    vae_json = json.loads((SHIPPED / "vae.json").read_text())
    assert vae_json["kwargs"]["codebook_size"] == cfg.vae.codebook_size
    assert vae_json["kwargs"]["factor"] == cfg.vae.factor
    groups = tuple(cfg.vae.group_sizes or [cfg.vae.codebook_size])  # product codes: the transformer predicts each
    assert tuple(t.image_factors) == pipe.image_tokenizer.group_sizes == groups
    assert list(pipe.image_tokenizer.group_inputs) == (cfg.vae.group_inputs or ["rgb"] * len(groups))


@pytest.mark.slow
def test_the_default_command_draws_what_it_is_asked():
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(None, device="cpu")
    prompt = "a large red circle in the center"
    passed = 0
    for seed in range(4):
        best = pipe.generate([prompt], num_images=1, seed=seed, progress=False)[0][0]
        passed += judge(np.asarray(best.image), prompt).ok
    assert passed >= 3, f"only {passed} of 4 samples of '{prompt}' pass the judge"
