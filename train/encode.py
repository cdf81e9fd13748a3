"""Encode a data set once into image-token shards: `python -m train.encode --config configs/shapes.toml`.

Reads the trained image tokenizer from the run folder (vae.safetensors + vae.json), encodes the
train split (at most `data.max_examples` examples) and the validation split, and writes token shards
with their captions under RUN/tokens/<split>/ (see dalle_mini_impl.data.tokens): a row per caption, so an
image with a list of captions is a row for each (encoded once). The transformer then trains on ids only,
instead of re-encoding pixels at every step as dalle-pytorch does.

Resumable: shards are written atomically and existing ones are skipped on a rerun. Split across
processes under `accelerate launch`: each process encodes its own share of the examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from dalle_mini_impl.config import RunConfig, add_config_args, config_from_args
from dalle_mini_impl.data.streams import ExampleStream, caption_regex, is_endless
from dalle_mini_impl.data.tokens import (
    ENCODING,
    SHARD_RE,
    list_shards,
    shard_metadata,
    shard_path,
    shard_rows,
    tokenizer_digest,
    tokens_dir,
    write_shard,
)
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.files import write_atomic
from dalle_mini_impl.pipeline.bundle import load_vae, part_path, record_stage_config
from train.common import check_image_size, process_state, progress_bar, require_parts
from train.loop import one_trainer


def data_digest(cfg: RunConfig, split: str, world: int) -> str:
    """A digest of the data settings that choose a split's rows and draw them (the source, its columns, the
    filters, the image size and limits, shapes' own settings, and the processes, which deal the rows out among
    them): a shard is reused only by an encode with the same."""
    d = cfg.data
    fields = {
        "source": d.source,
        "split": split,
        "processes": world,
        "columns": [d.image_column, d.caption_column],
        "filters": [d.include, d.exclude],
        "image_size": d.image_size,
        "limits": [d.max_image_pixels, d.max_caption_chars],
        "shapes": dataclasses.asdict(d.shapes) if d.source == "shapes" else None,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


ENCODE_BATCH = 256  # images encoded at once


class Shard:
    """The rows of one token shard being filled: its images, and for each row the image it draws (an image with
    several captions is a row per caption, encoded once) and its caption. With `encode_as_they_come` the images
    are encoded 256 at a time and let go (a shard of 10,000 float images at 256 px would take 7.9 GB); otherwise
    they wait for `row_ids`, since an earlier run's shard of the same rows is reused unencoded. The rows' digest
    is kept as they come: of each row's image, as the stream prepared it, and caption (what a rerun's rows must
    equal for their shard to be reused; the settings' digest alone let a shard of the same count be reused over
    other rows, when an image repaired between two encodes shifted every row after it by one)."""

    def __init__(self, path: Path, tokenizer, device, encode_as_they_come: bool):
        self.path, self.tokenizer, self.device = path, tokenizer, device
        self.encode_as_they_come = encode_as_they_come
        self.pending: list[torch.Tensor] = []  # images not encoded yet
        self.ids: list[torch.Tensor] = []  # the codes of those encoded, in order
        self.images = 0
        self.image_of: list[int] = []
        self.captions: list[str] = []
        self._digest = hashlib.sha256()

    def add(self, image: torch.Tensor, texts: list[str]) -> None:
        pixels = image.contiguous().numpy().tobytes()
        for text in texts:
            self.image_of.append(self.images)
            self.captions.append(text)
            self._digest.update(pixels)
            self._digest.update(json.dumps(text).encode())
        self.images += 1
        self.pending.append(image)
        if self.encode_as_they_come and len(self.pending) >= ENCODE_BATCH:
            self._encode()

    def rows(self) -> str:
        """The digest of the rows so far."""
        return self._digest.hexdigest()[:16]

    def row_ids(self) -> torch.Tensor:
        """The codes of every row (rows, h, w), the images left encoded first."""
        self._encode()
        return torch.cat(self.ids)[torch.tensor(self.image_of)]

    def _encode(self) -> None:
        with torch.inference_mode():
            for i in range(0, len(self.pending), ENCODE_BATCH):
                batch = torch.stack(self.pending[i : i + ENCODE_BATCH]).to(self.device)
                self.ids.append(self.tokenizer.encode(batch).cpu())
        self.pending = []


def check_ends(cfg: RunConfig) -> None:
    """One sentence for a training split with no end and no `data.max_examples`: the shapes stream with
    `data.shapes.train_size` 0 would be encoded until the disk is full."""
    if cfg.data.max_examples <= 0 and is_endless(cfg.data, cfg.data.split):
        raise UserError(
            "the shapes training stream is endless and data.max_examples is 0, so train.encode would never end; "
            "set data.max_examples (the shapes preset's 64000) or data.shapes.train_size"
        )


def mirror_rule(cfg: RunConfig, split: str) -> tuple[Callable[[str], bool] | None, str | None]:
    """Which examples of `split` train.encode also writes mirrored left to right (`data.encode_flip`: the train split
    only, captions that `data.encode_flip_exclude` matches left out), and the tag its shards keep to say so; (None,
    None): none."""
    if not cfg.data.encode_flip or split != cfg.data.split:
        return None, None
    exclude = caption_regex(cfg.data, "encode_flip_exclude")

    def mirrored(caption: str) -> bool:
        return exclude is None or exclude.search(caption) is None

    return mirrored, f"left-right, captions matching {cfg.data.encode_flip_exclude!r} left out"


def encode_split(
    cfg: RunConfig, tokenizer, split: str, limit: int, rank: int, world: int, device, digest: str | None = None
) -> dict:
    """Encode one split into shards for this process; returns counts. digest: the image tokenizer's
    `tokenizer_digest`, kept in each shard; a shard is reused only when this tokenizer wrote it. With
    `data.encode_flip` a train-split image's mirror image follows it as a row of its own (`mirror_rule`)."""
    folder = tokens_dir(cfg.out_dir, split)
    shard_size = cfg.data.encode_shard_size
    stream = ExampleStream(
        cfg.data, split, train=False, process_index=rank, num_processes=world, endless=False, all_captions=True
    )
    mirrored, flips = mirror_rule(cfg, split)
    data = data_digest(cfg, split, world)
    # this process's share of `limit` (0: everything the split has)
    share = (limit // world + (rank < limit % world)) if limit > 0 else None
    # the bar counts the records read, skipped ones too (counting encoded images, a split with mirror images had no
    # total, and one with unreadable records ended short of it); a record counts once it waits to be encoded. Under
    # a limit below the split's length it counts the examples kept: records skipped before the cut would carry it
    # past its total
    length = stream.length  # this process's records, or None for a stream
    total = length if share is None else share if length is None else min(share, length)
    counts_examples = share is not None and (length is None or share <= length)
    bar = progress_bar(rank == 0, total=total, desc=f"encode {split}", unit="record")

    def count() -> None:
        bar.update(n + (0 if counts_examples else stream.n_skipped) - bar.n)

    index, n, n_rows, n_mirrored, written, reused = 0, 0, 0, 0, 0, 0

    def written_alike(path: Path) -> dict | None:
        """The metadata of the shard at `path` when an earlier run wrote it with this tokenizer, mirroring as this
        run does, its rows chosen by the same data settings (a VAE trained again since writes every shard again);
        else None."""
        meta = shard_metadata(path) if path.exists() else None
        alike = meta is not None and all(
            meta.get(k) == v for k, v in (("tokenizer", digest), ("flips", flips), ("data", data))
        )
        return meta if alike else None

    def start() -> Shard:
        # a shard written alike may be reused, so its images wait until its rows are known; any other's are
        # encoded as they come
        path = shard_path(folder, rank, index)
        return Shard(path, tokenizer, device, encode_as_they_come=written_alike(path) is None)

    def flush(shard: Shard) -> None:
        nonlocal index, written, reused
        # reused when written alike and holding these rows (the same images and captions); the last shard of an
        # encode that stopped at a smaller data.max_examples holds fewer, and is encoded again (else the rows after
        # it would be lost)
        meta = written_alike(shard.path)
        if meta is not None and shard_rows(shard.path) == len(shard.captions) and meta.get("rows") == shard.rows():
            reused += 1
        else:
            ids = shard.row_ids()
            write_shard(shard.path, ids, shard.captions, tokenizer=digest, flips=flips, data=data, rows=shard.rows())
            written += 1
        index += 1

    # the data's warnings (a skipped record) printed above the bar, not glued to its line; closed on any way out
    with logging_redirect_tqdm(), bar:
        shard = start()
        for example in stream:
            if share is not None and n >= share:
                break
            n += 1
            count()
            shard.add(example["image"], example["captions"])
            kept = [text for text in example["captions"] if mirrored is not None and mirrored(text)]
            if kept:  # the mirror image, with the captions a mirror leaves true
                shard.add(example["image"].flip(-1), kept)
                n_mirrored += 1
            n_rows += len(example["captions"]) + len(kept)
            if len(shard.captions) >= shard_size:  # an example's rows and its mirror image's stay in one shard
                flush(shard)
                shard = start()
        if shard.captions:
            flush(shard)
        count()  # records skipped after the last example
    # shards of an earlier encode past this one's last (a larger data.max_examples, rows a filter now drops), and
    # those of processes this run does not have: read_shards would read them as rows of this split
    for path in list_shards(folder):
        shard_rank, shard_index = map(int, SHARD_RE.match(path.name).groups())
        if (shard_rank == rank and shard_index >= index) or (rank == 0 and shard_rank >= world):
            path.unlink()
    if n == 0:
        raise UserError(f"split '{split}' of data '{cfg.data.source}' gave no example to encode; check --data/--split")
    return {
        "split": split,
        "examples": n,
        "mirrored": n_mirrored,
        "rows": n_rows,
        "shards_written": written,
        "shards_reused": reused,
        "skipped": stream.n_skipped,
    }


def summed_over_processes(results: list[dict], state) -> list[dict]:
    """Each split's counts summed over the processes (each encoded its own share): the manifest said process 0's."""
    if state.num_processes == 1:
        return results
    from accelerate.utils import gather_object

    everyone = gather_object([results])  # one list of split results per process, in rank order
    summed = []
    for i, first in enumerate(everyone[0]):
        summed.append({k: v if k == "split" else sum(rank[i][k] for rank in everyone) for k, v in first.items()})
    return summed


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--splits", default=None, help="comma list of splits (default: data.split,data.val_split)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    splits = [s.strip() for s in args.splits.split(",")] if args.splits else [cfg.data.split, cfg.data.val_split]
    if not all(splits):  # "train,," read a split named ''
        raise UserError(f"--splits '{args.splits}' has an empty name; give split names joined by commas")
    state = process_state()
    require_parts(cfg.out_dir, "vae")
    check_image_size(cfg)  # else shards of another grid, and a config.json the later parts no longer fit
    tokenizer = load_vae(cfg.out_dir).to(state.device).eval()
    digest = tokenizer_digest(part_path(cfg.out_dir, "vae"))
    if cfg.data.split in splits:  # the one max_examples limits
        check_ends(cfg)
    # one encode of a run at a time (two wrote the same shards); while it writes a split, its folder says so
    # (`tokens.ENCODING`), and the stages that read shards wait for it instead of training on a part of the split
    with one_trainer(Path(cfg.out_dir), "encode", state.is_main_process, state.num_processes):
        markers = [tokens_dir(cfg.out_dir, split) / ENCODING for split in splits]
        if state.is_main_process:
            for marker in markers:
                write_atomic(marker, lambda tmp: tmp.write_text(f"{os.getpid()}\n"))
        state.wait_for_everyone()
        results = []
        for split in splits:
            limit = cfg.data.max_examples if split == cfg.data.split else 0
            results.append(
                encode_split(
                    cfg, tokenizer, split, limit, state.process_index, state.num_processes, state.device, digest
                )
            )
        state.wait_for_everyone()
        results = summed_over_processes(results, state)
        if state.is_main_process:
            record_stage_config(cfg, cfg.out_dir, "encode")
            summary = {"tokens": str(Path(cfg.out_dir) / "tokens"), "splits": results}
            for marker in markers:
                marker.unlink()
            # written last: its presence says every split is complete (train.all skips the stage then)
            text = json.dumps(summary, indent=2) + "\n"
            write_atomic(Path(cfg.out_dir) / "tokens" / "manifest.json", lambda tmp: tmp.write_text(text))
            print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_cli(main)
