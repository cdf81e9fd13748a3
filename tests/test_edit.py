"""Masked editing: the sampler keeps every unmasked cell, masks become cells, the likelihood ranking, the CLI.

Tiny real models (the sampler's dim-32 transformer of test_generate, and a tiny bundle).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.model.generate import generate
from dalle_mini_impl.pipeline.edit import extend_canvas, later_log_likelihood, mask_cells, paste_kept
from dalle_mini_impl.pipeline.pipeline import Pipeline
from sample.__main__ import main
from tests.bundle_factory import make_tiny_bundle
from tests.test_generate import IV, NULL, TEXT, make

pytestmark = pytest.mark.usefixtures("one_thread")


def random_keep(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(IV, (b, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decode", ["cached", "static", "uncached"])
@pytest.mark.parametrize("sampling", [dict(), dict(guidance_scale=3.0, null_text=NULL, guidance_until=0.5)])
def test_the_sampler_keeps_every_unmasked_cell_and_redraws_the_masked_ones(decode, sampling):
    model, keep = make(), random_keep(3)
    redraw = torch.zeros(16, dtype=torch.bool)
    redraw[[2, 3, 6, 7, 11]] = True  # a right-hand block and one more cell, with kept cells between them
    out = [generate(model, TEXT, keep=keep, redraw=redraw, generator=torch.Generator().manual_seed(s),
                    decode=decode, **sampling) for s in range(4)]  # fmt: skip
    for ids in out:
        assert torch.equal(ids[:, ~redraw], keep[:, ~redraw])
    redrawn = torch.stack([ids[:, redraw] for ids in out])
    assert (redrawn != keep[None, :, redraw]).any()  # the seeds draw other ids there
    reference = generate(model, TEXT, keep=keep, redraw=redraw, generator=torch.Generator().manual_seed(0), **sampling)
    assert torch.equal(out[0], reference)  # every decode mode draws the same tokens


def test_a_mask_of_the_last_cells_is_priming_and_no_pass_runs_after_the_last_redrawn_cell():
    model, keep = make(), random_keep(3)
    tail = torch.arange(16) >= 6
    stats = {}
    edited = generate(model, TEXT, keep=keep, redraw=tail, generator=torch.Generator().manual_seed(1), stats=stats)
    primed = generate(model, TEXT, prime=keep[:, :6], generator=torch.Generator().manual_seed(1))
    assert torch.equal(edited, primed) and stats["passes"] == 10
    head = torch.arange(16) < 5
    generate(model, TEXT, keep=keep, redraw=head, generator=torch.Generator().manual_seed(1), stats=stats)
    assert stats["passes"] == 5  # cells 5 .. 15 are kept: not run


def test_the_sampler_refuses_what_it_cannot_edit():
    model, keep = make(), random_keep(3)
    redraw = torch.arange(16) >= 8
    with pytest.raises(ValueError, match="at least one True"):
        generate(model, TEXT, keep=keep, redraw=torch.zeros(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="speculative"):
        generate(model, TEXT, keep=keep, redraw=redraw, decode="speculative")
    with pytest.raises(ValueError, match="without prime"):
        generate(model, TEXT, keep=keep, redraw=redraw, prime=keep[:, :2])


def test_a_cell_is_redrawn_when_any_of_its_pixels_is_white():
    image = Image.new("RGB", (64, 64), "white")  # twice the model's 32 px: the mask is resized with the image
    mask = Image.new("L", (64, 64), 0)
    mask.putpixel((63, 0), 255)  # one pixel in the top right corner
    mask.putpixel((20, 40), 200)
    mask.putpixel((40, 40), 100)  # gray below 128: kept
    cells = mask_cells(mask, image, 32, (4, 4))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 3] = expected[2, 1] = True
    assert torch.equal(cells, expected)


def test_a_masks_transparent_part_is_kept_and_one_white_pixel_of_a_large_mask_is_redrawn():
    """Once transparency was composited on white (redraw: a mask painted on a transparent layer redrew every cell),
    and a 1024 px mask's one white pixel was averaged to 255 / 1024 in 8 bits, rounded to 0 and lost."""
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 8, 8))  # white painted on a transparent layer: the top left cell
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = True
    assert torch.equal(mask_cells(layer, Image.new("RGB", (32, 32)), 32, (4, 4)), expected)
    large = Image.new("L", (1024, 1024), 0)
    large.putpixel((600, 100), 255)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 2] = True  # column 600 of 1024 and row 100: cell (0, 2) of 4 x 4
    assert torch.equal(mask_cells(large, Image.new("RGB", (1024, 1024)), 32, (4, 4)), expected)


