"""Token shards: a data set encoded once into image-token ids, so the transformer never touches pixels.

`python -m train.encode` writes, per split and per process,

    RUN/tokens/<split>/shard_<rank>_<index>.safetensors   image_ids (N, h, w) int16/int32
                                                           + metadata: captions (a JSON list), grid

Each shard is written under a temporary name and renamed, so an interrupted encode resumes at the
first missing shard. unCLIP's stages add RUN/tokens/<split>/clip.safetensors beside the shards: the bundle
CLIP's image embedding of every row's image and text embedding of its caption (`train.embed`).
`TokenStream` reads every shard of a split, splits the rows across processes, and yields shuffled
batches forever (training) or once in order (evaluation), with an exact data position for resume (after
LlamaGen, which also trains on pre-extracted codes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..files import write_atomic

SHARD_RE = re.compile(r"^shard_(\d{3})_(\d{5})\.safetensors$")


def tokens_dir(out_dir: str | os.PathLike, split: str) -> Path:
    return Path(out_dir) / "tokens" / split


# in a split's token folder while train.encode writes it (and after an encode that was stopped): its shards are
# not the split yet, and training on them took the shards written so far for the whole split
ENCODING = ".encoding"


def check_encoded(folder: Path) -> None:
    """One sentence when train.encode is writing `folder`'s shards, or stopped before it finished them."""
    if (folder / ENCODING).exists():
        raise UserError(
            f"the token shards in '{folder}' are being written by train.encode, or it stopped before finishing "
            "them; let it finish (or run it again), then train"
        )


def shard_path(folder: Path, rank: int, index: int) -> Path:
    return folder / f"shard_{rank:03d}_{index:05d}.safetensors"


def tokenizer_digest(weights: Path) -> str:
    """Which image tokenizer wrote a shard's ids: a digest of its weights (vae.safetensors), each floating-point
    tensor as float16 so that a bundle's fp16 export of the same tokenizer is the same one. Ids of another
    tokenizer name other codes (or none: a smaller codebook), so a shard is reused and read only by its own."""
    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(weights)).items()):
        canonical = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
        h.update(name.encode())
        h.update(canonical.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def shard_metadata(path: Path) -> dict[str, str] | None:
    """A shard's metadata (None: unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable: not a shard to reuse
        return None


def shard_tokenizer(path: Path) -> str | None:
    """The `tokenizer_digest` a shard was written with (None: unreadable, or a shard older than the record)."""
    return (shard_metadata(path) or {}).get("tokenizer")


def check_shards_tokenizer(folder: Path, digest: str) -> None:
    """One sentence when a split's shards were encoded by another image tokenizer than the run's (`digest`): a VAE
    trained again after `train.encode`. Shards written before the record was kept are not checked."""
    for path in list_shards(folder):
        made = shard_tokenizer(path)
        if made is not None and made != digest:
            raise UserError(
                f"token shard '{path}' was encoded by another image tokenizer than the run's vae.safetensors "
                "(trained again since?); rerun python -m train.encode to encode the data with it"
            )


def write_shard(
    path: Path,
    image_ids: torch.Tensor,
    captions: list[str],
    tokenizer: str | None = None,
    flips: str | None = None,
    data: str | None = None,
    rows: str | None = None,
) -> None:
    """Write one shard atomically. `image_ids` is (N, h, w); stored as int16 when the codebook fits. tokenizer:
    the `tokenizer_digest` of the image tokenizer that made the ids; flips: what says which rows have a mirrored
    row beside them (`data.encode_flip`); data: a digest of the data settings that chose and drew its rows; rows:
    a digest of the images and captions it encodes (`train.encode.Shard.rows`); all kept in the shard's
    metadata."""
    assert image_ids.dim() == 3 and len(captions) == image_ids.shape[0]
    dtype = torch.int16 if int(image_ids.max()) < 2**15 else torch.int32
    meta = {"captions": json.dumps(captions, ensure_ascii=False), "format": "dalle-mini-impl tokens v1"}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer
    if flips is not None:
        meta["flips"] = flips
    if data is not None:
        meta["data"] = data
    if rows is not None:
        meta["rows"] = rows
    tensors = {"image_ids": image_ids.to(dtype).contiguous()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def shard_rows(path: Path) -> int:
    """The rows a shard holds (read from its header), or -1 when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("image_ids").get_shape()[0]
    except Exception:  # noqa: BLE001 - unreadable: not a shard to reuse
        return -1


def list_shards(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name))


