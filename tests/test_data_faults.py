"""Data faults (issue 9, item 3): every image mode converted, every bad file or caption skipped and counted.

One temporary imagefolder (metadata.jsonl with file_name + text) holds good images in modes RGB, L,
P (with a transparent index), RGBA, CMYK (JPEG and TIFF), I;16 (PNG), LA, 1 and F (TIFF), and bad
ones: random bytes named .png, a truncated PNG, a zero-byte file, a text file named .jpg, a PNG whose
header claims 40000x40000 pixels (a decompression bomb), a normal image above `data.max_image_pixels`,
a row naming a file that is not there, and empty, blank, missing and 100,000-character captions.
Smaller folders cover caption lists, non-text captions, a metadata file that mixes types, and a folder
with nothing readable, which stops with one sentence naming it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import random
import re
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_mini_impl.config import DataConfig
from dalle_mini_impl.data import __main__ as data_cli
from dalle_mini_impl.data import streams as data
from dalle_mini_impl.data.images import to_uint8
from dalle_mini_impl.data.streams import SKIP_REASONS, ExampleStream
from dalle_mini_impl.errors import UserError, run_cli

S = 16
W, H = 20, 16  # not square, so the resize and the crop both act
MAX_PIXELS = 100_000  # data.max_image_pixels for the folder: the 400x300 photo is above it
LONG = 100_000


@pytest.fixture(autouse=True)
def restore_pil_limit():
    # ExampleStream sets PIL's process-wide bomb limit from its config; leave it as other tests expect it
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny, well-formed PNG (correct CRCs) whose IHDR claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # far too little data for the size it claims
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def good_images() -> dict[str, tuple[str, bytes]]:
    """caption -> (file name, encoded bytes), one per mode the loader must convert."""
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, W // 2 :] = (40, 80, 220, 255)  # left half fully transparent black: must become white
    palette = Image.fromarray(np.tile(np.arange(W, dtype=np.uint8) % 2, (H, 1)), mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 254 * 3)
    la = np.zeros((H, W, 2), np.uint8)
    la[:, : W // 2] = (30, 0)  # transparent: white
    la[:, W // 2 :] = (100, 255)  # opaque gray 100
    one = np.zeros((H, W), bool)
    one[:, W // 2 :] = True  # left black, right white
    cmyk_red = Image.new("CMYK", (W, H), (0, 255, 255, 0))
    return {
        "an rgb card": ("rgb.png", _encode(Image.new("RGB", (W, H), (200, 30, 30)), "PNG")),
        "a gray card": ("l.png", _encode(Image.new("L", (W, H), 100), "PNG")),
        "a palette with a hole": ("p.png", _encode(palette, "PNG", transparency=0)),  # red stripes transparent
        "a blue half": ("rgba.png", _encode(Image.fromarray(rgba, mode="RGBA"), "PNG")),
        "a cmyk jpeg": ("cmyk.jpg", _encode(cmyk_red, "JPEG", quality=95)),
        "a cmyk tiff": ("cmyk.tif", _encode(cmyk_red, "TIFF")),
        "a 16-bit gray": ("i16.png", _encode(Image.new("I;16", (W, H), 32768), "PNG")),
        "a gray with alpha": ("la.png", _encode(Image.fromarray(la, mode="LA"), "PNG")),
        "a one-bit image": ("one.png", _encode(Image.fromarray(one), "PNG")),
        "a float image": ("f.tif", _encode(Image.new("F", (W, H), 0.5), "TIFF")),
    }


def bad_images() -> dict[str, tuple[str, bytes, str]]:
    """caption -> (file name, bytes, the skip reason expected)."""
    rng = random.Random(0)
    noise = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(256) for _ in range(32 * 32 * 3)))
    png = _encode(noise, "PNG")
    return {
        "random bytes": ("corrupt.png", bytes(rng.randrange(256) for _ in range(500)), "not_an_image"),
        "a truncated png": ("truncated.png", png[: len(png) // 2], "truncated"),
        "a zero-byte file": ("empty.png", b"", "empty_file"),
        "a text file": ("text.jpg", b"this is not a jpeg, just some words\n" * 5, "not_an_image"),
        "a decompression bomb": ("bomb.png", bomb_png(), "too_large"),
        "a big photo": ("big.png", _encode(Image.new("RGB", (400, 300), (0, 90, 0)), "PNG"), "too_large"),
    }


def write_folder(root: Path, rows: list[dict], files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name).write_bytes(content)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> Path:
    """The imagefolder of every mode and every fault, good and bad rows interleaved."""
    goods, bads = good_images(), bad_images()
    files = {name: content for name, content in goods.values()}
    files.update({name: content for name, content, _ in bads.values()})
    files["plain.png"] = goods["an rgb card"][1]
    rows = []
    for (caption, (name, _)), (bad_caption, (bad_name, _, _)) in zip(goods.items(), bads.items()):
        rows += [{"file_name": name, "text": caption}, {"file_name": bad_name, "text": bad_caption}]
    rows += [{"file_name": name, "text": caption} for caption, (name, _) in list(goods.items())[len(bads) :]]
    rows += [
        {"file_name": "not-there.png", "text": "a file that does not exist"},
        {"file_name": "plain.png", "text": ""},
        {"file_name": "plain.png", "text": " \t\n  "},
        {"file_name": "plain.png", "text": None},
        {"file_name": "plain.png", "text": "long " + "x" * (LONG - 5)},
    ]
    return write_folder(tmp_path_factory.mktemp("faulty"), rows, files)


EXPECTED_SKIPS = {
    "not_an_image": 2,
    "truncated": 1,
    "empty_file": 1,
    "too_large": 2,
    "missing_image": 1,
    "empty_caption": 2,
    "missing_caption": 1,
}


def _cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), image_size=S, **kw)


@pytest.fixture(scope="module")
def loaded(faulty):
    before = Image.MAX_IMAGE_PIXELS
    stream = ExampleStream(_cfg(faulty, max_image_pixels=MAX_PIXELS), "train", train=False)
    examples = {ex["caption"][:20]: ex["image"] for ex in stream}
    Image.MAX_IMAGE_PIXELS = before
    return stream, examples


# ----------------------------------------------------------------------------------------------
# good images: every mode arrives as RGB on white, (3, S, S) in [0, 1]
# ----------------------------------------------------------------------------------------------


def test_every_good_image_loads_as_a_float_rgb_tensor(loaded):
    _, examples = loaded
    assert set(examples) == {c[:20] for c in good_images()} | {"long " + "x" * 15}
    for caption, image in examples.items():
        assert image.shape == (3, S, S) and image.dtype == torch.float32, caption
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1, caption


def _pixels(examples, caption: str) -> np.ndarray:
    return to_uint8(examples[caption[:20]]).astype(int)  # (S, S, 3)


def test_modes_are_converted_sensibly(loaded):
    _, ex = loaded
    assert (_pixels(ex, "an rgb card") == [200, 30, 30]).all()
    assert (_pixels(ex, "a gray card") == 100).all()
    # 16-bit mid-gray stays mid-gray (PIL's own convert would clip it to white); float 0.5 likewise
    assert (abs(_pixels(ex, "a 16-bit gray") - 128) <= 1).all()
    assert (abs(_pixels(ex, "a float image") - 128) <= 1).all()
    # CMYK (0, 255, 255, 0) is red, from a JPEG (lossy) and a TIFF
    assert (abs(_pixels(ex, "a cmyk jpeg") - [255, 0, 0]) <= 8).all()
    assert (_pixels(ex, "a cmyk tiff") == [255, 0, 0]).all()
    # transparency composites on white: RGBA, LA and a palette's transparent index
    blue = _pixels(ex, "a blue half")
    assert (blue[:, :4] == 255).all() and (blue[:, -4:] == [40, 80, 220]).all()
    la = _pixels(ex, "a gray with alpha")
    assert (la[:, :4] == 255).all() and (la[:, -4:] == 100).all()
    palette = _pixels(ex, "a palette with a hole")
    assert not (palette == [255, 0, 0]).all(-1).any()  # the transparent red index is gone
    assert (palette == [255, 255, 255]).all(-1).any() and (palette[..., 2] > 0).all()
    one = _pixels(ex, "a one-bit image")
    assert (one[:, :4] == 0).all() and (one[:, -4:] == 255).all()


# ----------------------------------------------------------------------------------------------
# bad data: skipped with its reason, counted, logged
# ----------------------------------------------------------------------------------------------


def test_each_bad_record_is_skipped_with_its_reason_and_counted(loaded):
    stream, examples = loaded
    assert dict(stream.skipped) == EXPECTED_SKIPS
    assert stream.n_skipped == sum(EXPECTED_SKIPS.values())
    assert len(examples) + stream.n_skipped == stream.length == len(good_images()) + len(bad_images()) + 5
    assert set(stream.skipped) <= set(SKIP_REASONS)


def test_a_streamed_and_filtered_folder_skips_its_bad_records_as_a_loaded_one_does(faulty):
    """Once: a stream ran the caption filter on whole records, which decoded every image, so the first corrupt one
    stopped the run (a traceback from train.tokenizer, 'could not be read' from the others)."""
    seen = []
    for streaming in (False, True):
        cfg = _cfg(faulty, max_image_pixels=MAX_PIXELS, streaming=streaming, exclude="no caption says this")
        stream = ExampleStream(cfg, "train", train=False)
        seen.append(([ex["caption"] for ex in stream], dict(stream.skipped)))
    assert seen[0] == seen[1] and seen[0][0] and sum(seen[0][1].values()) >= len(bad_images())


@pytest.mark.parametrize("caption", list(bad_images()))
def test_one_bad_file_gives_exactly_its_reason(caption):
    name, content, reason = bad_images()[caption]
    with pytest.raises(data.UnusableRecord) as skip:
        data.decode_image({"bytes": content, "path": name}, MAX_PIXELS)
    assert skip.value.reason == reason


def test_a_long_thin_image_too_large_once_resized_is_skipped_before_the_resize(tmp_path):
    """Once: a 116-byte PNG of 12,000 x 1 pixels was resized to 256 x 3,072,000 (3.5 GB of memory) before its crop."""
    files = {"long.png": _encode(Image.new("RGB", (12_000, 1), (9, 9, 9)), "PNG"),
             "fine.png": _encode(Image.new("RGB", (40, 30), (9, 9, 9)), "PNG")}  # fmt: skip
    root = write_folder(tmp_path / "d", [{"file_name": n, "text": n} for n in files], files)
    stream = ExampleStream(_cfg(root, max_image_pixels=40_000_000), "train", train=False)
    stream.cfg.image_size = 256
    assert [ex["caption"] for ex in stream] == ["fine.png"] and dict(stream.skipped) == {"too_large": 1}
    with pytest.raises(data.UnusableRecord, match="12000x1, its shorter side resized to 256: 256x3072000 > 40000000"):
        data.check_resized(Image.new("RGB", (12_000, 1)), 256, 40_000_000)
    data.check_resized(Image.new("RGB", (600, 1)), 256, 40_000_000)  # 256 x 153,600 pixels: within the limit


def test_a_bomb_is_too_large_even_under_the_default_limit():
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = DataConfig().max_image_pixels  # as ExampleStream sets it
    try:
        with pytest.raises(data.UnusableRecord) as skip:
            data.decode_image(bomb_png(), DataConfig().max_image_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = before
    assert skip.value.reason == "too_large"


def test_skips_are_logged_with_their_reason(faulty, caplog):
    with caplog.at_level(logging.WARNING, logger="dalle_mini_impl.data.streams"):
        list(ExampleStream(_cfg(faulty, max_image_pixels=MAX_PIXELS), "train", train=False))
    logged = " ".join(r.getMessage() for r in caplog.records)
    for reason in EXPECTED_SKIPS:
        assert f": {reason} " in logged or logged.endswith(f": {reason}") or f" {reason} " in logged, reason


def test_a_long_caption_is_cut_to_max_caption_chars(faulty):
    for limit in (2000, 77):
        stream = ExampleStream(_cfg(faulty, max_image_pixels=MAX_PIXELS, max_caption_chars=limit), "train", train=False)
        long = [ex["caption"] for ex in stream if ex["caption"].startswith("long ")]
        assert long == ["long " + "x" * (limit - 5)]
        assert all(len(ex["caption"]) <= limit for ex in stream)


def test_the_stats_command_counts_the_same_skips(faulty, capsys):
    argv = [
        "stats",
        "--data",
        str(faulty),
        "--set",
        f"data.image_size={S}",
        "--set",
        f"data.max_image_pixels={MAX_PIXELS}",
    ]
    assert data_cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == len(good_images()) + 1
    assert out["skipped_by_reason"] == dict(sorted(EXPECTED_SKIPS.items()))


# ----------------------------------------------------------------------------------------------
# captions: lists, non-text values, a metadata file that mixes types
# ----------------------------------------------------------------------------------------------


def test_caption_lists_yield_one_of_their_captions(tmp_path):
    png = _encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG")
    rows = [
        {"file_name": "a.png", "text": ["first option", "  second   option "]},
        {"file_name": "a.png", "text": ["", "   "]},
        {"file_name": "a.png", "text": []},
        {"file_name": "a.png", "text": ["x" * 3000]},
    ]
    folder = write_folder(tmp_path / "lists", rows, {"a.png": png})
    stream = ExampleStream(_cfg(folder), "train", train=False)
    captions = [ex["caption"] for ex in stream]
    assert len(captions) == 2 and captions[0] in {"first option", "second option"}
    assert captions[1] == "x" * DataConfig().max_caption_chars
    assert dict(stream.skipped) == {"empty_caption": 2}


def test_non_text_captions_are_skipped_and_nothing_readable_is_one_sentence(tmp_path, capsys):
    png = _encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG")
    rows = [
        {"file_name": "a.png", "text": 7},
        {"file_name": "a.png", "text": 2.5},
        {"file_name": "a.png", "text": None},
    ]
    folder = write_folder(tmp_path / "numbers", rows, {"a.png": png})
    with pytest.raises(UserError) as e:
        list(ExampleStream(_cfg(folder), "train", train=False))
    message = str(e.value)
    assert f"data set '{folder}'" in message and "has no readable example" in message
    assert "(3 skipped: bad_caption: 2, missing_caption: 1)" in message and "\n" not in message
    # the command says the same sentence and exits 2
    with pytest.raises(SystemExit) as exit_info:
        run_cli(data_cli.main, ["stats", "--data", str(folder)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    last = err.splitlines()[-1]  # datasets' progress bars may come before it
    assert last.startswith("error: data set") and "has no readable example" in last
    assert err.count("error:") == 1 and "Traceback" not in err


def test_a_folder_of_only_broken_files_is_one_sentence(tmp_path):
    bads = bad_images()
    files = {name: content for name, content, _ in bads.values()}
    rows = [{"file_name": name, "text": caption} for caption, (name, _, _) in bads.items()]
    folder = write_folder(tmp_path / "broken", rows, files)
    with pytest.raises(UserError, match=r"has no readable example \(6 skipped: empty_file: 1, not_an_image: 2, "):
        list(ExampleStream(_cfg(folder, max_image_pixels=MAX_PIXELS), "train", train=False))


@pytest.mark.parametrize(
    "rows, says",
    [
        ([{"text": "a string"}, {"text": 5}], "has 'text' as a number (5) where earlier lines have a string"),
        ([{"text": "a string"}, {"text": ["a", "list"]}], "has 'text' as a list of a string (['a', 'list'])"),
        ([{"text": "a string"}, {"file_name": 12}], "has 'file_name' as a number (12) where earlier lines have a str"),
        ([{"text": "a string"}, {"text": ["a", 3]}], "has 'text' as a list of a number and a string (one type a list)"),
    ],
    ids=["string-then-number", "string-then-list", "number-as-file-name", "list-with-a-number"],
)
def test_a_metadata_line_the_reader_refuses_is_left_out_with_its_image_and_named(tmp_path, rows, says, caplog):
    """The JSON reader types each column from all its rows, so one such line stopped the whole split (once as a
    traceback, then as a sentence naming the line): bad data must never stop training. The line is left out with
    its image, counted and named in one warning; the other rows train."""
    png = _encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG")
    rows = [{"file_name": "a.png", "text": "x"} | row for row in rows]
    folder = write_folder(tmp_path / "mixed", rows, {"a.png": png})
    with caplog.at_level(logging.WARNING, logger="dalle_mini_impl.data.streams"):
        captions = [ex["caption"] for ex in ExampleStream(_cfg(folder), "train", train=False)]
    assert captions == ["a string"]
    assert "1 line(s) of its metadata.jsonl are left out with their images (the first: line 2 of " in caplog.text
    assert says in caplog.text


def test_a_metadata_file_of_no_good_line_is_one_sentence_naming_the_first(tmp_path):
    png = _encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG")
    folder = write_folder(tmp_path / "mixed", [{"file_name": "a.png", "text": ["a", 3]}], {"a.png": png})
    with pytest.raises(UserError) as e:
        list(ExampleStream(_cfg(folder), "train", train=False))
    assert str(e.value) == (
        f"data set '{folder}' could not be read: line 1 of '{folder / 'metadata.jsonl'}' has 'text' as a list of "
        "a number and a string (one type a list); fix or remove that line"
    )


def test_metadata_not_utf8_is_a_line_left_out(tmp_path, caplog):
    png = _encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG")
    folder = write_folder(tmp_path / "latin", [{"file_name": "a.png", "text": "ok"}], {"a.png": png})
    with open(folder / "metadata.jsonl", "ab") as f:
        f.write(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with caplog.at_level(logging.WARNING, logger="dalle_mini_impl.data.streams"):
        assert [ex["caption"] for ex in ExampleStream(_cfg(folder), "train", train=False)] == ["ok"]
    assert re.search(r"line 2 of '.*metadata.jsonl' is not UTF-8 text \(byte 0xe9 at column 36\)", caplog.text)


@pytest.mark.parametrize("text", ["", "{not json\n", "[1, 2]\n"], ids=["empty", "bad-json", "array"])
def test_a_broken_metadata_file_is_one_sentence(tmp_path, text):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "a.png").write_bytes(_encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG"))
    (folder / "metadata.jsonl").write_text(text)
    with pytest.raises(UserError) as e:
        list(ExampleStream(_cfg(folder), "train", train=False))
    assert f"data set '{folder}'" in str(e.value) and "\n" not in str(e.value)


def _write_tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[:cut])


def _samples(n: int) -> list[tuple[str, bytes]]:
    png = _encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG")
    return [m for i in range(n) for m in ((f"{i:03d}.png", png), (f"{i:03d}.txt", f"sample {i}".encode()))]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize(
    "how",
    ["cut-in-the-header", "not-a-tar", "a-member-missing"],
)
def test_a_broken_webdataset_archive_is_one_sentence(tmp_path, how, streaming):
    shard = tmp_path / "shards" / "000.tar"
    if how == "cut-in-the-header":
        _write_tar(shard, _samples(3), cut=700)
    elif how == "not-a-tar":
        shard.parent.mkdir(parents=True)
        shard.write_bytes(b"hello, not an archive\n" * 100)
    else:
        _write_tar(shard, [*_samples(2), ("002.png", _samples(1)[0][1])])
    cfg = _cfg(tmp_path / "shards" / "*.tar", image_column="png", caption_column="txt", streaming=streaming)
    try:
        examples = list(ExampleStream(cfg, "train", train=False))
    except UserError as e:
        assert str(e).startswith(f"data set '{cfg.source}'") and "\n" not in str(e)
    else:  # the datasets reader took the sample without its caption: counted as a skip
        assert how == "a-member-missing" and [ex["caption"] for ex in examples] == ["sample 0", "sample 1"]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("where", ["first", "late"])
def test_a_webdataset_caption_that_is_not_utf8_is_skipped_and_counted(tmp_path, where, streaming):
    """Once `datasets`' reader decoded it strictly and stopped: the whole data set refused, or a streamed run
    stopped at that record, and every resume stopped there again."""
    shard = tmp_path / "shards" / "000.tar"
    good = _samples(30)
    bad = [("bad.png", good[0][1]), ("bad.txt", b"caf\xe9 latin-1")]
    _write_tar(shard, bad + good if where == "first" else good[:40] + bad + good[40:])
    cfg = _cfg(tmp_path / "shards" / "*.tar", image_column="png", caption_column="txt", streaming=streaming)
    stream = ExampleStream(cfg, "train", train=False)
    captions = [ex["caption"] for ex in stream]
    assert captions == [f"sample {i}" for i in range(30)]
    assert dict(stream.skipped) == {"bad_caption": 1}


def test_a_webdataset_archive_cut_short_is_named_in_a_warning(tmp_path, caplog):
    """`tarfile` stops at a cut silently: half a shard's samples were lost with no word and no count."""
    whole, cut = tmp_path / "shards" / "000.tar", tmp_path / "shards" / "001.tar"
    _write_tar(whole, _samples(10))
    _write_tar(cut, _samples(10), cut=len(whole.read_bytes()) // 2)
    cfg = _cfg(tmp_path / "shards" / "*.tar", image_column="png", caption_column="txt")
    with caplog.at_level(logging.WARNING):
        n = len(list(ExampleStream(cfg, "train", train=False)))
    said = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert n < 20 and len(said) == 1 and str(cut) in said[0] and str(whole) not in said[0]


def test_an_archive_cut_after_a_member_ending_in_zeros_is_found_and_a_whole_one_walked_once(tmp_path, monkeypatch):
    """An archive cut just after a member whose data ends in zeros (an uncompressed black image) ends in zero
    blocks as a whole one does: a check of its last blocks alone passed it, losing the samples after the cut."""
    members = [*_samples(2), ("002.bmp", bytes(4096)), ("002.txt", b"black"), *_samples(5)[4:]]
    whole = tmp_path / "whole.tar"
    _write_tar(whole, members)
    with tarfile.open(whole) as archive:
        black = archive.getmember("002.bmp")
    cut = tmp_path / "cut.tar"
    _write_tar(cut, members, cut=black.offset_data + 4096)  # right after the zeros, at a block's end
    assert data.check_archives("x", [str(cut), str(whole)]) == [str(cut)]
    assert data.check_archives("x", [str(cut)]) == [str(cut)]  # said at every open, never taken as whole
    # the whole one, walked once, is not walked again while it is unchanged
    walk = tarfile.open

    def walked(*args, **kwargs):
        raise AssertionError("walked again")

    monkeypatch.setattr(tarfile, "open", walked)
    assert data.check_archives("x", [str(whole)]) == []
    # ... and is walked again once it changes (cut short since)
    monkeypatch.setattr(tarfile, "open", walk)
    whole.write_bytes(cut.read_bytes())
    assert data.check_archives("x", [str(whole)]) == [str(whole)]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("suffix, compress", [("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)])
def test_a_webdataset_member_that_decompresses_past_the_limit_is_one_sentence(
    tmp_path, monkeypatch, suffix, compress, streaming
):
    """`datasets`' reader decompresses a .gz/.bz2/.xz member whole into memory, of a field no column names too,
    already while it infers the columns: a shard of a few MB holding gigabytes of gzipped zeros ended in a
    MemoryError traceback, or filled the machine's memory."""
    monkeypatch.setattr(data, "MAX_INFLATED_MEMBER_BYTES", 2**20)  # the check as at the real limit, on a tiny shard
    shard = tmp_path / "shards" / "000.tar"
    _write_tar(shard, [*_samples(2), (f"001.meta.{suffix}", compress(bytes(2**20 + 1)))])
    cfg = _cfg(tmp_path / "shards" / "*.tar", image_column="png", caption_column="txt", streaming=streaming)
    with pytest.raises(UserError) as e:
        list(ExampleStream(cfg, "train", train=False))
    said = str(e.value)
    assert f"member '001.meta.{suffix}' of archive '{shard}' decompresses to more than 1 MiB" in said
    assert said.endswith("remove it from the shard, or store it uncompressed") and "\n" not in said


def test_a_compressed_webdataset_member_below_the_limit_is_read(tmp_path, monkeypatch):
    """The limit refuses only what would not fit: a sample's small .json.gz is decompressed and read as before,
    and its archive, found whole, is not walked again."""
    monkeypatch.setattr(data, "MAX_INFLATED_MEMBER_BYTES", 2**20)
    meta = [(f"{i:03d}.json.gz", gzip.compress(json.dumps({"i": i, "pad": "x" * 2**19}).encode())) for i in range(3)]
    shard = tmp_path / "shards" / "000.tar"
    samples = _samples(3)
    _write_tar(shard, [m for i in range(3) for m in (samples[2 * i], samples[2 * i + 1], meta[i])])
    cfg = _cfg(tmp_path / "shards" / "*.tar", image_column="png", caption_column="txt")
    stream = ExampleStream(cfg, "train", train=False)
    assert [ex["caption"] for ex in stream] == [f"sample {i}" for i in range(3)]
    assert any(stamp[0] == str(shard) for stamp in data._COMPLETE_ARCHIVES)


def test_images_no_metadata_row_names_are_counted_in_a_warning(tmp_path, caplog):
    """The imagefolder reader leaves out an image that no metadata.jsonl row names, without a word."""
    png = _encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG")
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": "sub/b.png", "text": "b"}]
    folder = write_folder(tmp_path / "some", rows, {"a.png": png, "c.png": png})
    (folder / "sub").mkdir()
    (folder / "sub" / "b.png").write_bytes(png)
    with caplog.at_level(logging.WARNING):
        captions = [ex["caption"] for ex in ExampleStream(_cfg(folder), "train", train=False)]
    assert captions == ["a", "b"]
    said = [r.getMessage() for r in caplog.records if "no row in its metadata.jsonl" in r.getMessage()]
    assert len(said) == 1 and "1 image file(s)" in said[0] and str(folder / "c.png") in said[0]


def test_one_process_share_with_nothing_readable_says_it_is_that_share(tmp_path):
    """The sentence said the data set had no readable example, of a set whose other process read its share."""
    png = _encode(Image.new("RGB", (W, H), (1, 2, 3)), "PNG")
    rows = [{"file_name": "good.png", "text": "fine"}, {"file_name": "empty.png", "text": "broken"}]
    folder = write_folder(tmp_path / "half", rows, {"good.png": png, "empty.png": b""})
    assert [ex["caption"] for ex in ExampleStream(_cfg(folder), "train", train=False, num_processes=2)] == ["fine"]
    with pytest.raises(UserError, match=r"^process 1's share of data set '.*half' \(split 'train'\) has no readable"):
        list(ExampleStream(_cfg(folder), "train", train=False, process_index=1, num_processes=2))


def test_a_folder_of_no_data_is_one_sentence_naming_what_it_lacks(tmp_path):
    """A run folder given as --data was "Instruction 'train' corresponds to no data!" blamed on its metadata file;
    an empty folder was an EmptyDatasetError blamed on the network."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "vae.safetensors").write_bytes(b"x")
    for folder in (run, tmp_path / "empty"):
        folder.mkdir(exist_ok=True)
        with pytest.raises(UserError, match=f"^data folder '{folder}' holds no images, .parquet or .tar files; give"):
            list(ExampleStream(_cfg(folder), "train", train=False))