def test_a_photo_taken_sideways_is_read_upright_by_the_command_as_by_the_data_and_the_web_app(tmp_path):
    """Once `--init-image` read the pixels as stored and the web app (and training) upright: a mask drawn on the
    photo as shown was refused by the command as the wrong size."""
    from dalle_mini_impl.clip.uses import open_image
    from dalle_mini_impl.data.streams import decode_image

    stored = Image.new("RGB", (64, 32), "white")
    stored.paste((255, 0, 0), (0, 0, 8, 32))  # a red band at the left of the stored pixels
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    shown = open_image(tmp_path / "photo.jpg")
    assert shown.size == (32, 64) and np.array_equal(
        np.asarray(shown), np.asarray(decode_image(tmp_path / "photo.jpg", 10**6))
    )
    assert np.asarray(shown)[:4, :, 0].min() > 200 and np.asarray(shown)[-4:, :, 1].min() > 200  # red band on top
    mask = Image.new("L", (32, 64), 0)
    mask.paste(255, (0, 32, 32, 64))  # the bottom half as shown
    assert mask_cells(mask, shown, 32, (4, 4)).sum() == 8


@pytest.mark.parametrize(
    "mask, match",
    [
        (Image.new("L", (32, 32), 0), "has no white pixel"),
        (Image.new("L", (32, 16), 255), "is 32x16 pixels but the image is 32x32"),
    ],
)
def test_a_mask_with_nothing_white_or_of_the_wrong_size_is_one_sentence(mask, match):
    with pytest.raises(UserError, match=match):
        mask_cells(mask, Image.new("RGB", (32, 32)), 32, (4, 4))


def test_white_only_where_the_center_crop_cuts_is_refused():
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 8, 32))  # the left 8 columns of a wide image: cropped away
    with pytest.raises(UserError, match="outside the square the model sees"):
        mask_cells(mask, Image.new("RGB", (64, 32)), 32, (4, 4))


@pytest.mark.parametrize("side, box", [("right", (16, 0, 32, 32)), ("top", (0, 0, 32, 16))])
def test_extend_moves_the_image_away_from_the_side_and_masks_the_new_half(side, box):
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    canvas, mask = extend_canvas(image, side)
    expected = Image.new("L", (32, 32), 0)
    expected.paste(255, box)
    assert np.array_equal(np.asarray(mask), np.asarray(expected))
    pixels = np.asarray(canvas)
    assert (pixels[np.asarray(mask) == 0] == (200, 0, 0)).all() and (pixels[np.asarray(mask) == 255] == 255).all()
    with pytest.raises(UserError, match="--extend 'middle' is unknown"):
        extend_canvas(image, "middle")
    # once "the mask has no white pixel", about a mask the user never gave
    with pytest.raises(
        UserError, match=f"--init-image is 1x1 pixels, too small to move by half its size for --extend {side}"
    ):
        extend_canvas(Image.new("RGB", (1, 1)), side)
    extend_canvas(Image.new("RGB", (2, 2)), side)  # the smallest that moves


def test_paste_puts_the_source_back_over_the_kept_cells_only():
    images, source = torch.zeros(2, 3, 8, 8), torch.ones(3, 8, 8)
    cells = torch.tensor([[True, False], [False, False]])
    pasted = paste_kept(images, source, cells)
    assert (pasted[:, :, :4, :4] == 0).all() and pasted.sum() == 2 * 3 * (64 - 16)


def test_the_likelihood_term_prefers_the_candidate_whose_later_kept_cells_are_likely():
    """A tiny transformer taught that every row repeats the first: given kept rows 1 .. 3, a first row that
    matches them makes them likely, another first row makes them unlikely."""
    model = make(seed=3).train()
    rows = torch.randint(IV, (64, 4), generator=torch.Generator().manual_seed(0))
    image, text = rows.repeat(1, 4), TEXT[:1].expand(64, -1)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    for _ in range(150):
        loss, _ = model.loss(text, image)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    kept = image[0]
    redraw = torch.arange(16) < 4  # the first row is redrawn, rows 1 .. 3 are kept after it
    agrees, disagrees = kept.clone(), kept.clone()
    disagrees[:4] = (kept[:4] + 1) % IV
    with torch.inference_mode():
        terms = later_log_likelihood(model, TEXT[:1].expand(2, -1), torch.stack([disagrees, agrees]), redraw)
    assert terms[1] > terms[0] + 1.0
    with torch.inference_mode():  # nothing kept after the redrawn cells: no term
        none = later_log_likelihood(model, TEXT[:1].expand(2, -1), torch.stack([agrees, agrees]), ~redraw)
    assert torch.equal(none, torch.zeros(2))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("edit-bundle"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit-images")
    image = Image.new("RGB", (16, 16), "white")
    image.paste((220, 30, 30), (2, 2, 7, 14))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))  # the right half
    image.save(folder / "image.png")
    mask.save(folder / "mask.png")
    Image.new("L", (16, 16), 0).save(folder / "black.png")
    return folder


