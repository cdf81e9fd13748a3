"""Image utilities: any PIL image to RGB, to a square training tensor, and back to PNG grids.

Every stage sees images the same way: float tensors (3, S, S) in [0, 1], RGB, transparency
composited on white (the shapes background, and what an emoji's transparent corners look like on a
page). This module is the one place that converts between those tensors, PIL images and uint8 arrays,
so output ranges never drift between stages. It needs only PIL, numpy, einops and torch, and stays
cheap to import for `python -m sample`.

Usage:
    from dalle_mini_impl.data.images import prepare_image, save_grid
    x = prepare_image(Image.open("cat.png"), 64)             # (3, 64, 64) in [0, 1]
    save_grid(batch, "grid.png", nrow=4, captions=captions)  # batch (b, 3, h, w)

Resizing follows the usual text-to-image recipe (DALL-E, DALLE-pytorch, dalle-mini): shorter side to
S with an antialiasing filter, then a center crop (evaluation) or a random crop (training).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from ..files import write_atomic

WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _high_depth_to_uint8(pil: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float single-channel image as uint8 (h, w).

    PIL's own `convert("L")` clips these at 255, which turns a 16-bit photo white. 16-bit data (the I;16
    modes, and a PNG's mode I, whose depth is at most 16) is scaled by 1/257 (65535 -> 255), however dark the
    image; other 32-bit integers too when above 255; floats in [0, 1] are scaled by 255, other floats clipped.
    """
    arr = np.asarray(pil).astype(np.float64)
    if pil.mode == "F":
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
    elif pil.mode.startswith("I;16") or pil.format == "PNG":
        scale = 1 / 257  # the depth is known: a guess from the pixels made a dark image (200 of 65535) bright
    else:
        scale = 1 / 257 if arr.size and arr.max() > 255 else 1.0
    return np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)


