"""Tokenizer quality numbers: PSNR of reconstructions and codebook usage / perplexity over recent batches.

    usage = CodeUsage(codebook_size=512, window=50)
    fraction, perplexity = usage.update(ids)   # after every training batch

Usage is the fraction of codes that appeared at least once in the last `window` batches; perplexity is
exp(entropy) of the code frequencies over the same window (k when all k codes are equally frequent),
the two numbers VQ papers report to show that a codebook has not collapsed.
"""

from __future__ import annotations

import math
from collections import deque

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB from the MSE over the whole batch, pixels in [0, 1] (0-dim)."""
    mse = torch.mean((x.detach().float() - y.detach().float()) ** 2)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def code_histogram(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in ids of any shape: LongTensor (codebook_size,) on ids' device."""
    return torch.bincount(ids.reshape(-1), minlength=codebook_size)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a histogram of code counts; 0 for an empty histogram."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return math.exp(float(-(p * p.log()).sum()))


class CodeUsage:
    """Tracks which codes the tokenizer emitted over the last `window` batches."""

    def __init__(self, codebook_size: int, window: int = 50):
        if codebook_size < 1 or window < 1:
            raise ValueError(f"CodeUsage needs codebook_size >= 1 and window >= 1, got {codebook_size}, {window}")
        self.codebook_size = codebook_size
        self.window = window
        self._batches: deque[torch.Tensor] = deque()
        self._total = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, ids: torch.Tensor) -> tuple[float, float]:
        """Add one batch of ids; return (fraction of codes used, perplexity) over the window."""
        counts = code_histogram(ids.detach(), self.codebook_size).cpu()
        self._batches.append(counts)
        self._total += counts
        if len(self._batches) > self.window:
            self._total -= self._batches.popleft()
        return self.usage(), perplexity(self._total)

    def usage(self) -> float:
        """Fraction of the codebook seen at least once in the window."""
        return float((self._total > 0).sum()) / self.codebook_size

    def counts(self) -> torch.Tensor:
        """Per-code counts over the window (a copy)."""
        return self._total.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The window's per-batch counts, oldest first (n, codebook_size): what a resumed run needs to report the
        same usage and perplexity as one that never stopped."""
        empty = torch.zeros(0, self.codebook_size, dtype=torch.long)
        return {"batches": torch.stack(list(self._batches)) if self._batches else empty}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        batches = state["batches"].long()
        if batches.dim() != 2 or batches.shape[1] != self.codebook_size:
            raise ValueError(f"code counts of shape {tuple(batches.shape)} for a codebook of {self.codebook_size}")
        self._batches = deque(batches[-self.window :].unbind(0))
        self._total = batches[-self.window :].sum(0)
