"""Pieces the stage entry points share: batching with a data position, the optimizer, seeding."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dalle_mini_impl.config import RunConfig, TrainConfig


class Batches:
    """Collate a per-process example stream into batches, keeping its exact position for resume.

    The stream yields {"image": (3, S, S), "caption": str}; batches are {"image": (b, 3, S, S),
    "caption": list[str]}. The position is the stream's own, taken between batches, so nothing is
    prefetched past what the loop has consumed.
    """

    def __init__(self, stream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self) -> Iterator[dict]:
        images, captions = [], []
        for example in self.stream:
            images.append(example["image"])
            captions.append(example["caption"])
            if len(images) == self.batch_size:
                yield {"image": torch.stack(images), "caption": captions}
                images, captions = [], []
        if images:
            yield {"image": torch.stack(images), "caption": captions}

    @property
    def n_skipped(self) -> int:
        return self.stream.n_skipped

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def example_batches(cfg: RunConfig, split: str, batch_size: int, *, train: bool, accelerator) -> Batches:
    """Batches of (image, caption) for this process; the stream itself splits the data across processes."""
    from dalle_mini_impl.data import ExampleStream

    stream = ExampleStream(
        cfg.data,
        split,
        train=train,
        seed=cfg.seed,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    return Batches(stream, batch_size)


def effective_lr(tc: TrainConfig, accelerator) -> float:
    """The base LR, linearly scaled by the number of processes and accumulation steps when asked."""
    return tc.lr * (accelerator.num_processes * tc.grad_accum if tc.scale_lr else 1)


def adamw(params, tc: TrainConfig, accelerator) -> torch.optim.AdamW:
    """AdamW with the stage's betas and LR; the fused kernel on GPUs."""
    fused = accelerator.device.type == "cuda"
    return torch.optim.AdamW(
        params, lr=effective_lr(tc, accelerator), betas=tuple(tc.betas), weight_decay=tc.weight_decay, fused=fused
    )


def seed_everything(seed: int) -> None:
    """The same seed on every process, so every rank builds identical initial weights."""
    from accelerate.utils import set_seed

    set_seed(seed)
