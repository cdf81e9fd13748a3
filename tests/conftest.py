"""Shared test fixtures: a small on-disk imagefolder with every image mode and one corrupt file.

Tests never touch the network: the hub is switched to offline mode before `datasets` is imported, whatever the
caller's environment says, and `datasets`' cache goes to a folder of this session's own, removed at its end (once
a fixed folder under the system temp dir, which grew by every run's fingerprints, or the caller's own cache).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
HF_CACHE = tempfile.mkdtemp(prefix="dalle_mini_impl_tests_hf_")
os.environ["HF_DATASETS_CACHE"] = HF_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(HF_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models: their ops are too small to split across threads,
    and on a shared 2-core CPU a second thread only waits. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BLUE = (40, 80, 220)
RED = (200, 30, 30)


@dataclass
class ImageFolder:
    """A temporary imagefolder: `root` holds train/ and validation/, each with images and metadata.jsonl."""

    root: Path
    train_captions: list[str]  # the readable train images' captions, in metadata order
    validation_captions: list[str]
    corrupt_caption: str  # the caption of the one truncated PNG in train/
    files: dict[str, str]  # caption -> file name, for every image


def _noise(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _images(rng: np.random.Generator) -> dict[str, Image.Image]:
    """One image per mode the loader must handle, 20x16 (not square, so resize and crop both act)."""
    h, w = 16, 20
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[:, w // 2 :] = BLUE + (255,)  # left half fully transparent black: must become white
    half = np.zeros((h, w, 4), np.uint8)
    half[...] = (0, 200, 0, 128)
    palette = Image.fromarray(np.tile(np.arange(w, dtype=np.uint8) % 4, (h, 1)), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 10, 10] + [0] * (256 - 4) * 3)
    palette_hole = palette.copy()
    palette_hole.info["transparency"] = 0  # index 0 (red in the palette) is transparent: must be white
    return {
        "rgb_red": Image.new("RGB", (w, h), RED),
        "rgb_noise": Image.fromarray(_noise(rng, h, w, 3), mode="RGB"),
        "rgba_half_transparent": Image.fromarray(rgba, mode="RGBA"),
        "rgba_translucent": Image.fromarray(half, mode="RGBA"),
        "l_gray": Image.new("L", (w, h), 100),
        "l_noise": Image.fromarray(_noise(rng, h, w, 1)[..., 0], mode="L"),
        "p_hole": palette_hole,
        "p_plain": palette,
    }


def _write_split(folder: Path, items: list[tuple[str, Image.Image, str]]) -> dict[str, str]:
    (folder / "images").mkdir(parents=True)
    files, lines = {}, []
    for name, img, caption in items:
        rel = f"images/{name}.png"
        img.save(folder / rel)
        files[caption] = rel
        lines.append(json.dumps({"file_name": rel, "text": caption}, ensure_ascii=False))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def build_imagefolder(root: Path) -> ImageFolder:
    rng = np.random.default_rng(0)
    train_imgs = _images(rng)
    train_captions = {
        "rgb_red": "A Red Rectangle",
        "rgb_noise": "colorful noise, très bruyant",
        "rgba_half_transparent": "a blue half on white 🐱",
        "rgba_translucent": "a translucent green",
        "l_gray": "a gray card",
        "l_noise": "gray noise",
        "p_hole": "a palette image with a hole",
        "p_plain": "a striped palette image",
    }
    items = [(name, train_imgs[name], train_captions[name]) for name in train_captions]
    # the corrupt file sits in the middle, so readers must carry on after it
    broken = Image.fromarray(_noise(rng, 32, 32, 3), mode="RGB")
    items.insert(4, ("broken", broken, "this image is truncated"))
    files = _write_split(root / "train", items)
    path = root / "train" / files["this image is truncated"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    val_imgs = _images(np.random.default_rng(1))
    val_items = [
        ("v_rgb", val_imgs["rgb_noise"], "validation noise"),
        ("v_rgba", val_imgs["rgba_half_transparent"], "validation blue half"),
        ("v_l", val_imgs["l_gray"], "validation gray"),
        ("v_p", val_imgs["p_hole"], "validation palette"),
    ]
    files.update(_write_split(root / "validation", val_items))
    return ImageFolder(
        root=root,
        train_captions=list(train_captions.values()),
        validation_captions=[c for _, _, c in val_items],
        corrupt_caption="this image is truncated",
        files=files,
    )


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory) -> ImageFolder:
    """A read-only imagefolder with train (8 readable PNGs of modes RGB, RGBA, L, P + 1 truncated PNG)
    and validation (4 PNGs); captions in metadata.jsonl's `text` column. Copy it before changing it."""
    return build_imagefolder(tmp_path_factory.mktemp("imagefolder"))
