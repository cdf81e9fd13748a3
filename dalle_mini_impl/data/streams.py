"""(image, caption) pairs from any source, as one resumable stream per process.

Sources (`data.source`, or `--data` on any command):
    shapes                    the procedural set in `dalle_mini_impl.shapes.generator` (no download)
    path/to/folder            Hugging Face `imagefolder`: images + metadata.jsonl/.csv, optionally in
                              train/ and validation/ subfolders, of which only the asked split's is read
                              (a folder of only .parquet or .tar files is read with those builders instead)
    data/*.parquet            parquet files (a glob or one file)
    shards/*.tar              webdataset shards (000.png + 000.txt ...: columns `png`, `txt`)
    user/name                 anything else: a data set on the Hugging Face hub
A `{split}` in a path is replaced by the split name (`shards/{split}-*.tar`); a split `a+b` reads split a,
then split b, as one data set (`train+validation`). `data.streaming` streams
instead of loading into memory; `data.image_column` / `data.caption_column` name the columns.

`ExampleStream` yields {"image": float (3, S, S) in [0, 1], "caption": str}; `batches` collates it.
Usage:
    stream = ExampleStream(cfg.data, cfg.data.split, train=True, seed=cfg.seed,
                           process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    for batch in batches(stream, 32): ...           # {"image": (b, 3, S, S), "caption": [str] * b}
    python -m dalle_mini_impl.data grid --out shapes_grid.png --n 16
    python -m dalle_mini_impl.data stats --data DATA/emoji-noto --split validation

Design (after open_clip's and LlamaGen's data pipelines, written for resumable research runs):
- Images are decoded here, never inside `datasets` (the image column is cast to
  `Image(decode=False)`), so a corrupt, truncated, empty, non-image or oversized file (more than
  `data.max_image_pixels` pixels: a decompression bomb) is skipped and counted by reason in
  `stream.skipped`, as is an empty or non-string caption. Bad data never stops a run; a pass that
  yields nothing at all does, with the counts.
- Processes split the data by ONE mechanism, the stream itself: `datasets.split_dataset_by_node` for
  Hugging Face sources, index modulo (shard = process index) for shapes. The training loop must not
  also let accelerate shard the loader (do not pass batches through `accelerator.prepare`).
- A training stream is shuffled and endless: a map-style data set draws a permutation per epoch from
  (seed, epoch); a streaming one uses `datasets`' shuffle buffer with `set_epoch`; the endless shapes
  stream is already i.i.d. An evaluation stream is ordered and makes one pass.
- Resume: `state_dict()` holds the epoch and the number of records this process has consumed in it
  (skipped ones included); `load_state_dict` makes the next example exactly the one an uninterrupted
  run would have seen next. Crops and caption choices are seeded by (seed, epoch, process, position), so
  they resume exactly too. Streaming sources resume through `datasets`' own `state_dict`, which is
  exact without a shuffle buffer and approximate with one (the buffer's contents are lost).
- Workers: use DataLoader(num_workers=0) (the training stages refuse TrainConfig.num_workers above 0). Decoding small
  images is cheap next to a training step, and only in-process iteration keeps `state_dict()` exact.
  With num_workers > 0 every worker reads a disjoint slice (every W-th record of this process's share;
  `datasets` gives streaming workers whole shards), the order interleaves, and the main process's
  `state_dict()` and skip counts do not see the workers' progress.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import logging
import lzma
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import DataConfig
from ..errors import UserError
from .images import from_uint8, prepare_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# why a record was skipped: the keys of `ExampleStream.skipped`
SKIP_REASONS = {
    "missing_image": "no image value, or a path that does not exist",
    "empty_file": "a zero-byte image",
    "not_an_image": "bytes PIL does not recognise as an image",
    "truncated": "an image whose data ends early",
    "too_large": "more pixels than data.max_image_pixels (a decompression bomb)",
    "unreadable": "any other failure to decode or convert the image",
    "missing_caption": "no caption value",
    "empty_caption": "a caption that is empty or only spaces (or a list of such)",
    "bad_caption": "a caption that is neither a string nor a list of strings",
}
_WARN_PER_REASON = 5  # the first few skips of each reason are logged as warnings, the rest at debug
_FILE_SUFFIXES = IMAGE_EXTENSIONS | {".parquet", ".tar", ".json", ".jsonl", ".csv", ".arrow", ".txt", ".zip"}
_IMAGE_GUESSES = ("image", "img", "png", "jpg", "jpeg", "webp")
_CAPTION_GUESSES = ("text", "caption", "txt", "captions", "prompt", "sentence")


class UnusableRecord(Exception):
    """A record that cannot be used; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------
# Opening a source
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    """An opened split of a data source; `dataset` is a datasets Dataset/IterableDataset (None: shapes)."""

    name: str
    split: str
    kind: str  # "shapes" | "map" (datasets.Dataset) | "stream" (datasets.IterableDataset)
    dataset: Any = None
    image_column: str = "image"
    caption_column: str = "text"
    base_dirs: tuple[str, ...] = ()  # the folders of its local data files: where a relative image path is looked for


def _looks_like_path(text: str) -> bool:
    # hub names are `name` or `owner/name`; anything else with path syntax is a local path
    file_like = Path(text).suffix.lower() in _FILE_SUFFIXES
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or file_like


def is_local_source(source: str) -> bool:
    """Whether a data source names files on this machine (a folder, files, a glob), not shapes or a hub name."""
    if source.strip() in ("", "shapes"):
        return False
    text = os.path.expanduser(source.replace("{split}", "train"))
    return glob.has_magic(text) or os.path.exists(text) or _looks_like_path(text)


def _folder_builder(folder: str) -> str:
    """parquet where the folder holds .parquet files (an imagefolder's metadata.parquet aside), else webdataset where
    it holds .tar files, else imagefolder where it holds images: a cloned hub data set's shards beside a preview
    image, or a parquet file's images beside it, are the data files, not an imagefolder. A folder with none of them
    (an empty one, a run folder given as --data) is one sentence."""
    found = set()
    for _, _, files in os.walk(folder):
        found |= {Path(f).suffix.lower() for f in files if Path(f).stem != "metadata"}
    if ".parquet" in found:
        return "parquet"
    if ".tar" in found:
        return "webdataset"
    if found & IMAGE_EXTENSIONS:
        return "imagefolder"
    raise UserError(
        f"data folder '{folder}' holds no images, .parquet or .tar files; give --data the folder of a data set "
        "(images with a metadata.jsonl, parquet or webdataset shards)"
    )


