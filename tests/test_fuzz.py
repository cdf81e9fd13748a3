"""Fuzzing (issue 9, item 5): hundreds of generated bad inputs, each a skip or a clean error, never a crash.

Seeded (random.Random(0)), so a failure names a case that reruns the same way.

(a) The data loader reads a few folders built from generated files: random bytes, valid PNG/JPEG/GIF/
    BMP/TIFF/WebP/TGA/PPM files cut at random lengths or with flipped bytes, valid images of random modes
    and sizes (1x1 up to 300x7) under right or wrong extensions, odd captions; then folders of random
    metadata rows (missing files, wrong column types, broken lines) as JSON lines and CSV, a parquet
    file and a webdataset shard. Every record is yielded as a (3, S, S) tensor in [0, 1] or skipped
    with a known reason and counted; every valid image is yielded; a folder the reader refuses as a
    whole is one sentence (UserError) naming it.
(b) `python -m sample` runs in-process (main(argv) under run_cli) on one tiny bundle with odd prompts
    (empty, blank, 10,000 characters, emoji, RTL, control characters, undecodable bytes as argv carries
    them: lone surrogates), odd numbers for every numeric flag, unknown choices, broken --init-image
    files, --out on a file, and broken bundles (truncated safetensors, bad or mutated JSON, missing
    files). Every case exits 0 with files only under --out, or exits 2 with exactly one "error: ..."
    line and no traceback, within a time limit.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_mini_impl.config import DataConfig
from dalle_mini_impl.data.streams import SKIP_REASONS, ExampleStream
from dalle_mini_impl.errors import UserError, run_cli
from sample.__main__ import main as sample_main
from tests.bundle_factory import make_tiny_bundle

# PIL warns about the corrupt files it is fed here (EXIF, truncated TIFF tags); that is the point
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

S = 16
CASE_SECONDS = 30  # a case that takes longer counts as a hang


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Fail `what` if it runs longer than `seconds` (SIGALRM: the main thread on POSIX)."""

    def alarm(signum, frame):
        raise Hang(f"{what} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def one_thread_and_pil_limit():
    threads, pixels = torch.get_num_threads(), Image.MAX_IMAGE_PIXELS
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    Image.MAX_IMAGE_PIXELS = pixels  # ExampleStream sets PIL's process-wide limit from its config


# ----------------------------------------------------------------------------------------------
# Generated files
# ----------------------------------------------------------------------------------------------

# mode -> formats that write it (Pillow); the reader gets every one of them
FORMATS = {
    "1": ["PNG", "BMP", "TIFF", "GIF"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "TGA", "PPM"],
    "P": ["PNG", "GIF", "TIFF", "BMP"],
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "TGA", "PPM"],
    "RGBA": ["PNG", "TIFF", "WEBP", "TGA"],
    "LA": ["PNG", "TIFF"],
    "PA": ["TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "YCbCr": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I;16B": ["TIFF"],
    "I": ["TIFF", "PPM"],
    "F": ["TIFF", "PPM"],
}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
NAMED = list(SUFFIX.values())  # the suffixes imagefolder lists; TGA and PPM files go under one of them


def random_size(rng: random.Random) -> tuple[int, int]:
    """1x1 up to 300 on one side and a few pixels on the other (300x7, 7x300), sometimes tiny."""
    if rng.random() < 0.15:
        return rng.choice([(1, 1), (1, 2), (2, 1), (300, 7), (7, 300), (300, 1), (1, 300)])
    long, short = rng.randint(1, 300), rng.randint(1, 24)
    return (long, short) if rng.random() < 0.5 else (short, long)


def random_image(rng: random.Random) -> tuple[Image.Image, str]:
    """A PIL image of a random mode and size with random pixels, and a format that can write it."""
    mode = rng.choice(list(FORMATS))
    w, h = random_size(rng)
    g = np.random.default_rng(rng.randrange(2**32))
    if mode == "1":
        img = Image.fromarray(g.random((h, w)) < 0.5)
    elif mode in ("I;16", "I;16B"):
        dtype = "<u2" if mode == "I;16" else ">u2"
        img = Image.frombytes(mode, (w, h), g.integers(0, 65536, (h, w)).astype(dtype).tobytes())
    elif mode == "I":
        img = Image.frombytes("I", (w, h), g.integers(-(2**20), 2**20, (h, w)).astype("<i4").tobytes())
    elif mode == "F":
        values = g.normal(0.5, rng.choice([0.1, 10.0, 1e6]), (h, w)).astype("<f4")
        if rng.random() < 0.2:
            values.flat[0] = rng.choice([np.nan, np.inf, -np.inf])
        img = Image.frombytes("F", (w, h), values.tobytes())
    else:
        bands = {"L": 1, "P": 1, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4, "LA": 2, "PA": 2}[mode]
        img = Image.frombytes(mode, (w, h), g.integers(0, 256, h * w * bands, dtype=np.uint8).tobytes())
        if mode in ("P", "PA"):
            img.putpalette(g.integers(0, 256, 768, dtype=np.uint8).tobytes())
            if mode == "P" and rng.random() < 0.5:
                img.info["transparency"] = rng.randrange(256)
    return img, rng.choice(FORMATS[mode])


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    kwargs = {"transparency": img.info["transparency"]} if "transparency" in img.info and fmt in ("PNG", "GIF") else {}
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def valid_file(rng: random.Random) -> tuple[bytes, str, str]:
    """(bytes, file suffix, description) of a valid image; sometimes under another format's suffix."""
    img, fmt = random_image(rng)
    data = encode(img, fmt)
    suffix = SUFFIX.get(fmt) or rng.choice(NAMED)
    if rng.random() < 0.15:
        suffix = rng.choice(NAMED)  # a PNG named .jpg: the reader goes by the bytes
    return data, suffix, f"{img.mode} {img.size[0]}x{img.size[1]} as {fmt}{suffix}"


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG with correct CRCs whose header claims width x height pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def broken_file(rng: random.Random) -> tuple[bytes, str, str]:
    """(bytes, suffix, description) of a file that may or may not decode: never a valid image by design."""
    kind = rng.choice(["random", "truncated", "truncated", "flipped", "text", "empty", "bomb", "header-only"])
    if kind == "random":
        data = rng.randbytes(rng.choice([1, 2, 8, 64, rng.randint(1, 4000)]))
    elif kind in ("truncated", "flipped", "header-only"):
        img, fmt = random_image(rng)
        data = encode(img, fmt)
        if kind == "truncated":
            data = data[: rng.randrange(len(data))]
        elif kind == "header-only":
            data = data[: rng.randint(8, 40)]
        else:
            buf = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf)
        kind = f"{kind} {fmt} {img.mode} {img.size}"
    elif kind == "text":
        data = ("caption: " + "".join(rng.choice("abc \n{}<>") for _ in range(rng.randint(1, 300)))).encode()
    elif kind == "empty":
        data = b""
    else:
        data = bomb_png(rng.choice([40_000, 2**31 - 1, 100_000]), rng.choice([40_000, 2**31 - 1, 1]))
    return data, rng.choice(NAMED), kind