def read_shards(folder: Path, stored: bool = False) -> tuple[torch.Tensor, list[str]]:
    """All rows of a split: image ids (N, h, w) as int64 (`stored`: as the shards store them, int16 for a codebook
    below 32,768, a quarter of the memory: `TokenStream` keeps them so, every process a copy) and their captions."""
    shards = list_shards(folder)
    if not shards:
        raise UserError(f"no token shards in '{folder}'; run `python -m train.encode` with the same config first")
    numbers = [tuple(map(int, SHARD_RE.match(p.name).groups())) for p in shards]  # (process, index), sorted
    for rank in range(numbers[-1][0] + 1):  # each process's shards 0, 1, ...: a gap is rows lost in silence
        have = [index for r, index in numbers if r == rank]
        if have != list(range(len(have))) or not have:
            missing = shard_path(folder, rank, next(i for i in range(len(have) + 1) if i not in have))
            raise UserError(f"token shards in '{folder}' lack '{missing.name}'; rerun train.encode to write it")
    ids, captions = [], []
    for path in shards:
        try:
            with safe_open(str(path), framework="pt") as f:
                shard = f.get_tensor("image_ids")
                texts = json.loads(f.metadata()["captions"])
        except Exception as e:  # noqa: BLE001 - any failure to read is the same user-facing problem
            raise UserError(
                f"token shard '{path}' is unreadable ({type(e).__name__}); delete it and rerun train.encode"
            ) from None
        fault = _shard_fault(shard, texts, ids[0].shape[1:] if ids else None)
        if fault is not None:
            raise UserError(f"token shard '{path}' {fault}; delete it and rerun train.encode")
        ids.append(shard if stored else shard.long())
        captions += texts
    return torch.cat(ids), captions


def _shard_fault(ids: torch.Tensor, captions, grid: torch.Size | None) -> str | None:
    """What makes a readable shard's contents unusable (a hand edit, bit rot), or None: its ids must be integer
    and (rows, h, w) with the grid of the shards before it, none negative; its captions a list of as many texts."""
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.dim() != 3:
        return f"holds image ids of {ids.dtype} and shape {tuple(ids.shape)}, not integer (rows, h, w)"
    if grid is not None and ids.shape[1:] != grid:
        return f"holds a {tuple(ids.shape[1:])} grid where the shards before it hold {tuple(grid)}"
    if ids.numel() and int(ids.min()) < 0:
        return "holds negative image ids"
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return "holds captions that are not a list of texts"
    if len(captions) != ids.shape[0]:
        return f"holds {len(captions)} captions for {ids.shape[0]} rows"
    return None


class TokenStream:
    """Batches of {"image_ids": (b, h, w), "caption": list[str]} from token shards, split across processes;
    `extra` tensors with one row per shard row (CLIP embeddings) join every batch under their own keys.

    Every process draws the same global order (a permutation from (seed, epoch) for training, the file
    order for evaluation) and takes its own slice of each global batch of `batch_size * num_processes`
    rows. So a run on P processes sees exactly the global batches that one process with P times the
    batch size would, and `state_dict()` (epoch and global position) resumes exactly. Training streams
    never end; evaluation streams make one pass, the last global batch possibly short.
    """

    def __init__(
        self,
        folder: Path,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        extra: dict[str, torch.Tensor] | None = None,
    ):
        self.image_ids, self.captions = read_shards(folder, stored=True)  # each batch's as int64
        self.extra = dict(extra or {})
        for key, rows in self.extra.items():
            if rows.shape[0] != len(self.captions):
                raise UserError(
                    f"'{key}' beside the token shards in '{folder}' has {rows.shape[0]} rows for "
                    f"{len(self.captions)} shard rows; delete {folder / 'clip.safetensors'} to recompute it"
                )
        self.global_batch = batch_size * num_processes
        if train and len(self.captions) < self.global_batch:
            raise UserError(
                f"token shards in '{folder}' hold {len(self.captions)} rows, fewer than one global batch of "
                f"{self.global_batch}; encode more data or lower the batch size"
            )
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank = process_index
        self.epoch, self.position = 0, 0
        self.n_skipped = 0

    def __len__(self) -> int:
        return len(self.captions)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return np.arange(len(self))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def __iter__(self) -> Iterator[dict]:
        while True:
            order = self._order(self.epoch)
            # training drops the tail shorter than a global batch; evaluation keeps it
            while self.position < len(order) and (not self.train or self.position + self.global_batch <= len(order)):
                chunk = order[self.position : self.position + self.global_batch]
                self.position += self.global_batch
                idx = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                if len(idx) == 0:
                    continue
                batch = {"image_ids": self.image_ids[idx].long(), "caption": [self.captions[i] for i in idx]}
                yield batch | {key: rows[idx] for key, rows in self.extra.items()}
            if not self.train:
                return
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