def require_source(source: str) -> None:
    """A preset for data that does not ship with the package names no source: `--data` must."""
    if not source.strip():
        raise UserError(
            "this config names no data source (data.source is empty); pass --data with a folder, "
            "*.parquet or *.tar files, or a hub name"
        )


def is_endless(cfg: DataConfig, split: str) -> bool:
    """Whether `split` of the data has no end: the shapes stream's train split with `data.shapes.train_size` 0 (a
    pass over it never finishes, so what reads all of it needs a limit)."""
    if cfg.source != "shapes" or split != "train":
        return False
    from ..shapes.generator import shapes_length

    return shapes_length(cfg.shapes, split) is None


def check_source(source: str, split: str) -> None:
    """One sentence, before anything runs, for a source that names files that are not there (or of a kind no
    builder reads); shapes and hub names pass (a hub name is only checked when read)."""
    require_source(source)
    if source.strip() != "shapes":
        for part in split_parts(split):
            _resolve(source, part)


def split_parts(split: str) -> list[str]:
    """The splits a split name reads, one after another: "train+validation" -> ["train", "validation"]."""
    return [part.strip() for part in split.split("+")]


def _resolve(source: str, split: str) -> tuple[str, dict[str, Any], str]:
    """(the `load_dataset` path, its keyword arguments, the split name to ask it for)."""
    require_source(source)
    text = os.path.expanduser(source.replace("{split}", split))
    hf_split = "train" if "{split}" in source else split  # a file list is one split, named train
    # a path that exists is that path, even where its name holds a glob's characters (`set [v2]`)
    exists = os.path.exists(text)
    is_pattern = not exists and (glob.has_magic(text) or Path(text).suffix.lower() in (".parquet", ".tar"))
    if os.path.isfile(text) or is_pattern:
        files = sorted(glob.glob(text if is_pattern else glob.escape(text), recursive=True))
        if not files:
            raise UserError(f"no file matches data source '{source}'; check the path or glob pattern")
        suffixes = {Path(f).suffix.lower() for f in files}
        if suffixes == {".parquet"}:
            return "parquet", {"data_files": files}, hf_split
        if suffixes == {".tar"}:
            return "webdataset", {"data_files": files}, hf_split
        raise UserError(
            f"data source '{source}' matches {', '.join(sorted(suffixes))} files; "
            "give only .parquet files or only .tar (webdataset) files"
        )
    if os.path.isdir(text) and _saved_to_disk(text):
        return SAVED, {"dataset_path": text}, hf_split
    if os.path.isdir(text):
        # the split's own folder, under its name or one `datasets` takes for it (valid/ for validation)
        builder = _folder_builder(text)
        split_dir = _split_folder_in(text, _split_words(split)) or os.path.join(text, split)
        if builder == "imagefolder" and "{split}" not in source and os.path.isdir(split_dir):
            # a folder per split: list that one's files alone, so other splits are never read
            return builder, {"data_files": {"train": os.path.join(glob.escape(split_dir), "**")}}, "train"
        if builder == "imagefolder":
            return builder, {"data_dir": text}, hf_split
        # shards: the split's files alone, so that the reader builds it from its own files' columns (with the other
        # splits' it took the first file's, and a split stored otherwise stopped it)
        suffix = ".parquet" if builder == "parquet" else ".tar"
        return builder, {"data_files": _split_files(text, suffix, split, whole="{split}" in source)}, "train"
    if os.path.exists(text):
        raise UserError(
            f"data source '{source}' is a file that is neither .parquet nor .tar; "
            "give a folder (imagefolder), *.parquet, *.tar, a hub name or 'shapes'"
        )
    if _looks_like_path(text):
        raise UserError(f"data path '{source}' does not exist; check the path (or give a hub name like 'user/data')")
    return text, {}, hf_split


# a folder `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote: read with `load_from_disk`
SAVED = "load_from_disk"
# the folder names `datasets` reads as one split (datasets.data_files' keywords), the split's own name first
SPLIT_FOLDERS = (
    ("train", "training"),
    ("validation", "valid", "val", "dev"),
    ("test", "testing", "eval", "evaluation"),
)


def _split_folder_in(folder: str, names: tuple[str, ...]) -> str | None:
    """The first of `names` that is a folder in `folder` (a split's folder), or None."""
    return next((os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))), None)


def _saved_to_disk(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "dataset_dict.json")) or all(
        os.path.isfile(os.path.join(folder, name)) for name in ("state.json", "dataset_info.json")
    )


def _load_saved(name: str, folder: str, split: str, streaming: bool):
    """A split of a folder `save_to_disk` wrote: a DatasetDict's split, or a Dataset as the split `train`."""
    import datasets

    try:
        ds = datasets.load_from_disk(folder)
    except Exception as e:  # noqa: BLE001 - a damaged or half-copied folder
        raise UserError(_unreadable(name, SAVED, e)) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(
                f"data set '{name}' has no split '{split}'; available splits: {', '.join(ds)}; choose one with "
                "--split or data.split / data.val_split"
            )
        ds = ds[split]
    elif split != "train":
        raise UserError(
            f"data set '{name}' is one Dataset saved with save_to_disk, read as the split 'train', not '{split}'; "
            "save a DatasetDict for more splits, or use --split train"
        )
    return ds.to_iterable_dataset() if streaming else ds


def _split_words(split: str) -> tuple[str, ...]:
    """The names a file or folder may give `split` (`datasets`' keywords: valid, val and dev for validation)."""
    return next((names for names in SPLIT_FOLDERS if split in names), (split,))


def _split_files(folder: str, suffix: str, split: str, whole: bool) -> list[str]:
    """The files under `folder` ending in `suffix` (its other files left out: a hub clone's preview image, the
    images a parquet file names) that belong to `split`: those whose path relative to the folder has one of the
    split's names as a word (train-00000-of-00002.parquet, validation/0.tar: `datasets`' rule), or all of them
    where none names a split, or `whole` (the folder is the split's already). No file of the split: one sentence
    naming the splits there are."""
    escaped = glob.escape(folder)
    files = sorted(
        f
        for f in glob.glob(os.path.join(escaped, "**", "*"), recursive=True)
        if f.lower().endswith(suffix) and Path(f).stem != "metadata" and os.path.isfile(f)
    )

    def words(path: str) -> set[str]:
        return set(re.split(r"[^a-z]+", os.path.relpath(path, folder).lower()))

    named = {names[0]: [f for f in files if words(f) & set(names)] for names in SPLIT_FOLDERS}
    if whole or not any(named.values()):
        return files
    mine = [f for f in files if words(f) & set(_split_words(split))]
    if not mine:
        there = ", ".join(name for name, found in named.items() if found)
        raise UserError(
            f"data set '{folder}' has no split '{split}'; available splits: {there}; choose one with --split or "
            "data.split / data.val_split"
        )
    return mine


