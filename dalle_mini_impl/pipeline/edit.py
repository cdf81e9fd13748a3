"""Masked editing (inpainting, outpainting): which grid cells a mask redraws, a canvas moved for outpainting,
and the source's pixels pasted back over the kept cells. `Pipeline.edit` samples the redrawn cells.

    from dalle_mini_impl.pipeline.edit import extend_canvas
    canvas, mask = extend_canvas(Image.open("circle.png"), "right")   # the image moved left, its right half new
    results = pipe.edit("a red circle to the left of a blue square", canvas, mask)

A mask is an image of the source's size, white (grayscale >= 128) where the image is to be redrawn. It goes
through the same resize and center crop as the image (`prepare_image`), and a cell of the code grid is
redrawn when any of its pixels is white: the mask is resized with a box filter, which averages the source
pixels an output pixel covers, so a covered white pixel leaves it above zero.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..data.images import center_square, to_rgb
from ..errors import UserError

SIDES = ("left", "right", "top", "bottom")


def mask_cells(mask: Image.Image, image: Image.Image, size: int, grid: tuple[int, int], name: str = "the mask"):
    """The cells (h, w) bool that `mask` (white: redraw) redraws of `image` at the model's `size` and `grid`."""
    if mask.size != image.size:
        raise UserError(
            f"{name} is {mask.size[0]}x{mask.size[1]} pixels but the image is {image.size[0]}x{image.size[1]}; "
            "draw the mask at the image's size"
        )
    # transparent pixels are kept (on black): a mask painted white on a transparent layer redraws what is painted
    white = to_rgb(mask, background=(0, 0, 0)).convert("L").point(lambda v: 255 if v >= 128 else 0)
    if white.getextrema()[1] == 0:
        raise UserError(f"{name} has no white pixel, so nothing would be redrawn; paint the part to redraw white")
    # box-averaged in float: one white pixel of a 32 x 32 block is 255 / 1024, which 8 bits would round to 0
    pixels = torch.from_numpy(np.asarray(center_square(white.convert("F"), size, Image.Resampling.BOX)) > 0)
    h, w = grid
    cells = pixels.view(h, size // h, w, size // w).any(dim=3).any(dim=1)  # (h, w)
    if not cells.any():  # white pixels only in what the center crop cuts away
        raise UserError(f"{name}'s white part lies outside the square the model sees; paint inside the image")
    return cells


def extend_canvas(image: Image.Image, side: str) -> tuple[Image.Image, Image.Image]:
    """Outpainting: (the image moved by half its size away from `side` on a white canvas of its size, the mask
    of the new half, white)."""
    if side not in SIDES:
        raise UserError(f"--extend '{side}' is unknown; use {', '.join(SIDES)}")
    image = to_rgb(image)
    w, h = image.size
    across = w if side in ("left", "right") else h
    if across < 2:
        raise UserError(
            f"--init-image is {w}x{h} pixels, too small to move by half its size for --extend {side}; "
            "give an image at least 2 pixels across that way"
        )
    dx = {"left": w // 2, "right": -(w // 2)}.get(side, 0)
    dy = {"top": h // 2, "bottom": -(h // 2)}.get(side, 0)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    canvas.paste(image, (dx, dy))
    mask = Image.new("L", (w, h), 255)
    mask.paste(0, (max(dx, 0), max(dy, 0), w + min(dx, 0), h + min(dy, 0)))
    return canvas, mask


def later_log_likelihood(model, text: torch.Tensor, ids: torch.Tensor, redraw: torch.Tensor) -> torch.Tensor:
    """The transformer's mean log-likelihood (m,) of each edit's kept cells after its first redrawn one, given
    the text (m, t) and its ids (m, n) (redraw (n,) bool), 0 where no kept cell follows: what a redrawn cell
    could not see while it was sampled, so what tells whether the region agrees with the rest."""
    later = torch.zeros_like(redraw)
    later[int(redraw.nonzero()[0]) :] = True
    later &= ~redraw
    if not later.any():
        return torch.zeros(len(ids))
    per_cell = model.cell_log_likelihoods(text, ids)  # (m, n)
    return per_cell[:, later.to(per_cell.device)].mean(dim=1).float().cpu()


def paste_kept(images: torch.Tensor, source: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Images (m, 3, S, S) with the source's pixels (3, S, S) over every kept cell (cells (h, w): True = redrawn):
    the kept part stays exactly the source, not its reconstruction."""
    size = images.shape[-1]
    h, w = cells.shape
    redrawn = cells.repeat_interleave(size // h, dim=0).repeat_interleave(size // w, dim=1)  # (S, S)
    return torch.where(redrawn, images, source.to(images.dtype))


__all__ = ["SIDES", "extend_canvas", "later_log_likelihood", "mask_cells", "paste_kept"]
