"""Every preset in configs/ trains: 2 steps of each stage, with its sizes shrunk by overrides."""

from __future__ import annotations

import pytest
import torch

from dalle_mini_impl.config import available_presets, load_config
from tests.test_train import TINY
from train import all as train_all
from train import clip as train_clip
from train import dalle as train_dalle
from train import tokenizer as train_tokenizer
from train import vae as train_vae
from train.loop import list_checkpoints

pytestmark = pytest.mark.slow

SHRINK = [
    *TINY,
    "data.image_size=32",
    "data.streaming=false",
    "transformer.head_dim=0",
    "clip.image_heads=2",
    "clip.text_heads=2",
    "text.vocab_size=300",
]


def two_steps(section: str) -> list[str]:
    """Overrides that shrink one [train.SECTION] to 2 steps of 4 in fp32."""
    return [f"train.{section}.steps=2", f"train.{section}.batch_size=4", f"train.{section}.mixed_precision=no"]


for stage in ("vae", "dalle", "clip"):
    SHRINK += two_steps(stage)


@pytest.mark.parametrize("preset", available_presets())
def test_preset_trains_two_steps_of_every_stage(preset, tmp_path, imagefolder):
    torch.set_num_threads(1)
    cfg = load_config(preset)
    argv = ["--config", preset, "--out", str(tmp_path)]
    if not cfg.data.source:  # a preset for data not shipped: tests build their own imagefolder
        argv += ["--data", str(imagefolder.root)]
    shrink = SHRINK.copy()
    if not cfg.vae.group_sizes:  # TINY shrinks the shapes preset's code groups; keep one group
        shrink.append("vae.group_sizes=[]")
    trained = ["vae", "dalle", "clip"]
    if cfg.train.vae_decoder.steps > 0:  # the VQ's decoder alone after train.vae's steps: shrunk too
        shrink += two_steps("vae_decoder")
        trained.append("vae_decoder")
    for item in shrink:
        argv += ["--set", item]
    train_tokenizer.main(argv)
    for stage in (train_vae, train_dalle, train_clip):
        stage.main(argv)
    for name in trained:
        assert [p.name for p in list_checkpoints(tmp_path / "checkpoints" / name)] == ["step_00000002"]
    for artifact in ("text.model", "vae.safetensors", "transformer.safetensors", "clip.safetensors"):
        assert (tmp_path / artifact).is_file()


def test_a_preset_that_names_no_data_needs_data(tmp_path, capsys):
    from dalle_mini_impl.errors import run_cli

    assert load_config("emoji64").data.source == ""
    with pytest.raises(SystemExit) as stop:
        run_cli(train_tokenizer.main, ["--config", "emoji64", "--out", str(tmp_path)])
    assert stop.value.code == 2
    message = (
        "error: this config names no data source (data.source is empty); pass --data with a folder, "
        "*.parquet or *.tar files, or a hub name\n"
    )
    assert capsys.readouterr().err == message
    with pytest.raises(SystemExit) as stop:  # train.all says it once, before starting any stage
        run_cli(train_all.main, ["--config", "emoji", "--out", str(tmp_path)])
    assert stop.value.code == 2 and capsys.readouterr() == ("", message)