def _as_patterns(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`_resolve`'s keyword arguments as `datasets` reads them, as glob patterns: its literal folder and file paths
    escaped (a folder named `set [v2]` was read as the class of characters v and 2). A pattern of a dict of
    data_files (a str) is one already."""
    out = dict(kwargs)
    if out.get("data_dir"):
        out["data_dir"] = glob.escape(out["data_dir"])
    files = out.get("data_files")
    if isinstance(files, list):
        out["data_files"] = [glob.escape(f) for f in files]
    elif isinstance(files, dict):
        out["data_files"] = {k: [glob.escape(f) for f in v] if isinstance(v, list) else v for k, v in files.items()}
    return out


def _available_splits(path: str, kwargs: dict[str, Any]) -> list[str]:
    import datasets

    try:
        builder = datasets.load_dataset_builder(path, **_as_patterns(kwargs))
    except Exception:  # the split list is only a hint in an error message
        return []
    if builder.config.data_files:
        return [str(s) for s in builder.config.data_files]
    return [str(s) for s in builder.info.splits or {}]


def _text_or_replacement(data: bytes) -> str:
    """A webdataset text member as text: UTF-8, each byte that is not replaced by U+FFFD (`_clean_caption` then
    skips the caption as `bad_caption`)."""
    return data.decode("utf-8", errors="replace")


def read_webdataset_text_leniently() -> None:
    """`datasets`' webdataset reader decodes a .txt member as strict UTF-8 inside its generator, so one byte that is
    not stopped the whole reader, and every resume at the same record. Its text decoders are replaced by
    `_text_or_replacement` (in this process; called where a webdataset is opened and where it is read)."""
    try:
        from datasets.packaged_modules.webdataset import webdataset as wds
    except ImportError:  # another `datasets` layout: its own decoding stands
        return
    strict = getattr(wds, "text_loads", None)
    for extension, decode in list(getattr(wds.WebDataset, "DECODERS", {}).items()):
        if decode is strict:
            wds.WebDataset.DECODERS[extension] = _text_or_replacement


_COMPLETE_ARCHIVES: set[tuple[str, int, int]] = set()  # (path, size, mtime) of archives walked and found whole
# `datasets`' webdataset reader decompresses a compressed member (000.meta.gz) whole into memory, of every field,
# named in the config or not, already while it infers the columns: one member that inflates past this stops the
# read before the reader starts, with one sentence, not a MemoryError. Far above any caption or metadata member, and
# above an image at the default data.max_image_pixels stored raw as RGBA (160 MB): only a member no sample here needs
# is refused.
MAX_INFLATED_MEMBER_BYTES = 256 * 2**20


def _member_decompressors() -> dict[str, Callable[..., IO[bytes]]]:
    """The suffixes of the members `datasets`' webdataset reader decompresses (.gz .gzip .bz2 .xz, and .lz4 .zst
    where their libraries are installed), each with the opener it decompresses them with."""
    try:
        from datasets.filesystems import EXTENSION_TO_COMPRESSION_FS_FILE_CLS
    except ImportError:  # another `datasets` layout: the formats the standard library reads
        return {".gz": gzip.open, ".gzip": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    return dict(EXTENSION_TO_COMPRESSION_FS_FILE_CLS)


def _inflates_past(data: IO[bytes], open_compressed: Callable[..., IO[bytes]], limit: int) -> bool:
    """Whether the compressed `data` decompresses to more than `limit` bytes; read a chunk at a time, so no more
    than a chunk of it is ever in memory."""
    size = 0
    try:
        with open_compressed(data, mode="rb") as inflated:
            while chunk := inflated.read(2**20):
                size += len(chunk)
                if size > limit:
                    return True
    except Exception:  # a corrupt stream, in whichever library's own error: the reader fails on it and says so
        return False
    return False


def check_archives(name: str, files: list[str]) -> list[str]:
    """The local .tar files among `files` that end before their last member does, or without the end-of-archive
    blocks: `tarfile` stops at the cut silently, losing the samples after it uncounted. Each is logged as a
    warning and returned. A compressed member that decompresses past MAX_INFLATED_MEMBER_BYTES stops the read
    with one sentence (see there)."""
    cut = []
    decompressors = _member_decompressors()
    limit = MAX_INFLATED_MEMBER_BYTES
    for path in files:
        if not path.endswith(".tar") or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        # walked once per file as it is in this process (its members' headers: seconds for 160,000 samples, and a
        # stage opens its splits several times; and the data of its compressed members only); a file that ends in
        # zero blocks may still be cut, after a member whose data ends in zeros, so the walk is not skipped
        stamp = (path, size, os.stat(path).st_mtime_ns)
        if stamp in _COMPLETE_ARCHIVES:
            continue
        try:
            with tarfile.open(path, "r:") as archive:
                end = 0
                for member in archive:
                    end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    # the members the reader reads (regular files, not hidden), by the suffix it goes by
                    decompress = decompressors.get("." + member.name.split(".")[-1].lower())
                    if decompress is None or not member.isreg():
                        continue
                    if os.path.basename(member.name).startswith((".", "__")):
                        continue
                    if _inflates_past(archive.extractfile(member), decompress, limit):
                        raise UserError(
                            f"data set '{name}': member '{member.name}' of archive '{path}' decompresses to more "
                            f"than {limit / 2**20:g} MiB, and the webdataset reader decompresses every compressed "
                            "member whole into memory, even one no column names; remove it from the shard, or "
                            "store it uncompressed"
                        )
            with open(path, "rb") as f:
                f.seek(end)
                tail = f.read(2 * tarfile.BLOCKSIZE)
        except (tarfile.TarError, OSError):
            continue  # not readable as an archive at all: the reader says so in one sentence
        if end <= size and tail == bytes(2 * tarfile.BLOCKSIZE):
            _COMPLETE_ARCHIVES.add(stamp)
        else:
            cut.append(path)
            log.warning(
                "data set %s: archive %s is cut short (%d bytes, its members need %d and the end blocks): the samples "
                "after its last complete one are lost; copy or download it again",
                name, path, size, end,
            )  # fmt: skip
    return cut


def _load(
    name: str, split: str, path: str, kwargs: dict[str, Any], hf_split: str, streaming: bool, caption_column: str
):
    if path == SAVED:
        return _load_saved(name, kwargs["dataset_path"], hf_split, streaming)

    if path == "imagefolder":
        warn_of_uncaptioned_images(name, kwargs)
    if path == "webdataset":
        read_webdataset_text_leniently()
        check_archives(name, sorted(_listed_files(kwargs)))
    try:
        return _load_dataset(name, split, path, kwargs, hf_split, streaming)
    except UserError:
        # one bad line of an imagefolder's metadata stops datasets' reader for the whole split: then the split is
        # read here, without it (not where the folder is read whole for another split than train: the reader's own
        # split inference stands there)
        one_split = path == "imagefolder" and (
            isinstance(kwargs.get("data_files"), dict)
            or (hf_split == "train" and not any(_split_folder_in(kwargs["data_dir"], n) for n in SPLIT_FOLDERS))
        )
        if one_split:
            lenient = _imagefolder_leniently(name, kwargs, streaming, caption_column)
            if lenient is not None:
                return lenient
        raise


def _load_dataset(name: str, split: str, path: str, kwargs: dict[str, Any], hf_split: str, streaming: bool):
    """`datasets.load_dataset` of `_resolve`'s arguments; what it refuses is one sentence."""
    import datasets

    try:
        return datasets.load_dataset(path, split=hf_split, streaming=streaming, **_as_patterns(kwargs))
    except ValueError as e:
        if "split" not in str(e).lower() or type(e).__module__.startswith("pyarrow"):
            if kwargs:  # local files the reader refuses: metadata of mixed types, bad JSON, text not UTF-8
                raise UserError(_unreadable(name, path, e, kwargs=kwargs)) from None
            raise
        available = ", ".join(_available_splits(path, kwargs)) or "unknown"
        hint = " (or put {split} in the path)" if isinstance(kwargs.get("data_files"), list) else ""
        raise UserError(
            f"data set '{name}' has no split '{split}'; available splits: {available}; "
            f"choose one with --split or data.split / data.val_split{hint}"
        ) from None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetGenerationError) as e:
        if kwargs and isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ is not None:
            # say what broke in the local files
            raise UserError(_unreadable(name, path, e.__cause__, kwargs=kwargs)) from None
        raise UserError(
            f"data set '{name}' could not be loaded ({type(e).__name__}: {e}); "
            "check the path, the hub name, or your network"
        ) from None
    except (IndexError, KeyError, TypeError, tarfile.TarError) as e:  # an empty metadata.jsonl, a broken .tar
        if not kwargs:
            raise
        raise UserError(_unreadable(name, path, e, kwargs=kwargs)) from None