ODD_CAPTIONS = [
    "",
    " ",
    "\t\n \r",
    "🐱🔴🟦",
    "👩‍👩‍👧 family",
    "دائرة حمراء على اليسار",
    "\u202eright-to-left override",
    "赤い円",
    "\x1b[31mred\x1b[0m",
    "a\x00nul",
    "\ufeffbom",
    "\u200b",
    "a\u0301" * 50,
    "x" * 3000,
    "line one\nline two",
    "'quotes\" and \\backslashes",
]


def caption(rng: random.Random, i: int) -> str:
    """Mostly a unique caption naming the row, sometimes an odd one."""
    return rng.choice(ODD_CAPTIONS) if rng.random() < 0.2 else f"row {i} {rng.choice(ODD_CAPTIONS[3:])}"


def write_metadata(folder: Path, rows: list, name: str = "metadata.jsonl") -> None:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")


def check_examples(examples: list[dict], max_chars: int) -> None:
    for ex in examples:
        image, text = ex["image"], ex["caption"]
        assert image.shape == (3, S, S) and image.dtype == torch.float32, text
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1, text
        assert isinstance(text, str) and text.strip() and len(text) <= max_chars and text == " ".join(text.split())


def read_all(cfg: DataConfig, what: str) -> tuple[list[dict] | None, ExampleStream | None, str]:
    """One evaluation pass: (examples, stream, '') or (None, None, the UserError's sentence)."""
    t0 = time.perf_counter()
    try:
        with time_limit(CASE_SECONDS * 4, what):
            stream = ExampleStream(cfg, "train", train=False)
            examples = list(stream)
    except UserError as e:
        message = str(e)
        assert "\n" not in message and message, f"{what}: {message!r}"
        print(f"{what}: refused in {time.perf_counter() - t0:.2f} s: {message[:150]}")
        return None, None, message
    check_examples(examples, cfg.max_caption_chars)
    assert set(stream.skipped) <= set(SKIP_REASONS), f"{what}: {dict(stream.skipped)}"
    assert all(n > 0 for n in stream.skipped.values())
    print(f"{what}: {len(examples)} read, {dict(stream.skipped)} skipped in {time.perf_counter() - t0:.2f} s")
    return examples, stream, ""