def test_pipeline_edit_keeps_the_unmasked_codes_and_pixels(bundle, pictures):
    pipe = Pipeline.from_pretrained(bundle, device="cpu")
    source = pipe.encode_image(pictures / "image.png")  # (4, 4): the right two columns are redrawn
    kept = pipe.edit("a red circle", pictures / "image.png", pictures / "mask.png",
                     num_images=3, candidates=6, progress=False)[0]  # fmt: skip
    assert [r.rank for r in kept] == [1, 2, 3] and all(isinstance(r.clip_score, float) for r in kept)
    for r in kept:
        assert torch.equal(r.ids[:, :2], source[:, :2])
        assert np.array_equal(np.asarray(r.image)[:, :8], np.asarray(Image.open(pictures / "image.png"))[:, :8])
    assert any(not torch.equal(r.ids[:, 2:], source[:, 2:]) for r in kept)
    again = pipe.edit("a red circle", pictures / "image.png", pictures / "mask.png",
                      num_images=3, candidates=6, progress=False)[0]  # fmt: skip
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(kept, again))  # deterministic for a seed
    with pytest.raises(UserError, match="--decode cached, not speculative"):
        Pipeline.from_pretrained(bundle, device="cpu", decode="speculative").edit(
            "a red circle", pictures / "image.png", pictures / "mask.png", progress=False
        )
    with pytest.raises(UserError, match="--likelihood-weight is -1"):
        pipe.edit("a red circle", pictures / "image.png", pictures / "mask.png", likelihood_weight=-1)


def run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_the_cli_edits_with_a_mask_and_extends_and_writes_what_it_announces(bundle, pictures, tmp_path, capsys):
    image = str(pictures / "image.png")
    for extra in (["--mask", str(pictures / "mask.png")], ["--extend", "left", "--likelihood-weight", "2"]):
        out = tmp_path / extra[0].strip("-")
        argv = ["a red square", "--model", str(bundle), "--init-image", image, *extra,
                "--num-images", "2", "--candidates", "4", "--out", str(out), "--json"]  # fmt: skip
        code, stdout, _ = run(argv, capsys)
        assert code == 0
        records = [json.loads(line) for line in stdout.splitlines()]
        assert [r["rank"] for r in records] == [1, 2]
        for r in records:
            assert Image.open(r["path"]).size == (16, 16)
    left = np.asarray(Image.open(tmp_path / "extend" / "a-red-square_s0_r1.png"))
    assert np.array_equal(left[:, 8:], np.asarray(Image.open(image))[:, :8])  # moved right, kept exactly


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--mask", "MASK"], "give --init-image PNG too"),
        (["--init-image", "IMAGE", "--mask", "MASK", "--extend", "left"], "give one of them"),
        (["--init-image", "IMAGE", "--mask", "MASK", "--keep-rows", "2"], "give one of them"),
        (["--init-image", "IMAGE", "--mask", "MASK", "--method", "clip-guided"], "leave out --method"),
        (["--likelihood-weight", "1"], "give one of them too"),
        (["--init-image", "IMAGE", "--mask", "BLACK"], "has no white pixel"),
        (["--init-image", "IMAGE", "--mask", "MISSING"], "mask '.*missing.png' does not exist"),
    ],
)
def test_the_cli_refuses_edits_it_cannot_do_in_one_sentence(bundle, pictures, tmp_path, capsys, extra, match):
    names = {"IMAGE": "image.png", "MASK": "mask.png", "BLACK": "black.png", "MISSING": "missing.png"}
    extra = [str(pictures / names[a]) if a in names else a for a in extra]
    code, _, err = run(["a red square", "--model", str(bundle), "--out", str(tmp_path), *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(match, err)


def test_the_edit_evaluation_masks_the_second_object_and_changes_one_of_its_attributes():
    from dalle_mini_impl.config import ShapesConfig
    from dalle_mini_impl.eval.edit import SECOND_HALF, sources
    from dalle_mini_impl.shapes.generator import parse_caption
    from dalle_mini_impl.shapes.judge import find_objects

    held_out = ShapesConfig().held_out
    edits = sources(16, 0, held_out, 32)
    assert [parse_caption(e["caption"])["relation"] for e in edits[:4]] == list(SECOND_HALF)
    assert {e["renderer"] for e in edits} == {"ours", "pil"}
    for e in edits:
        before, after = parse_caption(e["caption"]), parse_caption(e["edit"])
        assert before["objects"][0] == after["objects"][0] and before["relation"] == after["relation"]
        changed = {k for k in ("color", "shape") if before["objects"][1][k] != after["objects"][1][k]}
        assert len(changed) == 1 and f"{after['objects'][1]['color']} {after['objects'][1]['shape']}" not in held_out
        mask = np.asarray(e["mask"]) > 0
        found = find_objects(e["image"])
        assert len(found) == 2
        for o in found:  # the second object wholly under the mask, the first wholly outside it
            x0, y0, x1, y1 = o.bbox
            covered = mask[y0:y1, x0:x1]
            assert covered.all() if o.color == before["objects"][1]["color"] else not covered.any()