_UNREADABLE_HINTS = {
    SAVED: "save it again with save_to_disk, or copy the whole folder",
    "imagefolder": "check its metadata file: one JSON object per line, each column of one type, captions as strings",
    "webdataset": "check its .tar files: complete archives whose samples all have the same members "
    "(000.png + 000.txt), text in UTF-8",
}


def _unreadable(name: str, builder: str, e: Exception, where: str = "", kwargs: dict | None = None) -> str:
    fault = _metadata_fault(kwargs or {}) if builder == "imagefolder" else None
    if fault is not None:  # the line at fault, which the JSON reader's message does not name
        path, line, what = fault
        return f"data set '{name}' could not be read: line {line} of '{path}' {what}; fix or remove that line"
    detail = (str(e).splitlines() or [""])[0][:200]
    hint = _UNREADABLE_HINTS.get(builder, "check that its files are complete and of one format")
    return f"data set '{name}' could not be read{where} ({type(e).__name__}: {detail}); {hint}"


_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "a list"}


def _json_kind(value: Any) -> str:
    """What a JSON value is, as a column's type: `a list of a string`, `a number`, `an object`."""
    kind = _JSON_TYPES.get(type(value), "an object")
    if isinstance(value, list):
        inner = sorted({_json_kind(v) for v in value if v is not None})
        kind += f" of {' and '.join(inner)}" if inner else ""
    return kind


def _folder_patterns(kwargs: dict) -> list[str]:
    """The imagefolder's folders, each as its escaped path and `/**` (`_resolve`'s data_dir or data_files)."""
    patterns = [os.path.join(glob.escape(kwargs["data_dir"]), "**")] if kwargs.get("data_dir") else []
    for files in (kwargs.get("data_files") or {}).values():
        patterns += [f for f in ([files] if isinstance(files, str) else files) if f.endswith("**")]
    return patterns


def _metadata_files(kwargs: dict) -> list[str]:
    """The imagefolder's metadata.jsonl files, in its folders and below."""
    found = [glob.glob(pattern + "/metadata.jsonl", recursive=True) for pattern in _folder_patterns(kwargs)]
    return [path for paths in found for path in sorted(paths)]


def warn_of_uncaptioned_images(name: str, kwargs: dict) -> int:
    """The images of an imagefolder that no metadata.jsonl row names: the reader leaves them out without a word, so
    they are counted and named (the first) in one warning. Returns the count (0 where no metadata file is)."""
    metadata = _metadata_files(kwargs)
    if not metadata:
        return 0
    referenced: set[str] = set()
    for path in metadata:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue  # the reader says what is wrong with the file
                if isinstance(row, dict) and isinstance(row.get("file_name"), str):
                    referenced.add(os.path.normpath(os.path.join(os.path.dirname(path), row["file_name"])))
    images = [
        os.path.normpath(p)
        for pattern in _folder_patterns(kwargs)
        for p in glob.glob(pattern, recursive=True)
        if Path(p).suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(p)
    ]
    left_out = sorted(set(images) - referenced)
    if left_out:
        log.warning(
            "data set %s: %d image file(s) have no row in its metadata.jsonl and are left out (the first: %s); "
            "give each a row with its caption to train on it",
            name, len(left_out), left_out[0],
        )  # fmt: skip
    return len(left_out)


def _metadata_rows(kwargs: dict) -> Iterator[tuple[str, int, dict | None, str | None]]:
    """Each line of an imagefolder's metadata.jsonl files as (file, line number, its object, None), or (file, line
    number, None, what is wrong) for one the JSON reader cannot take: text that is not UTF-8, a line that is not one
    JSON object, a list of values of two types, a value whose type differs from the same key's on an earlier good
    line (a column has one type, in every file; null goes with any), no file_name naming an image. Blank lines are
    left out."""
    seen: dict[str, str] = {}
    for path in _metadata_files(kwargs):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                row, fault = _metadata_line(raw, seen)
                if row is not None or fault is not None:
                    yield path, number, row, fault