# ----------------------------------------------------------------------------------------------
# (a) the data loader
# ----------------------------------------------------------------------------------------------

N_FILES = 300  # image files in the big folder
N_META_FOLDERS = 24  # small folders of random metadata rows (JSON lines)
N_CSV_FOLDERS = 8


def _files_folder(root: Path, rng: random.Random) -> tuple[list[dict], dict[str, str]]:
    """The big folder: N_FILES rows; returns the rows and, for each valid image with a real caption, its desc."""
    root.mkdir()
    rows, valid = [], {}
    for i in range(N_FILES):
        good = rng.random() < 0.5
        data, suffix, desc = valid_file(rng) if good else broken_file(rng)
        name = f"f{i:03d}{suffix}"
        (root / name).write_bytes(data)
        text = caption(rng, i)
        rows.append({"file_name": name, "text": text})
        if good and text.strip():
            valid[" ".join(text.split())[:2000]] = desc
    write_metadata(root, rows)
    return rows, valid


def test_the_data_loader_survives_generated_bad_files(tmp_path):
    """300 generated files in one imagefolder, read as a map-style data set and as a stream."""
    rng = random.Random(0)
    rows, valid = _files_folder(tmp_path / "files", rng)
    for streaming in (False, True):
        cfg = DataConfig(source=str(tmp_path / "files"), image_size=S, streaming=streaming)
        examples, stream, error = read_all(cfg, f"files folder (streaming={streaming})")
        assert not error, error
        assert len(examples) + stream.n_skipped == len(rows)
        got = {ex["caption"] for ex in examples}
        missing = {c: d for c, d in valid.items() if c not in got}
        assert not missing, f"valid images were skipped ({dict(stream.skipped)}): {missing}"
        assert stream.skipped["empty_caption"] == sum(not r["text"].strip() for r in rows)


META_IMAGE = "ok.png"


def _random_value(rng: random.Random):
    return rng.choice(
        [
            None,
            0,
            -1,
            2.5,
            1e308,
            True,
            "",
            "text",
            "\udcff",
            [],
            ["a", "b"],
            ["", " "],
            ["a", 1],
            [None],
            {"k": "v"},
            {},
            "x" * 5000,
            [["nested"]],
        ]
    )


