"""Whole-model work on weights sharded by FSDP2 (train.sharded), on 2 CPU processes (gloo, torchrun).

accelerate only applies FSDP on GPUs, so `tests/fsdp2_worker.py` shards a tiny DALLE with
`fully_shard` itself, the way accelerate's `fsdp_version: 2` does, and runs what the training loop
runs on such a model. Without `whole_weights`, sampling fails there ("got mixed torch.Tensor and
DTensor"); without `full_state_dict`, the export would write each rank's shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.sharded import full_state_dict, shards_weights, whole_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fsdp2_sampling_and_export_see_the_whole_model():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "tests/fsdp2_worker.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("{")]  # rank 0 alone prints
    found = json.loads(line)
    assert found == {
        "shards_before_fully_shard": False,
        "shards_after_fully_shard": True,
        "whole_inside": True,  # every parameter a plain tensor inside whole_weights ...
        "sharded_after": True,  # ... and a DTensor shard again after it
        "ranks_sampled_alike": True,
        "export_samples_alike": True,  # a fresh model loaded from the gathered state samples the same ids
        "export_keys": True,
        "second_loss_finite": True,  # training goes on after sampling and the gather
    }


def test_unsharded_model_passes_through():
    model = torch.nn.Linear(3, 2)
    assert not shards_weights(model)
    with whole_weights(model):
        assert isinstance(model.weight, torch.nn.Parameter)
    state = full_state_dict(torch.nn.ModuleDict({"model": model}), prefix="model.")
    assert sorted(state) == ["bias", "weight"]
    assert torch.equal(state["weight"], model.weight) and state["weight"].data_ptr() != model.weight.data_ptr()