def _metadata_line(raw: bytes, seen: dict[str, str]) -> tuple[dict | None, str | None]:
    """(the line's object, None), (None, what is wrong with it) or (None, None) for a blank line; a good line's
    column types join `seen`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
    if not text.strip():
        return None, None
    try:
        row = json.loads(text)
    except ValueError:
        return None, "is not a JSON object"
    if not isinstance(row, dict):
        return None, f"is {_json_kind(row)}, not a JSON object"
    # null, and a list with no typed value, go with any type of their key
    kinds = {key: kind for key, value in row.items() if value is not None and (kind := _json_kind(value)) != "a list"}
    for key, kind in kinds.items():
        if " and " in kind:
            return None, f"has '{key}' as {kind} (one type a list)"
        if seen.get(key, kind) != kind:
            return None, f"has '{key}' as {kind} ({repr(row[key])[:40]}) where earlier lines have {seen[key]}"
    if not isinstance(row.get("file_name"), str):
        return None, "has no 'file_name' naming its image"
    seen.update(kinds)
    return row, None


def _metadata_fault(kwargs: dict) -> tuple[str, int, str] | None:
    """The first line of an imagefolder's metadata.jsonl files that the JSON reader cannot take (`_metadata_rows`):
    (file, line number, what is wrong), or None."""
    return next(((path, number, fault) for path, number, _, fault in _metadata_rows(kwargs) if fault), None)


def _imagefolder_leniently(name: str, kwargs: dict, streaming: bool, caption_column: str):
    """An imagefolder split whose metadata.jsonl has lines the JSON reader refuses (`_metadata_fault`), which would
    stop the reader for the whole split: read here instead, as the image paths and the caption column, each bad
    line left out with its image, counted and named in one warning. None where no line is bad (the reader failed
    for another reason), no line is good, or the good ones' captions still make no column (the caller then says
    what is wrong)."""
    import datasets

    rows, bad = [], []
    for path, number, row, fault in _metadata_rows(kwargs):
        if fault is not None:
            bad.append((path, number, fault))
            continue
        image = os.path.join(os.path.dirname(path), row["file_name"])
        rows.append({caption_column: row.get(caption_column), "image": image})
    if not bad:
        return None
    try:
        ds = datasets.Dataset.from_list(rows) if rows else None
    except Exception:  # noqa: BLE001 - pyarrow's types of nested values: beyond what `_metadata_line` tells apart
        return None
    if ds is None:
        return None
    path, number, fault = bad[0]
    log.warning(
        "data set %s: %d line(s) of its metadata.jsonl are left out with their images (the first: line %d of '%s' "
        "%s); fix them to train on those images",
        name, len(bad), number, path, fault,
    )  # fmt: skip
    return ds.to_iterable_dataset() if streaming else ds


def _columns(ds) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds.take(1)), {})  # a stream of unknown features: look at one record
    return list(first)


def _check_column(name: str, columns: list[str], column: str, role: str, guesses: tuple[str, ...]) -> None:
    if column in columns:
        return
    guess = next((c for c in columns if c.lower() in guesses), None)
    fix = f"--set data.{role}_column={guess}" if guess else f"--set data.{role}_column=NAME, NAME one of them"
    raise UserError(
        f"data set '{name}' has no {role} column '{column}'; its columns are: {', '.join(columns)}; "
        f"name the right one with {fix}"
    )


class CaptionFilter:
    """True for a caption that `data.include` matches (when set) and `data.exclude` does not (when set)."""

    def __init__(self, cfg: DataConfig):
        self.include, self.exclude = (caption_regex(cfg, key) for key in ("include", "exclude"))

    def __call__(self, caption: Any) -> bool:
        # a list of captions is kept when one of them is included and none is excluded; a caption that is not
        # text counts as the empty string here and is skipped later, with its reason
        texts = [t if isinstance(t, str) else "" for t in (caption if isinstance(caption, list) else [caption])] or [""]
        if self.include is not None and not any(self.include.search(t) for t in texts):
            return False
        return self.exclude is None or not any(self.exclude.search(t) for t in texts)


def caption_regex(cfg: DataConfig, key: str) -> re.Pattern | None:
    """The compiled pattern of `data.<key>` (None when empty); a pattern that does not compile: one sentence."""
    pattern = getattr(cfg, key)
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"config key 'data.{key}' is not a valid regular expression ({e}); fix the pattern") from None


# the `data` keys that reading a data set's files uses and drawing shapes does not
SHAPES_UNREAD = ("random_crop", "streaming", "shuffle_buffer", "image_column", "caption_column")


def open_dataset(cfg: DataConfig, split: str) -> Source:
    """Open one split of `cfg.source` with the image and caption columns only, images left undecoded."""
    if cfg.source == "shapes" and (cfg.include or cfg.exclude):
        raise UserError(
            "data.include and data.exclude filter a data set's captions, not shapes; "
            "leave them empty (shapes holds out pairs with data.shapes.held_out)"
        )
    if cfg.source == "shapes":
        defaults = DataConfig()
        for key in SHAPES_UNREAD:
            if getattr(cfg, key) != getattr(defaults, key):
                raise UserError(
                    f"config key 'data.{key}' is {getattr(cfg, key)!r}, but shapes are drawn whole at data.image_size, "
                    f"with no files, columns or stream to read; leave it at its default ({getattr(defaults, key)!r}) "
                    "with shapes"
                )
        from ..shapes.generator import shapes_length

        shapes_length(cfg.shapes, split)  # checks the split name
        return Source(name="shapes", split=split, kind="shapes")

    try:
        import datasets
    except ImportError:  # a machine set up to train from token shards alone (the lent GPU machines)
        raise UserError(
            f"reading data set '{cfg.source}' needs the Hugging Face datasets package, which is not installed; "
            "pip install datasets, or encode the images where it is and train from the run folder's token shards "
            "(docs/SCALING.md)"
        ) from None

    parts = split_parts(split)
    if not all(parts):
        raise UserError(f"split '{split}' has an empty part; name splits like train or train+validation")
    loaded, base_dirs = [], []
    for part in parts:
        path, kwargs, hf_split = _resolve(cfg.source, part)
        base_dirs += _data_dirs(kwargs)
        ds = _load(cfg.source, part, path, kwargs, hf_split, cfg.streaming, cfg.caption_column)
        columns = _columns(ds)
        _check_column(cfg.source, columns, cfg.image_column, "image", _IMAGE_GUESSES)
        _check_column(cfg.source, columns, cfg.caption_column, "caption", _CAPTION_GUESSES)
        ds = ds.select_columns([cfg.image_column, cfg.caption_column])
        if ds.features is not None and isinstance(ds.features[cfg.image_column], datasets.Image):
            # decode ourselves: a corrupt file then reaches `decode_image` as bytes and is skipped, not raised; before
            # the filter, which a stream runs on whole records (it decoded, and a corrupt image stopped the run)
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        loaded.append(ds)
    ds = loaded[0] if len(loaded) == 1 else _concatenated(cfg, parts, loaded)
    if cfg.include or cfg.exclude:  # on the captions alone, before any image is read
        ds = ds.filter(CaptionFilter(cfg), input_columns=[cfg.caption_column])
    kind = "stream" if isinstance(ds, datasets.IterableDataset) else "map"
    return Source(cfg.source, split, kind, ds, cfg.image_column, cfg.caption_column, tuple(dict.fromkeys(base_dirs)))


def _data_dirs(kwargs: dict[str, Any]) -> list[str]:
    """The folders of `_resolve`'s local data files: data_dir, or each listed data file's folder (an imagefolder
    gives its images' full paths itself)."""
    if kwargs.get("data_dir"):
        return [kwargs["data_dir"]]
    return [os.path.dirname(f) for f in _listed_files(kwargs)]


def _listed_files(kwargs: dict[str, Any]) -> list[str]:
    """The data files `_resolve` listed one by one (not an imagefolder's patterns)."""
    files = kwargs.get("data_files") or []
    if isinstance(files, dict):
        return [f for v in files.values() if isinstance(v, list) for f in v]
    return list(files)


def _as_caption_lists(batch: dict, column: str) -> dict:
    """A batch's captions, each one a list of itself (None, a missing caption, stays None)."""
    return {column: [None if c is None else [c] for c in batch[column]]}


def _is_list(feature: Any) -> bool:
    return isinstance(feature, list) or hasattr(feature, "feature")  # [..], Sequence, List, LargeList


def _concatenated(cfg: DataConfig, names: list[str], parts: list) -> Any:
    """The splits of `train+validation` as one data set, their image and caption columns first brought to one type:
    files written by two tools store them differently (large_binary against binary, an Image column against bytes,
    one caption against a list of captions), and `concatenate_datasets` stopped with a traceback. A difference no
    cast bridges is one sentence."""
    import datasets

    features = [p.features for p in parts]
    if any(f is None for f in features) or all(f == features[0] for f in features):
        return datasets.concatenate_datasets(parts)  # a stream of unknown types is read as it comes
    target = datasets.Features(features[0])
    if any(isinstance(f[cfg.image_column], datasets.Image) for f in features):
        target[cfg.image_column] = datasets.Image(decode=False)  # bytes and paths cast to it
    if any(_is_list(f[cfg.caption_column]) for f in features):
        target[cfg.caption_column] = next(f[cfg.caption_column] for f in features if _is_list(f[cfg.caption_column]))
    aligned = []
    for name, part in zip(names, parts):
        if part.features != target:
            if _is_list(target[cfg.caption_column]) and not _is_list(part.features[cfg.caption_column]):
                part = part.map(_as_caption_lists, batched=True, fn_kwargs={"column": cfg.caption_column})
            try:
                part = part.cast(target)
            except (TypeError, ValueError) as e:
                detail = (str(e).splitlines() or [""])[0][:160]
                raise UserError(
                    f"data set '{cfg.source}': split '{name}' stores its columns as {dict(part.features)}, and split "
                    f"'{names[0]}' as {dict(features[0])}, which no cast joins ({detail}); write the splits with "
                    "one type per column"
                ) from None
        aligned.append(part)
    return datasets.concatenate_datasets(aligned)


# ----------------------------------------------------------------------------------------------
# Decoding one record
# ----------------------------------------------------------------------------------------------


def _read_bytes(value: Any, base_dirs: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """The encoded bytes of an image value (bytes, a path, or datasets' {"bytes", "path"}) and its name. A relative
    path is looked for beside the data files first (`base_dirs`: a parquet file's `imgs/0.png`), then from the
    current folder."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data, path = bytes(value), None
    elif isinstance(value, (str, os.PathLike)):
        data, path = None, os.fspath(value)
    else:
        raise UnusableRecord(
            "missing_image" if value is None else "unreadable", f"value of type {type(value).__name__}"
        )
    where = path or "<bytes>"
    if data is None:
        if not path:
            raise UnusableRecord("missing_image", "neither bytes nor a path")
        if not os.path.isabs(path) and "://" not in path:
            path = next((p for d in base_dirs if os.path.isfile(p := os.path.join(d, path))), path)
        if os.path.isfile(path):
            data = Path(path).read_bytes()
        elif "://" in path:
            from datasets.utils.file_utils import xopen

            try:
                with xopen(path, "rb") as f:
                    data = f.read()
            except Exception as e:
                raise UnusableRecord("missing_image", f"{path}: {e}") from None
        else:
            raise UnusableRecord("missing_image", path)
    if len(data) == 0:
        raise UnusableRecord("empty_file", where)
    return bytes(data), where


def decode_image(value: Any, max_pixels: int, base_dirs: tuple[str, ...] = ()) -> Image.Image:
    """A fully loaded PIL image from a record's image value (a relative path: beside the data files, `base_dirs`,
    first); raises `UnusableRecord` with the reason otherwise."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    data, where = _read_bytes(value, base_dirs)
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; both mean "too large" here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pil = Image.open(BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnusableRecord("too_large", f"{where}: {e}") from None
    except UnidentifiedImageError:
        raise UnusableRecord("not_an_image", where) from None
    except Exception as e:
        raise UnusableRecord("unreadable", f"{where}: {e}") from None
    w, h = pil.size
    if w * h > max_pixels:
        raise UnusableRecord("too_large", f"{where}: {w}x{h} > {max_pixels} pixels")
    try:
        pil.load()
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) or "broken data stream" in str(e) else "unreadable"
        raise UnusableRecord(reason, f"{where}: {e}") from None
    except Exception as e:
        raise UnusableRecord("unreadable", f"{where}: {e}") from None
    try:
        return ImageOps.exif_transpose(pil)  # photos taken sideways
    except Exception:
        return pil


def check_resized(pil: Image.Image, size: int, max_pixels: int) -> None:
    """`UnusableRecord` too_large for an image whose shorter side resized to `size` would hold more than
    `max_pixels`: a file of a few bytes can be 12,000 x 1 pixels, resized to 256 x 3,072,000 before its crop."""
    w, h = pil.size
    long = size * max(w, h) // max(min(w, h), 1)
    if size * long > max_pixels:
        raise UnusableRecord("too_large", f"{w}x{h}, its shorter side resized to {size}: {size}x{long} > {max_pixels}")


def _clean_caption(value: Any, max_chars: int, rng: random.Random) -> str:
    """One caption: a string, or one of a list chosen by `rng`; spaces collapsed, cut to `max_chars`."""
    if value is None:
        raise UnusableRecord("missing_caption")
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise UnusableRecord("bad_caption", f"a list holding {sorted({type(v).__name__ for v in value})}")
        options = [" ".join(v.split()) for v in value]
        readable = [v for v in options if v and "\ufffd" not in v]  # as a caption alone: bytes that were not UTF-8
        if not readable:
            if any("\ufffd" in v for v in options):
                raise UnusableRecord("bad_caption", "a list whose captions hold U+FFFD (bytes that were not UTF-8)")
            raise UnusableRecord("empty_caption")
        text = rng.choice(readable)
    elif isinstance(value, str):
        text = " ".join(value.split())
        if not text:
            raise UnusableRecord("empty_caption")
        if "\ufffd" in text:  # a replacement character: text that was not UTF-8 where it came from
            raise UnusableRecord("bad_caption", "text holding U+FFFD (bytes that were not UTF-8)")
    else:
        raise UnusableRecord("bad_caption", f"a {type(value).__name__}")
    return text[:max_chars]


# ----------------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------------


class ExampleStream(torch.utils.data.IterableDataset):
    """One process's stream of {"image": (3, S, S) in [0, 1], "caption": str}; see the module docstring.

    `train=True`: shuffled, endless (epochs loop) unless `endless=False`. `train=False`: ordered, one
    pass per iteration. `skipped` counts skipped records by reason, `n_skipped` in total.
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        *,
        train: bool,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        endless: bool | None = None,
        all_captions: bool = False,
    ):
        super().__init__()
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"process {process_index} of {num_processes} is not a valid process index")
        self.cfg = cfg
        self.split = split
        self.train = train
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.endless = train if endless is None else endless
        # each example also carries "captions": every usable caption of its record (train.encode writes a row each)
        self.all_captions = all_captions
        self.epoch = 0
        self.position = 0  # records of this epoch consumed by this process, skipped ones included
        self.skipped: Counter[str] = Counter()
        # the records warned of in this process, by reason: an evaluation split replayed from its start at every
        # evaluation (its position, and with it `skipped`, restored) warned of its one bad record every time
        self._warned: dict[str, set[str]] = {}
        # PIL's own bomb check; `decode_image` turns its warning into a skip as well
        Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
        self.source = open_dataset(cfg, split)
        self._dataset = self._this_process(self.source)
        self._hf_pending: dict | None = None  # a datasets state to resume from, set by load_state_dict
        self._hf_live = False  # the streaming dataset has been iterated, so its own state is current
        if self.source.kind == "stream":
            self._hf_fresh = self._dataset.state_dict()  # the start of an epoch

    # -- setup ---------------------------------------------------------------------------------

    def _this_process(self, source: Source):
        if source.kind == "shapes":
            return None
        from datasets.distributed import split_dataset_by_node

        ds = source.dataset
        if self.num_processes > 1 and source.kind == "map":
            if len(ds) < self.num_processes:
                raise UserError(
                    f"data set '{source.name}' (split '{self.split}') has {len(ds)} record(s), fewer than the "
                    f"{self.num_processes} processes that share it; launch fewer processes or give the split more"
                )
            # every num_processes-th record from this process's index, as the shapes stream deals them out: a
            # contiguous half put a cluster of broken files, and data.max_examples's first rows, on one process
            ds = ds.shard(num_shards=self.num_processes, index=self.process_index, contiguous=False)
        elif self.num_processes > 1:
            ds = split_dataset_by_node(ds, rank=self.process_index, world_size=self.num_processes)
        if source.kind == "stream" and self.train:
            # the same seed on every process, so shard-level shuffles agree (see split_dataset_by_node)
            ds = ds.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer)
        return ds

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def length(self) -> int | None:
        """Records in one pass for this process (skipped ones included); None when endless or unknown."""
        if self.source.kind == "shapes":
            from ..shapes.generator import shapes_length

            total = shapes_length(self.cfg.shapes, self.split)
            return None if total is None else len(range(self.process_index, total, self.num_processes))
        if self.source.kind == "map":
            return len(self._dataset)
        return None

    # -- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The data position, JSON-serialisable: restore it with `load_state_dict` before iterating."""
        state = {
            "source": self.cfg.source,
            "split": self.split,
            "num_processes": self.num_processes,
            "epoch": self.epoch,
            "position": self.position,
            "skipped": dict(self.skipped),
        }
        if self.source.kind == "stream":
            # at position 0 (a new pass) the datasets state may still point at the end of the last one
            live = self._dataset.state_dict() if self._hf_live else self._hf_pending
            state["datasets"] = live if self.position > 0 else None
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; a different source or process count restores what still applies."""
        if state.get("source") != self.cfg.source or state.get("split") != self.split:
            log.warning(
                "data position saved for %s/%s does not apply to %s/%s; starting this data from the beginning",
                state.get("source"),
                state.get("split"),
                self.cfg.source,
                self.split,
            )
            return
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.skipped = Counter(state.get("skipped", {}))
        saved_processes = int(state.get("num_processes", self.num_processes))
        if saved_processes != self.num_processes:
            # each process saw a different share: keep the epoch, approximate the position
            self.position = self.position * saved_processes // self.num_processes
            log.warning(
                "data position was saved with %d processes and this run has %d; resuming approximately",
                saved_processes,
                self.num_processes,
            )
            return
        if self.source.kind == "stream":
            self._hf_pending = state.get("datasets")

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        w, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        while True:
            started_at, yielded = self.position, 0
            for example in self._pass(w, n_workers):
                yielded += 1
                yield example
            if yielded == 0 and started_at == 0:
                if n_workers > 1:
                    return  # this worker's slice is empty; the others may still have data
                raise UserError(self._nothing_readable())
            self.epoch += 1
            self.position = 0
            if not self.endless:
                return

    def _nothing_readable(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "the split is empty"
        whose = "" if self.num_processes == 1 else f"process {self.process_index}'s share of "
        fix = "check the files and data.image_column / data.caption_column"
        if self.cfg.include or self.cfg.exclude:  # the filter may be what left nothing
            fix = f"data.include / data.exclude may keep no caption of it: loosen them, or {fix}"
        return (
            f"{whose}data set '{self.source.name}' (split '{self.split}') has no readable example "
            f"({self.n_skipped} skipped: {reasons}); {fix}"
        )

    def _rng(self) -> random.Random:
        """The generator for this record's crop and caption choice: a function of where the record is."""
        epoch = self.epoch if self.train else 0
        return random.Random(f"{self.seed}:{epoch}:{self.process_index}:{self.position}")

    def _order(self, n: int) -> np.ndarray | None:
        if not self.train:
            return None
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def _positions(self, n: int | None, w: int, n_workers: int) -> Iterator[int]:
        """The record indices left in this pass (this worker's share), advancing `self.position`."""
        order = None if n is None else self._order(n)
        k = self.position
        while n is None or k < n:
            if k % n_workers == w:
                self.position = k + 1
                yield k if order is None else int(order[k])
            k += 1

    def _pass(self, w: int, n_workers: int) -> Iterator[dict]:
        if self.source.kind == "shapes":
            yield from self._shapes_pass(w, n_workers)
        elif self.source.kind == "map":
            for i in self._positions(len(self._dataset), w, n_workers):
                example = self._example(self._dataset[i], f"row {i}")
                if example is not None:
                    yield example
        else:
            yield from self._stream_pass()

    def _shapes_pass(self, w: int, n_workers: int) -> Iterator[dict]:
        from ..shapes.generator import shapes_example

        # shapes are rendered at the target size: a crop would cut off what "at the top" describes
        for k in self._positions(self.length, w, n_workers):
            index = self.process_index + k * self.num_processes  # this process's k-th global example
            ex = shapes_example(self.cfg.shapes, self.cfg.image_size, self.split, index)
            example = {"image": from_uint8(ex["image"]), "caption": ex["caption"]}
            yield example | {"captions": [ex["caption"]]} if self.all_captions else example

    def _stream_pass(self) -> Iterator[dict]:
        read_webdataset_text_leniently()  # in this process too (a DataLoader worker's), where the reader decodes
        ds = self._dataset
        if self.train:
            ds.set_epoch(self.epoch)  # a new shuffle per epoch; evaluation keeps epoch 0 (shard order fixed)
        # `datasets` applies a loaded state whenever the epoch matches; a fresh one restarts the pass
        ds.load_state_dict(self._hf_pending if self._hf_pending is not None else self._hf_fresh)
        self._hf_pending = None
        self._hf_live = True
        records = iter(ds)
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as e:  # the reader itself broke (an archive cut short, text not UTF-8): it cannot go on
                builder = _resolve(self.cfg.source, self.split)[0]
                raise UserError(_unreadable(self.source.name, builder, e, f" after record {self.position}")) from None
            self.position += 1
            example = self._example(record, f"record {self.position - 1}")
            if example is not None:
                yield example

    def _example(self, record: dict, where: str) -> dict | None:
        rng = self._rng()
        try:
            caption = _clean_caption(record[self.source.caption_column], self.cfg.max_caption_chars, rng)
            pil = decode_image(record[self.source.image_column], self.cfg.max_image_pixels, self.source.base_dirs)
            check_resized(pil, self.cfg.image_size, self.cfg.max_image_pixels)
            try:
                image = prepare_image(pil, self.cfg.image_size, self.cfg.random_crop and self.train, rng)
            except Exception as e:  # an exotic mode PIL cannot convert
                raise UnusableRecord("unreadable", str(e)) from None
        except UnusableRecord as skip:
            self._count(skip, where)
            return None
        if self.all_captions:  # the list's others too (its blank ones left out, as the choice leaves them)
            captions = _caption_strings(record[self.source.caption_column], self.cfg.max_caption_chars, Counter())
            return {"image": image, "caption": caption, "captions": captions}
        return {"image": image, "caption": caption}

    def _count(self, skip: UnusableRecord, where: str) -> None:
        self.skipped[skip.reason] += 1
        warned = self._warned.setdefault(skip.reason, set())
        level = logging.DEBUG
        if len(warned) < _WARN_PER_REASON and where not in warned:  # the first few of each reason, each once
            warned.add(where)
            level = logging.WARNING
        log.log(
            level, "skipped %s of %s (split %s): %s %s", where, self.source.name, self.split, skip.reason, skip.detail
        )


def collate(examples: list[dict]) -> dict:
    """Examples -> {"image": (b, 3, S, S), "caption": list of b strings}; usable as a DataLoader collate_fn."""
    return {"image": torch.stack([e["image"] for e in examples]), "caption": [e["caption"] for e in examples]}


class Batches:
    """Batches of a stream that also carry its data position (`state_dict`) and skip counts."""

    def __init__(self, stream: ExampleStream, batch_size: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.stream, self.batch_size, self.drop_last = stream, batch_size, drop_last

    def __iter__(self) -> Iterator[dict]:
        buffer: list[dict] = []
        for example in self.stream:
            buffer.append(example)
            if len(buffer) == self.batch_size:
                yield collate(buffer)
                buffer = []
        if buffer and not self.drop_last:
            yield collate(buffer)

    def state_dict(self) -> dict:
        # a checkpoint is taken between batches, when the stream sits just after the last yielded example
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    @property
    def skipped(self) -> Counter[str]:
        return self.stream.skipped

    @property
    def n_skipped(self) -> int:
        return self.stream.n_skipped


def batches(stream: ExampleStream, batch_size: int) -> Batches:
    """Collate a stream into batches {"image": (b, 3, S, S), "caption": [str] * b}, the last one partial."""
    return Batches(stream, batch_size)


# ----------------------------------------------------------------------------------------------
# Captions only (tokenizer training)
# ----------------------------------------------------------------------------------------------


def _caption_strings(value: Any, max_chars: int, skipped: Counter) -> list[str]:
    """The usable captions of one record's caption value (`_clean_caption`'s, each of a list), the others counted
    in `skipped` by reason."""
    kept = []
    for v in value if isinstance(value, (list, tuple)) else [value]:
        try:
            kept.append(_clean_caption(v, max_chars, random.Random(0)))
        except UnusableRecord as skip:
            skipped[skip.reason] += 1
    return kept


def iter_captions(cfg: DataConfig, split: str, limit: int, skipped: Counter | None = None) -> Iterator[str]:
    """Up to `limit` captions of a split in order, without decoding images; every caption of a list counts. Those
    `_clean_caption` refuses (empty, not text, not UTF-8) are left out, and counted by reason in `skipped`."""
    skipped = Counter() if skipped is None else skipped
    if cfg.source == "shapes":
        from ..shapes.generator import sample_scene, shapes_length, split_seed

        # the scene (and so the caption) of example i is drawn from this rng before any pixel is drawn
        seed, total = split_seed(cfg.shapes, split), shapes_length(cfg.shapes, split)
        for i in range(limit if total is None else min(limit, total)):
            yield sample_scene(np.random.default_rng([seed, i]), cfg.image_size, cfg.shapes, split).caption
        return
    source = open_dataset(cfg, split)
    records: Iterable[dict] = source.dataset.select_columns([source.caption_column])
    n = 0
    for record in records:
        for caption in _caption_strings(record[source.caption_column], cfg.max_caption_chars, skipped):
            if n >= limit:
                return
            yield caption
            n += 1