def _random_row(rng: random.Random, i: int, text_kind: str | None):
    """A metadata row. text_kind None: anything goes (a broken line, any type anywhere), which the JSON reader
    mostly refuses as a whole; else file names stay strings or null and captions keep to that kind."""
    if text_kind is None:
        if rng.random() < 0.1:
            return rng.choice(["", "{", "null", "[1, 2]", '"a string"', "42", "{'single': 'quotes'}", "\x00"])
        row = {"file_name": META_IMAGE, "text": f"meta {i}"}
        what = rng.choice(["ok", "file", "text", "both", "extra", "drop"])
        if what in ("file", "both"):
            row["file_name"] = rng.choice([_random_value(rng), "../outside.png", "/etc/hostname"])
        if what in ("text", "both"):
            row["text"] = _random_value(rng)
        if what == "extra":
            row[rng.choice(["width", "label", "image", "tags"])] = _random_value(rng)
        if what == "drop":
            del row[rng.choice(["file_name", "text"])]
        return row
    name = rng.choice([META_IMAGE, META_IMAGE, META_IMAGE, "missing.png", "sub/dir/none.jpg", "bad.png", None])
    texts = {
        "str": [f"meta {i}", f"meta {i}", "", "  ", "x" * 5000, "🐱", "a\nb", None],
        "list": [[f"meta {i}", "other"], [f"meta {i}"], [], ["", " "], None],
        "number": [i, -1.5, 1e308, None],
    }[text_kind]
    row = {"file_name": name, "text": rng.choice(texts)}
    if rng.random() < 0.15:
        del row[rng.choice(["file_name", "text"])]
    return row


def _csv_cell(rng: random.Random) -> str:
    cell = rng.choice(["ok.png", "missing.png", "", "meta", "a, comma", 'a "quote"', "1", "x" * 500, "line\nbreak"])
    return '"' + cell.replace('"', '""') + '"' if rng.random() < 0.5 or "," in cell or "\n" in cell else cell


