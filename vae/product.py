"""Product codes: a flat id that stands for one code in each of several groups (mixed radix).

With group sizes (K_1, .., K_G), the flat id of the factors (a_1, .., a_G) is
a_1 K_2 .. K_G + a_2 K_3 .. K_G + .. + a_G, the first group most significant, so ids run over
[0, K_1 .. K_G) and one group of K ids is the plain case. Per-group tensors lay the groups side by
side on one axis of K_1 + .. + K_G rows ("rows"), group after group. The dVAE (`vae.dvae`) quantises
with such codes and the transformer (`dalle_mini_impl.model.transformer`) embeds and predicts them per factor.

    sizes = (8, 128)
    factors = split_ids(ids, sizes)           # (..., 2): a_1 in [0, 8), a_2 in [0, 128)
    rows = id_rows(ids, sizes)                # (..., 2): a_1 and 8 + a_2, rows of a (136, d) table
    ids = join_ids(factors, sizes)            # back to (...)
    flat = outer_sum(row_logits, sizes)       # (..., 136) -> (..., 1024): the sum of each tuple's rows
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import VAEError


def check_group_sizes(codebook_size: int, group_sizes: Sequence[int] | None) -> tuple[int, ...]:
    """The group sizes as a tuple ((codebook_size,) when none are given), checked against the codebook size."""
    sizes = tuple(group_sizes or (codebook_size,))
    if any(not isinstance(k, int) or k < 2 for k in sizes):
        raise VAEError(f"group_sizes must be integers >= 2, got {list(sizes)}")
    if math.prod(sizes) != codebook_size:
        raise VAEError(
            f"codebook_size {codebook_size} is not the product of group_sizes {list(sizes)} ({math.prod(sizes)}); "
            f"set codebook_size to {math.prod(sizes)}, or group_sizes to sizes whose product is {codebook_size} "
            '(--set "vae.group_sizes=[]" --set "vae.group_inputs=[]" for one group)'
        )
    return sizes


def _places(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """(g,): the weight of each factor in the flat id."""
    return torch.tensor([math.prod(sizes[i + 1 :]) for i in range(len(sizes))], device=device)


def split_ids(ids: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Flat ids (...) -> factors (..., g), factor i in [0, sizes[i])."""
    return ids.unsqueeze(-1) // _places(sizes, ids.device) % torch.tensor(sizes, device=ids.device)


def join_ids(factors: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Factors (..., g) -> flat ids (...)."""
    return (factors * _places(sizes, factors.device)).sum(dim=-1)


def row_offsets(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """(g,): the first row of each group on the side-by-side axis."""
    return torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], device=device)


def id_rows(ids: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Flat ids (...) -> (..., g): each factor's row on the side-by-side axis (an embedding table's rows)."""
    return split_ids(ids, sizes) + row_offsets(sizes, ids.device)


def outer_sum(rows: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Per-group values (..., K_1 + .. + K_G) -> (..., K_1 .. K_G): each flat id's sum of its factors' values."""
    groups = rows.split(list(sizes), dim=-1)
    flat = groups[0]
    for group in groups[1:]:
        flat = (flat.unsqueeze(-1) + group.unsqueeze(-2)).flatten(-2)
    return flat


__all__ = ["check_group_sizes", "id_rows", "join_ids", "outer_sum", "row_offsets", "split_ids"]
