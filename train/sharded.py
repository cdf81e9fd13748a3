"""Whole-model work on a run whose processes each hold only a shard of the weights (FSDP, ZeRO-3).

Under DDP every process holds all the weights, and the loop can sample images or write the bundle
from the main process alone. Under FSDP2 (`torch.distributed.fsdp.fully_shard`, what accelerate's
`fsdp_version: 2` applies) and DeepSpeed ZeRO-3, a parameter is a shard (a DTensor, or an empty
partition) and only a module's own forward gathers it, as a collective that every process must join.
So on such runs the loop calls the whole-model hooks (evaluation, image grids, export) on every
process, inside `whole_weights`, and takes the bundle's weights from `full_state_dict`:

    with whole_weights(model, accelerator):   # every process
        images = stage.log_images(unwrapped, step)
    state = full_state_dict(model, accelerator)   # every process; the whole weights on the main one

`model` is the module `accelerator.prepare` returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _fsdp2_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units in `model` (the root first), or [] when nothing in it is sharded by fully_shard."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _fsdp1(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped by FSDP version 1 (flat parameters, sharded between forwards)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _zero3(accelerator) -> bool:
    from accelerate.utils import DistributedType

    if accelerator is None or accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.zero_stage == 3


def shards_weights(model: torch.nn.Module, accelerator=None) -> bool:
    """Whether each process holds only a shard of `model`'s weights (FSDP, either version, or DeepSpeed ZeRO-3)."""
    return bool(_fsdp2_units(model)) or _fsdp1(model) or _zero3(accelerator)


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module, accelerator=None) -> Iterator[None]:
    """Every parameter of `model` whole on every process for the duration; a no-op when nothing is sharded.

    Collective: every process must enter it. Meant for inference (sampling, evaluation, encoding) through
    methods other than the prepared module's forward, which alone would gather the shards.
    """
    units = _fsdp2_units(model)
    if units:
        # FSDP2 keeps parameters as DTensor shards between forwards; unshard() all-gathers a unit's
        # parameters into plain tensors in place, reshard() frees them again
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in reversed(units):
                unit.reshard()
    elif _fsdp1(model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
    elif _zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


def full_state_dict(model: torch.nn.Module, accelerator=None, prefix: str = "") -> dict[str, torch.Tensor]:
    """`model`'s whole weights as CPU tensors on the main process ({} elsewhere); every process must call it.

    Keys lose `prefix` (the loop's loss wrapper adds "model.") and any DDP/compile wrapper's prefixes.
    Tensors are copies, so tied weights never share storage (safetensors refuses that).
    """
    if _fsdp2_units(model):
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # what accelerate's get_state_dict does under FSDP2: all-gather each DTensor, keep it on rank 0
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        main = dist.get_rank() == 0
    elif accelerator is not None:
        state = accelerator.get_state_dict(model)  # gathers FSDP1 and ZeRO-3 shards; unwraps DDP
        main = accelerator.is_main_process
    else:
        state, main = model.state_dict(), True
    if not main:
        return {}
    return {k.removeprefix(prefix): v.detach().cpu().clone() for k, v in state.items()}