def test_the_data_loader_survives_random_metadata(tmp_path):
    """Small imagefolders of random JSON-lines and CSV metadata rows: each a pass with skips or one sentence."""
    rng = random.Random(0)
    image = encode(Image.new("RGB", (20, 16), (9, 99, 199)), "PNG")
    outcomes = {"read": 0, "refused": 0}
    for k in range(N_META_FOLDERS + N_CSV_FOLDERS):
        folder = tmp_path / f"m{k:02d}"
        folder.mkdir()
        (folder / META_IMAGE).write_bytes(image)
        (folder / "bad.png").write_bytes(rng.randbytes(100))
        if k < N_META_FOLDERS:
            text_kind = rng.choice([None, "str", "str", "list", "number"])
            rows = [_random_row(rng, i, text_kind) for i in range(rng.randint(1, 12))]
            write_metadata(folder, rows)
        else:
            rows = [",".join(_csv_cell(rng) for _ in range(2)) for _ in range(rng.randint(1, 10))]
            header = rng.choice(["file_name,text", "file_name,text", "text,file_name", "file_name", "name,text"])
            (folder / "metadata.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
        cfg = DataConfig(source=str(folder), image_size=S, streaming=rng.random() < 0.3)
        examples, stream, error = read_all(cfg, f"metadata folder {folder.name}")
        if error:
            outcomes["refused"] += 1
            assert f"'{folder}'" in error, error  # the sentence names the folder
        else:
            outcomes["read"] += 1
            assert len(examples) + stream.n_skipped == sum(1 for _ in stream.source.dataset)  # every record
    assert outcomes["read"] > 5 and outcomes["refused"] > 5, outcomes  # both paths were exercised


def test_the_data_loader_survives_bad_parquet_and_webdataset_records(tmp_path):
    """A parquet file of 120 generated image values and a webdataset shard of 60 generated samples."""
    import datasets

    rng = random.Random(0)
    tmp = tmp_path
    images, captions, must_read = [], [], set()
    for i in range(120):
        r = rng.random()
        data = valid_file(rng)[0] if r < 0.4 else broken_file(rng)[0] if r < 0.9 else None
        images.append(data)
        captions.append(rng.choice([None, caption(rng, i), f"parquet {i}"]))
        if r < 0.4 and captions[-1] == f"parquet {i}":
            must_read.add(captions[-1])
    (tmp / "pq").mkdir()
    datasets.Dataset.from_dict({"image": images, "text": captions}).to_parquet(str(tmp / "pq" / "d.parquet"))
    examples, stream, error = read_all(DataConfig(source=str(tmp / "pq" / "d.parquet"), image_size=S), "parquet")
    assert not error and len(examples) + stream.n_skipped == 120
    assert must_read <= {ex["caption"] for ex in examples} and must_read

    (tmp / "wds").mkdir()
    with tarfile.open(tmp / "wds" / "000.tar", "w") as tar:
        for i in range(60):
            data, _, _ = valid_file(rng) if rng.random() < 0.5 else broken_file(rng)
            text = caption(rng, i).encode("utf-8")
            for name, content in ((f"{i:04d}.png", data), (f"{i:04d}.txt", text)):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    for streaming in (False, True):
        cfg = DataConfig(
            source=str(tmp / "wds" / "*.tar"),
            image_size=S,
            image_column="png",
            caption_column="txt",
            streaming=streaming,
        )
        examples, stream, error = read_all(cfg, f"webdataset (streaming={streaming})")
        assert not error and len(examples) + stream.n_skipped == 60


# ----------------------------------------------------------------------------------------------
# (b) the sample command
# ----------------------------------------------------------------------------------------------

ERROR_LINE = re.compile(r"^(python -m sample: )?error: ")


def argv_can_carry(text: str) -> bool:
    """A real command line holds no NUL, and only the lone surrogates that undecodable bytes become."""
    if "\x00" in text:
        return False
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


PROMPTS = [
    "",
    " ",
    "\t\n",
    "a red circle",
    "x" * 10_000,
    "a red circle " * 300,
    "🐱🔴🟦",
    "👩‍👩‍👧",
    "دائرة حمراء على اليسار",
    "\u202eelcric der a",
    "עיגול אדום",
    "赤い円",
    "\x1b[31ma red circle\x1b[0m",
    "\x07\x08\x7f",
    "a\nred\ncircle",
    "\r",
    "a\u0301" * 200,
    "\ufeff",
    "\u200b",
    "\udcff",  # the byte 0xff in argv, not UTF-8
    "a \udc80 red circle",
    "a\x00b",  # argv cannot carry NUL: filtered out
    "-",
    "-5",
    "--",
    "--weird",
    "a red circle:1 | a blue square:-1",
    "a:nan | b",
    "|||",
    ":::",
    "%s %d {} {0}",
    "'\"`$(rm -rf /)`",
    "../../etc/passwd",
    "/",
    "CON",
    "\\\\server\\share",
]
INTS = ["0", "-1", "1", "2", "3", "17", str(2**31), str(2**62), str(2**63), str(10**30), "nan", "inf", "-inf"]
INTS += ["1e3", "0x10", "", " 1", "\uff11", "1_0", "2.0", "one"]
FLOATS = ["0", "-0", "-1", "1", "0.5", "3", "1e-300", "1e300", "1e309", "nan", "inf", "-inf", "-1e-9", ""]
FLOATS += ["abc", "0x1p3", "\uff11.\uff15", "1,5", "5e-324"]
NUMERIC_FLAGS = {
    "--num-images": INTS,
    "--candidates": INTS,
    "--cfg": FLOATS,
    "--temperature": FLOATS,
    "--top-k": INTS,
    "--top-p": FLOATS,
    "--seed": INTS,
    "--keep-rows": INTS,
}
CHOICES = {
    "--method": ["ar", "clip-guided", "diffusion", "", "AR"],
    "--device": ["auto", "cpu", "cuda", "mps", "tpu", ""],
    "--dtype": ["fp32", "bf16", "fp16", "int8", ""],
}
UNKNOWN = [["--nope"], ["--num-images=1=2"], ["-x", "1"], ["--seed"], ["--json", "--json"], ["-h"]]


class World:
    """What the sample cases point at: one good bundle, broken bundles, odd input files, a working folder."""

    def __init__(self, root: Path, rng: random.Random):
        self.root = root
        self.bundle = make_tiny_bundle(root / "bundle")
        self.broken = self._broken_bundles(rng)
        self.inputs = self._inputs(rng)
        self.work = root / "work"
        self.work.mkdir()
        (self.work / "a-file").write_text("not a folder")

    def _copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.bundle, self.root / "broken" / name))

    def _broken_bundles(self, rng: random.Random) -> dict[str, Path]:
        out = {}
        for part in ("config.json", "text.model", "vae.safetensors", "vae.json", "transformer.safetensors"):
            out[f"no {part}"] = self._copy(f"no-{part}")
            (out[f"no {part}"] / part).unlink()
        out["no transformer.json"] = self._copy("no-transformer.json")
        (out["no transformer.json"] / "transformer.json").unlink()
        out["no clip.safetensors"] = self._copy("no-clip")  # loads with a warning: candidates unranked
        (out["no clip.safetensors"] / "clip.safetensors").unlink()
        for part in ("vae.safetensors", "transformer.safetensors", "clip.safetensors", "text.model"):
            size = (self.bundle / part).stat().st_size
            for cut in sorted({0, 1, 8, 9, size // 2, size - 1, rng.randrange(size)}):
                folder = self._copy(f"cut-{part}-{cut}")
                (folder / part).write_bytes((self.bundle / part).read_bytes()[:cut])
                out[f"{part} cut at {cut}"] = folder
            folder = self._copy(f"flipped-{part}")
            data = bytearray((self.bundle / part).read_bytes())
            for _ in range(4):
                data[rng.randrange(min(len(data), 200))] = rng.randrange(256)  # the header, where it hurts
            (folder / part).write_bytes(bytes(data))
            out[f"{part} with flipped header bytes"] = folder
        texts = ["", "{", "{}", '{"data": 5}', '{"nope": 1}', '{"data": {"image_size": "big"}}']
        texts += ['{"data": {"image_size": -16}}', '{"text": {"text_len": 0}}', '{"sample": {"candidates": 0}}']
        texts += [
            '{"sample": {"batch_size": 0}}',
            '{"sample": {"num_images": 1e400}}',
            '{"data": {"image_size": 1e999}}',
        ]
        for j, text in enumerate(texts):
            for name in ("config.json", "transformer.json", "vae.json"):
                folder = self._copy(f"json-{name}-{j}")
                (folder / name).write_text(text)
                out[f"{name} = {text!r}"] = folder
        for name, n in (("config.json", 20), ("transformer.json", 12), ("vae.json", 8)):
            original = json.loads((self.bundle / name).read_text())
            for j in range(n):
                folder = self._copy(f"mutated-{name}-{j}")
                values, path = mutate(original, rng)
                (folder / name).write_text(json.dumps(values))
                out[f"{name} with {path}"] = folder
        return out

    def _inputs(self, rng: random.Random) -> list[tuple[str, Path]]:
        folder = self.root / "inputs"
        folder.mkdir()
        files = []
        for i in range(20):
            data, suffix, desc = valid_file(rng)
            files.append((f"valid {desc}", folder / f"valid{i}{suffix}", data))
        for i in range(30):
            data, suffix, desc = broken_file(rng)
            files.append((f"broken: {desc}", folder / f"broken{i}{suffix}", data))
        files.append(("a bomb", folder / "bomb.png", bomb_png(40_000, 40_000)))
        files.append(("a text file", folder / "notes.txt", b"hello"))
        for _, path, data in files:
            path.write_bytes(data)
        (folder / "a-folder.png").mkdir()
        return [(desc, path) for desc, path, _ in files] + [
            ("a folder", folder / "a-folder.png"),
            ("a missing file", folder / "missing.png"),
            ("/dev/null", Path("/dev/null")),
            ("an empty path", Path("")),
        ]


JSON_ODD = [None, -1, 0, 1e9, 2**70, 0.5, float("nan"), "x", "", [], {}, True, "dvae", [1, 2]]


def mutate(values, rng: random.Random) -> tuple[object, str]:
    """A deep copy of a JSON object with one random leaf (or section) replaced by an odd value, or deleted."""
    values = copy.deepcopy(values)
    node, path = values, []
    while isinstance(node, dict) and node:
        key = rng.choice(list(node))
        path.append(key)
        if not isinstance(node[key], dict) or rng.random() < 0.2:
            if rng.random() < 0.15:
                del node[key]
                return values, ".".join(path) + " deleted"
            node[key] = rng.choice(JSON_ODD)
            return values, f"{'.'.join(path)} = {node[key]!r}"
        node = node[key]
    return values, "nothing"


def random_case(rng: random.Random, world: World, out: Path) -> tuple[list[str], bool]:
    """A random argv and whether it asks for clip-guided refinement."""
    n_prompts = rng.choice([1, 1, 1, 2, 3])
    argv = [rng.choice(PROMPTS) if rng.random() < 0.7 else "a red circle" for _ in range(n_prompts)]
    model = rng.random()
    if model < 0.65:
        argv += ["--model", str(world.bundle)]
    elif model < 0.95:
        argv += ["--model", str(world.broken[rng.choice(sorted(world.broken))])]
    else:
        argv += ["--model", rng.choice(["", str(world.root / "nowhere"), str(world.work / "a-file"), "\udcff"])]
    flags = rng.sample(sorted(NUMERIC_FLAGS), k=rng.choice([0, 1, 1, 2, 3]))
    for flag in flags:
        argv += [f"{flag}={rng.choice(NUMERIC_FLAGS[flag])}"]
    # few candidates: a case that succeeds samples them all
    if "--candidates" not in flags:
        argv += ["--candidates", "1"]
    if "--num-images" not in flags:
        argv += ["--num-images", "1"]
    for flag, values in CHOICES.items():
        if rng.random() < 0.25:
            argv += [flag, rng.choice(values)]
    if rng.random() < 0.25:
        argv += ["--init-image", str(rng.choice(world.inputs)[1])]
    if rng.random() < 0.3:
        argv.append("--json")
    if rng.random() < 0.08:
        argv += rng.choice(UNKNOWN)
    where = rng.random()
    if where < 0.08:
        out = world.work / "a-file"
    elif where < 0.12:
        out = world.work / "a-file" / "under"
    elif where < 0.16:
        out = out / "deep" / "er" / "\udcff-é"
    argv += ["--out", str(out)]
    return argv, "clip-guided" in argv


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def run_case(argv: list[str]) -> tuple[int, str, str, float]:
    """main(argv) under run_cli, in-process: (exit code, stdout, stderr, CPU seconds). CPU time, not wall time: on
    a machine shared with other jobs a case waits for a core without doing more work (wall time has its own
    bound, CASE_SECONDS, for hangs).

    stdout and stderr behave as a real process's in a UTF-8 locale: stdout refuses lone surrogates
    (errors="strict"), stderr escapes them (errors="backslashreplace"); pytest's capsys accepts neither.
    """
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    t0 = time.process_time()
    with time_limit(CASE_SECONDS, f"sample {argv!r}"):
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                run_cli(sample_main, argv)
            except SystemExit as e:
                code = e.code
            else:  # pragma: no cover - run_cli always exits
                code = "no exit"
    seconds = time.process_time() - t0
    return code, stdout.buffer.getvalue().decode(), stderr.buffer.getvalue().decode(), seconds


def effective_out(argv: list[str], cwd: Path) -> Path:
    """The folder the command writes to: the last --out option, or the default samples/ when there is none
    (after a bare "--" every word, "--out" included, is a prompt)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    if "--out" in options:
        return Path(options[len(options) - 1 - options[::-1].index("--out") + 1])
    return cwd / "samples"


def check_outcome(argv, code, stdout, stderr, new_files: set[Path], out: Path) -> str:
    """'ok' or 'error' for a clean ending; an AssertionError naming the case otherwise."""
    case = f"argv={argv!r}\nexit={code!r}\nstdout={stdout[-500:]!r}\nstderr={stderr[-1500:]!r}"
    assert "Traceback" not in stderr, case
    if code == 0:
        stray = [p for p in new_files if not p.is_relative_to(out.resolve())]
        assert not stray, f"files written outside --out: {stray}\n{case}"
        options = argv[: argv.index("--")] if "--" in argv else argv  # after "--", "--json" is a prompt
        if "--json" in options and not {"-h"} & set(options):
            records = [json.loads(line) for line in stdout.splitlines()]
            assert records and all(set(r) == {"prompt", "path", "rank", "clip_score", "seed"} for r in records)
            assert all(Path(r["path"]).is_file() for r in records), case
        return "ok"
    assert code == 2, case
    lines = stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
    assert len(errors) == 1, case
    if not lines[errors[0]].startswith("python -m sample: "):  # ours: one sentence ending the output
        assert all(not line.startswith(("warning:", "usage:")) for line in lines[errors[0] + 1 :]), case
    assert stdout == "" or stdout.startswith("usage:"), case
    assert not new_files, f"an error left files behind: {new_files}\n{case}"
    return "error"


N_RANDOM_SAMPLE_CASES = 360
MAX_GUIDED = 3  # clip-guided runs that get to refine: each takes about a second


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("sample-fuzz"), random.Random(1))


def fixed_cases(world: World) -> list[list[str]]:
    """Every prompt, every odd value of every flag, every input file and every broken bundle, once."""
    base = ["--model", str(world.bundle), "--candidates", "1", "--num-images", "1"]
    cases = [[p, *base] for p in PROMPTS]
    for flag, values in NUMERIC_FLAGS.items():
        for value in values:
            extra = ["--init-image", str(world.inputs[0][1])] if flag == "--keep-rows" else []
            head = ["a red circle", "--model", str(world.bundle)]
            counts = [] if flag in ("--num-images", "--candidates") else ["--candidates", "1", "--num-images", "1"]
            cases.append([*head, *counts, f"{flag}={value}", *extra])
    for flag, values in CHOICES.items():
        cases += [["a red circle", *base, flag, v] for v in values if v != "clip-guided"]
    cases += [["a red circle", *base, *u] for u in UNKNOWN]
    cases += [["a red circle", *base, "--init-image", str(path)] for _, path in world.inputs]
    cases += [["a red circle", "--model", str(folder)] + base[2:] for _, folder in sorted(world.broken.items())]
    return cases


@pytest.mark.slow
def test_the_sample_command_survives_odd_inputs(world, monkeypatch):
    rng = random.Random(0)
    monkeypatch.chdir(world.work)
    watched = (world.work, world.bundle, world.inputs[0][1].parent)
    known = set().union(*(files_under(f) for f in watched))
    cases = [(argv, False) for argv in fixed_cases(world)]
    for i in range(N_RANDOM_SAMPLE_CASES):
        cases.append(random_case(rng, world, world.work / f"out{i:03d}"))
    tally = {"ok": 0, "error": 0, "skipped: argv cannot carry it": 0}
    guided = 0
    slowest = (0.0, None)
    for i, (argv, wants_guided) in enumerate(cases):
        if not all(argv_can_carry(a) for a in argv):
            tally["skipped: argv cannot carry it"] += 1
            continue
        if wants_guided:
            guided += 1
            if guided > MAX_GUIDED:
                argv = [a if a != "clip-guided" else "ar" for a in argv]
        if "--out" not in argv:
            # in front: after a "--" prompt every word is a prompt, and --out would not be an option
            argv = ["--out", str(world.work / f"fixed{i:03d}"), *argv]
        out = effective_out(argv, world.work)
        code, stdout, stderr, seconds = run_case(argv)
        now = set().union(*(files_under(f) for f in watched))
        tally[check_outcome(argv, code, stdout, stderr, now - known, (world.work / out))] += 1
        known = now
        slowest = max(slowest, (seconds, argv), key=lambda x: x[0])
        assert seconds < 10, f"{argv!r} took {seconds:.1f} CPU s"  # a few hundredths of a second, usually
    n_run = tally["ok"] + tally["error"]
    print(f"sample fuzz: {len(cases)} cases, {tally}, slowest {slowest[0]:.2f} CPU s: {slowest[1]!r}"[:400])
    assert n_run >= 400 and tally["ok"] >= 30 and tally["error"] >= 200, tally


@pytest.mark.parametrize(
    "content",
    [b"null", b"[]", b"5", b'"a string"', b"\xff\xfe{}"],
    ids=["null", "list", "number", "string", "not-utf8"],
)
def test_a_config_json_that_is_not_a_json_object_is_one_sentence(world, tmp_path, content):
    """JSON but not an object, or bytes that are not UTF-8: one sentence, not AttributeError or UnicodeDecodeError."""
    folder = Path(shutil.copytree(world.bundle, tmp_path / "bundle"))
    (folder / "config.json").write_bytes(content)
    code, _, stderr, _ = run_case(["a red circle", "--model", str(folder), "--out", str(tmp_path / "o")])
    assert code == 2 and stderr.startswith("error: config file") and stderr.count("\n") == 1, stderr
