"""One rank of tests/test_sharded.py: a tiny DALLE sharded by FSDP2 on 2 CPU processes (gloo, torchrun).

accelerate refuses FSDP without GPUs, so this applies FSDP2 the way accelerate's `fsdp_version: 2`
does (`fully_shard` on every transformer Block, then on the root loss wrapper) and runs what the
training loop runs on a sharded model: a training step, image sampling inside `whole_weights`, the
gathered export, and another training step after it. Rank 0 prints one JSON line of findings.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dalle_mini_impl.model.generate import generate
from dalle_mini_impl.model.transformer import DALLE, resolve_config
from tests.bundle_factory import tiny_config
from train.sharded import full_state_dict, shards_weights, whole_weights


class LossWrapper(torch.nn.Module):
    """The loop's `_LossModule` in small: the model under `.model`, the loss as the forward."""

    def __init__(self, model: DALLE):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.model.loss(text, image)[0]


def batch(cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab, (4, cfg.text_len), generator=g)
    image = torch.randint(0, cfg.image_vocab, (4, cfg.image_len), generator=g)
    return text, image


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    tcfg = tiny_config().transformer
    cfg = resolve_config(tcfg, text_vocab=320, image_vocab=32, text_len=12, grid_h=4, grid_w=4, pad_id=0)
    wrapper = LossWrapper(DALLE(cfg))
    plain_before = shards_weights(wrapper)
    for block in wrapper.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=1e-2)

    def train_step(seed: int) -> float:
        loss = wrapper(*batch(cfg, seed + rank))  # each rank its own batch, as under data parallelism
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    train_step(0)
    text = batch(cfg, 100)[0][:2]  # the same prompts on both ranks
    wrapper.eval()
    with whole_weights(wrapper):
        # (each Block's own forward reshards it again afterwards; its next forward gathers it again)
        whole_inside = not any(isinstance(p, torch.distributed.tensor.DTensor) for p in wrapper.parameters())
        ids = generate(wrapper.model, text, generator=torch.Generator().manual_seed(0))
    sharded_after = all(isinstance(p, torch.distributed.tensor.DTensor) for p in wrapper.parameters())
    wrapper.train()
    state = full_state_dict(wrapper, prefix="model.")
    everyone = [None, None]
    dist.all_gather_object(everyone, ids)
    second_loss = train_step(1)  # training goes on after sampling and the gather

    if rank == 0:
        fresh = DALLE(cfg)
        fresh.load_state_dict(state, strict=True)  # raises on a missing or unexpected key
        fresh_ids = generate(fresh, text, generator=torch.Generator().manual_seed(0))
        print(
            json.dumps(
                {
                    "shards_before_fully_shard": plain_before,
                    "shards_after_fully_shard": shards_weights(wrapper),
                    "whole_inside": whole_inside,
                    "sharded_after": sharded_after,
                    "ranks_sampled_alike": bool(torch.equal(everyone[0], everyone[1])),
                    "export_samples_alike": bool(torch.equal(fresh_ids, ids)),
                    "export_keys": sorted(state) == sorted(fresh.state_dict()),
                    "second_loss_finite": bool(torch.isfinite(torch.tensor(second_loss))),
                }
            ),
            flush=True,
        )
    elif state:
        print("rank 1 got a state dict", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from dalle_mini_impl.errors import exit_process

    exit_process(main())  # leaves the process group, and skips the finalisation whose gloo threads can abort