def to_rgb(pil: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL image as mode RGB, with alpha (or a palette / color-key transparency) composited on `background`
    (white; an editing mask's transparent part is composited on black: kept)."""
    if pil.mode == "RGB" and "transparency" not in pil.info:
        return pil
    if pil.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(pil), mode="L").convert("RGB")
    if pil.mode in _ALPHA_MODES or "transparency" in pil.info:
        # P with a transparent index, and L/RGB with a tRNS color key, become RGBA here
        rgba = pil.convert("RGBA")
        under = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(under, rgba).convert("RGB")
    return pil.convert("RGB")  # L, 1, P, CMYK, YCbCr


def _resize_shorter_side(pil: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    w, h = pil.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new == (w, h):
        return pil
    # reducing_gap: a cheap box reduction first, then bicubic; same quality, far faster on big photos
    return pil.resize(new, resample, reducing_gap=None if resample == Image.Resampling.BOX else 3.0)


# an image longer than this many times its shorter side is cut to that length around its center before it is
# resized: a 4 KB upload of 1,000,000 x 1 pixels would otherwise be resized to 32,000,000 x 32 (gigabytes) first
MAX_SQUARE_ASPECT = 4


def center_square(pil: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """The image's shorter side resized to `size` (by `resample`), then its center size x size crop: the
    geometry `prepare_image` gives an image without random crop (editing maps a mask through it too). A long
    thin image is first cut to MAX_SQUARE_ASPECT times its shorter side around its center (its crop and context
    on both sides for the resampling filter), so that its memory stays that of a few squares."""
    w, h = pil.size
    cap = MAX_SQUARE_ASPECT * min(w, h)
    if max(w, h) > cap:
        left, top = (w - min(w, cap)) // 2, (h - min(h, cap)) // 2
        pil = pil.crop((left, top, left + min(w, cap), top + min(h, cap)))
    img = _resize_shorter_side(pil, size, resample)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(
    pil: Image.Image, size: int, random_crop: bool = False, rng: random.Random | None = None
) -> torch.Tensor:
    """An image as a float tensor (3, size, size) in [0, 1]: RGB on white, shorter side resized, cropped.

    The crop is centered unless `random_crop`; the random offset comes from `rng` (default: `random`),
    so a seeded generator makes the crop reproducible.
    """
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    if not random_crop:
        return from_uint8(np.asarray(center_square(to_rgb(pil), size)))
    img = _resize_shorter_side(to_rgb(pil), size)
    rng = rng or random
    left, top = rng.randint(0, img.size[0] - size), rng.randint(0, img.size[1] - size)
    return from_uint8(np.asarray(img.crop((left, top, left + size, top + size))))


def from_uint8(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (..., h, w, 3) -> a new float tensor (..., 3, h, w) in [0, 1]."""
    # a copy either way: numpy arrays read from a data set may be read-only, which torch warns about
    x = (
        array.to(torch.float32, copy=True)
        if isinstance(array, torch.Tensor)
        else torch.from_numpy(np.array(array, np.float32))
    )
    return rearrange(x, "... h w c -> ... c h w").div_(255)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images (..., 3, h, w) in [0, 1] -> uint8 (..., h, w, 3); values outside [0, 1] are clipped."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return rearrange(x, "... c h w -> ... h w c").numpy()


def distinct_first(images: torch.Tensor) -> torch.Tensor:
    """Indices, ascending, of the first of each set of identical images (m, 3, h, w): identical as uint8
    pixels, which is what their PNGs hold (different code ids can decode to the same pixels)."""
    pixels = torch.from_numpy(to_uint8(images)).flatten(1)  # (m, h * w * 3)
    _, inverse = torch.unique(pixels, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(pixels), dtype=torch.long)
    return first.scatter_reduce(0, inverse, torch.arange(len(pixels)), reduce="amin").sort()[0]


def to_pil(image: torch.Tensor) -> Image.Image:
    """A float image (3, h, w) in [0, 1] as an RGB PIL image."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"to_pil expects one image (3, h, w), got shape {tuple(image.shape)}")
    return Image.fromarray(to_uint8(image), mode="RGB")


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile images (b, 3, h, w) into one image (3, H, W), `nrow` images per row, `padding` px between."""
    if images.ndim != 4:
        raise ValueError(f"make_grid expects (b, c, h, w), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = max(1, min(nrow, b))
    rows = math.ceil(b / nrow)
    fill = images.new_full((rows * nrow - b, c, h, w), pad_value)
    x = torch.cat([images, fill])  # (rows * nrow, c, h, w)
    x = torch.nn.functional.pad(x, (padding, 0, padding, 0), value=pad_value)  # pad top and left
    x = rearrange(x, "(r q) c h w -> c (r h) (q w)", r=rows, q=nrow)
    return torch.nn.functional.pad(x, (0, padding, 0, padding), value=pad_value)  # close bottom/right


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1: scalable when FreeType is present
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _break_word(word: str, font, width: int) -> list[str]:
    parts = []
    while word:
        cut = 1
        while cut < len(word) and font.getlength(word[: cut + 1]) <= width:
            cut += 1
        parts.append(word[:cut])
        word = word[cut:]
    return parts


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words wider than a line are broken; overflow ends in '...'."""
    lines: list[str] = []
    for word in text.split():
        for piece in _break_word(word, font, width) if font.getlength(word) > width else [word]:
            if lines and font.getlength(lines[-1] + " " + piece) <= width:
                lines[-1] += " " + piece
            else:
                lines.append(piece)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _auto_scale(width: int) -> int:
    # small images (32 px shapes) are upscaled, pixel-exact, until a cell is wide enough for words
    return max(1, math.ceil(128 / max(1, width)))


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int,
    captions: list[str] | None = None,
    scale: int | None = None,
    max_lines: int = 4,
) -> Path:
    """Write images (b, 3, h, w) in [0, 1] as one grid (PNG, or the format the file's name says), each caption
    wrapped under its image.

    `scale` enlarges every image by an integer factor with nearest-neighbour sampling (default: enough
    to make an image at least 128 px wide). The file is written to a temporary name and renamed.
    """
    if images.ndim != 4:
        raise ValueError(f"save_grid expects (b, 3, h, w), got shape {tuple(images.shape)}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"save_grid got {len(images)} images but {len(captions)} captions")
    b, _, h, w = images.shape
    scale = scale or _auto_scale(w)
    nrow = max(1, min(nrow, b))
    rows = math.ceil(b / nrow)
    pad = 4
    cell_w, cell_h = w * scale, h * scale
    font = _font(max(10, min(14, cell_w // 10)))
    line_h = font.getbbox("Ag")[3] + 2
    wrapped = [_wrap(str(c), font, cell_w, max_lines) for c in captions] if captions else []
    text_h = (max((len(x) for x in wrapped), default=0) * line_h + pad) if captions else 0

    canvas = Image.new("RGB", (nrow * (cell_w + pad) + pad, rows * (cell_h + text_h + pad) + pad), WHITE)
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(to_uint8(images)):
        r, q = divmod(i, nrow)
        x, y = pad + q * (cell_w + pad), pad + r * (cell_h + text_h + pad)
        canvas.paste(Image.fromarray(tile).resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        # a light frame: white-background images (shapes) would otherwise melt into the page
        draw.rectangle((x - 1, y - 1, x + cell_w, y + cell_h), outline=(200, 200, 200))
        for j, line in enumerate(wrapped[i] if captions else []):
            draw.text((x, y + cell_h + 2 + j * line_h), line, fill=(0, 0, 0), font=font)

    # the format the name says (grid.jpg: JPEG; PNG bytes under a .jpg name once), PNG for any other name
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return write_atomic(path, lambda tmp: canvas.save(tmp, format=fmt))


__all__ = [
    "center_square",
    "distinct_first",
    "from_uint8",
    "make_grid",
    "prepare_image",
    "save_grid",
    "to_pil",
    "to_rgb",
    "to_uint8",
]
