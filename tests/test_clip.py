"""CLIP: the loss, the temperature clamp, eos pooling, the feature gather, the augmentation, the scorer
(classify / index / search), the command lines, the open_clip adapter, and retrieval metrics.

Tiny real models throughout (width 32, depth 1, 16 px images, patch 4); the bundle-level tests use a
CLIP trained for a second on four colored squares, so search and classify have a right answer.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from dalle_mini_impl.clip.model import (
    CLIP,
    clip_augment,
    clip_from_config,
    contrastive_loss,
    drop_path,
    gather_features,
    pool_positions,
)
from dalle_mini_impl.config import CLIPConfig, RunConfig, load_config, save_config
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.pipeline.bundle import save_module
from tests.bundle_factory import TINY_CLIP as TINY

COLORS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 20)}


def tiny_clip(
    pool: str = "eot",
    vocab: int = 50,
    text_len: int = 8,
    seed: int = 0,
    stem: str = "patch",
    tower: str = "vit",
    image_pool: str = "cls",
) -> CLIP:
    torch.manual_seed(seed)
    cfg = CLIPConfig(**TINY, pool=pool, stem=stem, image_tower=tower, image_pool=image_pool)
    return CLIP(cfg, image_size=16, text_vocab=vocab, text_len=text_len, pad_id=0, eos_id=3)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


# ----------------------------------------------------------------------------------------------
# Loss and temperature
# ----------------------------------------------------------------------------------------------


def test_loss_is_symmetric_and_smallest_for_matched_pairs():
    g = torch.Generator().manual_seed(0)
    img = unit(torch.randn(8, 16, generator=g))
    txt = unit(img + 0.3 * torch.randn(8, 16, generator=g))
    scale = torch.tensor(10.0)
    assert torch.allclose(CLIP.loss(img, txt, scale), CLIP.loss(txt, img, scale))
    shuffled = txt[torch.tensor([3, 0, 1, 2, 7, 4, 5, 6])]
    assert CLIP.loss(img, txt, scale) < CLIP.loss(img, shuffled, scale)
    # the cross-entropy of both directions, by hand
    logits = scale * img @ txt.T
    by_hand = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    assert torch.allclose(contrastive_loss(img, txt, scale), by_hand)


def test_hard_negatives_are_extra_texts_for_every_image():
    g = torch.Generator().manual_seed(0)
    img = unit(torch.randn(6, 16, generator=g))
    txt = unit(img + 0.3 * torch.randn(6, 16, generator=g))
    neg = unit(torch.randn(4, 16, generator=g))
    scale = torch.tensor(10.0)
    logits = scale * img @ torch.cat([txt, neg]).T  # (6, 10): images see the 4 negatives too
    by_hand = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(scale * txt @ img.T, torch.arange(6))) / 2
    assert torch.allclose(contrastive_loss(img, txt, scale, neg), by_hand)
    assert torch.allclose(contrastive_loss(img, txt, scale, neg[:0]), contrastive_loss(img, txt, scale))
    # a negative that looks like the true caption costs more than one that does not
    assert contrastive_loss(img, txt, scale, txt[:4]) > contrastive_loss(img, txt, scale, -txt[:4])


def test_perturb_makes_one_word_false():
    import random

    from dalle_mini_impl.shapes.negatives import perturb

    rng = random.Random(0)
    caption = "a small red circle to the left of a blue square"
    seen = []
    for _ in range(400):
        edited = perturb(caption, rng)
        changed = [(a, b) for a, b in zip(caption.split(), edited.split()) if a != b]
        assert len(edited.split()) == len(caption.split()) and len(changed) == 1
        seen.append(changed[0])
    assert {("left", "right"), ("small", "large"), ("red", "green"), ("circle", "triangle")} <= set(seen)
    # the kind of edit is drawn first: the one relation word is flipped about a quarter of the time
    assert 0.18 < seen.count(("left", "right")) / len(seen) < 0.32
    assert not any(a in ("a", "to", "of", "the") for a, _ in seen)
    assert perturb("a smiling face", rng) is None
    assert perturb("Left", random.Random(0)) == "right"  # whole words, any case
    assert perturb("leftover", random.Random(0)) is None


def test_perturbations_edit_one_kind_each():
    import random

    from dalle_mini_impl.shapes.negatives import EDITS, perturb, perturbations

    caption = "a small red circle to the left of a blue square"
    # one edit draws what perturb draws, from the same generator state
    a, b = random.Random(5), random.Random(5)
    assert [perturbations(caption, a, 1) for _ in range(50)] == [[perturb(caption, b)] for _ in range(50)]
    rng = random.Random(0)
    kind_of = {word: kind for kind, table in EDITS.items() for word in table}
    for _ in range(100):
        edits = perturbations(caption, rng, 4, ["purple triangle"])
        assert len(edits) == 4 and len(set(edits)) == 4
        kinds = []
        for edited in edits:
            changed = [a for a, b in zip(caption.split(), edited.split()) if a != b]
            assert len(changed) == 1 and "purple triangle" not in edited
            kinds.append(kind_of[changed[0]])
        assert sorted(kinds) == ["color", "shape", "size", "spatial"]  # every kind once
    # more edits than kinds: the rest from every kind, none twice; a caption with nothing to edit has none
    six = perturbations("a red circle", random.Random(1), 6)
    assert len(six) == len(set(six)) and 2 <= len(six) <= 6
    assert {e.split()[1] != "red" for e in six[:2]} == {True, False}  # the first two: a color and a shape
    assert perturbations("a smiling face", random.Random(0), 4) == []


def test_perturb_never_names_a_held_out_combination():
    import random

    from dalle_mini_impl.shapes.negatives import perturb

    held_out = ["purple triangle", "yellow square"]
    rng = random.Random(0)
    edits = [perturb("a small red triangle above a yellow circle", rng, held_out) for _ in range(300)]
    assert all(e is not None and "purple triangle" not in e and "yellow square" not in e for e in edits)
    assert {"a small red circle above a yellow circle", "a small red triangle below a yellow circle"} <= set(edits)
    # a caption that names one already may still be edited; edits that would make one are drawn again
    assert perturb("a purple triangle", random.Random(0), held_out) is not None
    assert perturb("a yellow square", random.Random(0), ["yellow circle", "yellow triangle", "red square"]) in {
        "a green square", "a blue square", "a purple square", "a black square"}  # fmt: skip
    assert perturb("Left", random.Random(0), held_out) == "right"
    every_edit = ["red circle", "red triangle"] + [
        f"{c} square" for c in ("green", "blue", "yellow", "purple", "black")
    ]
    assert perturb("a red square", random.Random(0), every_edit) is None


@pytest.mark.parametrize(
    "stem,tower,image_pool",
    [("patch", "vit", "cls"), ("conv", "vit", "cls"), ("conv", "vit", "mean"), ("patch", "resnet", "cls")],
)
def test_training_a_few_steps_matches_pairs(stem, tower, image_pool):
    model = tiny_clip(vocab=20, text_len=6, stem=stem, tower=tower, image_pool=image_pool)
    colors = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]).float()
    images = colors[:, :, None, None].expand(-1, 3, 16, 16).clone()
    ids = torch.tensor([[2, 4 + i, 3, 0, 0, 0] for i in range(4)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss = model.loss(*model(images, ids))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
    assert loss.item() < first / 4
    with torch.no_grad():
        sims = model.encode_image(images) @ model.encode_text(ids).T
    assert sims.argmax(1).tolist() == [0, 1, 2, 3]


def test_logit_scale_starts_at_init_temperature_and_is_clamped():
    model = tiny_clip()
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1e4))
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)  # clamped in forward
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)  # and in place after a step
    *_, scale = model(torch.rand(2, 3, 16, 16), torch.tensor([[2, 5, 3, 0, 0, 0, 0, 0]] * 2))
    assert scale.item() <= 100.0 + 1e-4


def test_embeddings_are_normalised():
    model = tiny_clip()
    img = model.encode_image(torch.rand(3, 3, 16, 16))
    txt = model.encode_text(torch.tensor([[2, 5, 6, 3, 0, 0, 0, 0]] * 3))
    assert img.shape == txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_conv_stem_halves_once_per_factor_of_two_and_makes_the_patch_grid(patch):
    from dalle_mini_impl.clip.model import conv_stem

    stem = conv_stem(patch, 32)
    strided = [m for m in stem if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == patch.bit_length() - 1
    assert [m.out_channels for m in strided][-1] == 32  # the channels double up to the width
    assert stem(torch.rand(2, 3, 16, 16)).shape == (2, 32, 16 // patch, 16 // patch)
    model = tiny_clip(stem="conv")
    assert model.encode_image(torch.rand(3, 3, 16, 16)).shape == (3, 16)  # as many tokens as the patchify gives


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_resnet_tower_halves_once_per_factor_of_two_and_its_grid_is_the_last_map(patch):
    from dalle_mini_impl.clip.model import ResidualBlock

    torch.manual_seed(0)
    model = CLIP(
        CLIPConfig(**{**TINY, "patch_size": patch, "image_depth": 2}, image_tower="resnet"),
        image_size=16,
        text_vocab=10,
        text_len=4,
        pad_id=0,
        eos_id=3,
    )
    blocks = [m for m in model.visual.stages if isinstance(m, ResidualBlock)]
    strides = [b.body[0].stride[0] for b in blocks]
    assert strides == [2] * (patch.bit_length() - 1) + [1, 1]  # one halving per factor of two, then image_depth
    assert blocks[-1].body[0].out_channels == 32  # the channels double up to the width
    images = torch.rand(3, 3, 16, 16)
    pixels = model._pixels(images)
    assert model.visual.feature_map(pixels).shape == (3, 32, 16 // patch, 16 // patch)
    assert model.encode_image(images).shape == (3, 16)
    grid = model.image_grid(images, 16 // patch).view(3, -1, 32)
    # each cell of the grid is the last map's cell, layer-normalised to unit length
    cells = rearrange(model.visual.feature_map(pixels), "b d h w -> b (h w) d")
    assert torch.allclose(grid, F.layer_norm(cells, (32,)) * 32**-0.5, atol=1e-5)
    assert torch.allclose(grid.norm(dim=-1), torch.ones(3, (16 // patch) ** 2), atol=1e-4)
    # the attention pool reads the whole map: a change in one corner cell moves the embedding
    moved = images.clone()
    moved[:, :, :patch, :patch] = 1 - moved[:, :, :patch, :patch]
    assert not torch.allclose(model.encode_image(images), model.encode_image(moved), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------


def test_pooling_is_at_the_first_eos_whatever_the_id_values():
    ids = torch.tensor(
        [
            [2, 5, 6, 3, 0, 0, 0, 0],
            [2, 49, 7, 3, 0, 0, 0, 0],  # a large id before eos: argmax of ids would pool at 1
            [2, 5, 3, 9, 3, 0, 0, 0],  # the first eos counts
            [2, 5, 6, 7, 8, 9, 10, 11],  # cut before eos: the last non-pad id
        ]
    )
    assert pool_positions(ids, eos_id=3, pad_id=0).tolist() == [3, 3, 2, 7]


def test_text_embedding_ignores_what_follows_eos():
    model = tiny_clip()
    a = torch.tensor([[2, 5, 6, 3, 0, 0, 0, 0]])
    b = torch.tensor([[2, 5, 6, 3, 49, 17, 0, 0]])  # junk after eos, including the largest id
    c = torch.tensor([[2, 5, 7, 3, 0, 0, 0, 0]])  # a different word before eos
    with torch.no_grad():
        ea, eb, ec = model.encode_text(a), model.encode_text(b), model.encode_text(c)
    assert torch.allclose(ea, eb, atol=1e-6)
    assert not torch.allclose(ea, ec, atol=1e-3)


def test_mean_pooling_ignores_padding():
    model = tiny_clip(pool="mean")
    short = torch.tensor([[2, 5, 3, 0, 0, 0]])
    batch = torch.tensor([[2, 5, 3, 0, 0, 0], [2, 5, 6, 7, 8, 3]])
    with torch.no_grad():
        alone, together = model.encode_text(short[:, :3]), model.encode_text(batch)[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_a_text_tower_of_depth_zero_with_mean_pooling_is_a_bag_of_words():
    # the emoji judge's text tower: a caption is the mean of its tokens (each normalised with its position), so
    # a (name, style) pair never seen together is the sum of two parts that were
    torch.manual_seed(0)
    model = CLIP(
        CLIPConfig(**{**TINY, "text_depth": 0}, pool="mean"),
        image_size=16,
        text_vocab=50,
        text_len=6,
        pad_id=0,
        eos_id=3,
    )
    text = model.text
    assert len(text.transformer.blocks) == 0
    with torch.no_grad():  # a visible position embedding, so that the check is not of zeros
        text.pos.normal_(std=0.5)
    ids = torch.tensor([[2, 5, 6, 3, 0, 0]])
    with torch.no_grad():
        tokens = text.ln_final(text.token_embed(ids[:, :4]) + text.pos[:4])  # (1, 4, d)
        assert torch.allclose(model.encode_text(ids), unit(tokens.mean(dim=1) @ text.proj), atol=1e-5)


def test_a_mean_pooled_image_tower_embeds_the_mean_of_its_last_patch_tokens():
    # clip.image_pool = "mean": the class token still takes part in attention, but the embedding is the
    # patches' mean after the last block; embed_and_grid's one pass (unCLIP's variations) gives the same
    model = tiny_clip(image_pool="mean")
    visual = model.visual
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        x = visual.transformer(visual.tokens(model._pixels(images)))  # (b, 1 + n, d)
        by_hand = unit(visual.ln_post(x[:, 1:].mean(dim=1)) @ visual.proj)
        assert torch.allclose(model.encode_image(images), by_hand, atol=1e-5)
        embedding, grid = model.image_features(images, 2)
        assert torch.allclose(embedding, by_hand, atol=1e-5)
        assert torch.allclose(grid, model.image_grid(images, 2), atol=1e-5)
        visual.pool = "cls"  # the same weights read at the class token: another embedding
        assert not torch.allclose(model.encode_image(images), by_hand, atol=1e-3)
        assert torch.allclose(model.encode_image(images), unit(visual.ln_post(x[:, 0]) @ visual.proj), atol=1e-5)


@pytest.mark.parametrize(
    "changes,image_size,message",
    [
        ({"patch_size": 5}, 16, "clip.patch_size"),
        ({"stem": "resnet"}, 16, "clip.stem"),
        ({"patch_size": 12, "stem": "conv"}, 24, "power of two"),  # 12 divides 24, but no stack of halvings makes 12
        ({"image_heads": 3}, 16, "clip.image_heads"),
        ({"image_tower": "cnn"}, 16, "clip.image_tower' is 'cnn'; set it to vit or resnet"),
        ({"image_tower": "resnet", "stem": "conv"}, 16, "only a ViT has"),  # a stem the ResNet would ignore
        ({"image_pool": "max"}, 16, "clip.image_pool' is 'max'; set it to cls or mean"),
        ({"image_tower": "resnet", "image_pool": "mean"}, 16, "clip.image_pool' is 'mean', which only a ViT has"),
        ({"image_tower": "resnet", "patch_size": 3}, 24, "clip.image_tower=resnet needs"),
        ({"drop_path": 1.0}, 16, "clip.drop_path' is 1.0; set it in \\[0, 1\\)"),
        ({"image_tower": "resnet", "drop_path": 0.1}, 16, "clip.drop_path' is '0.1', which only a ViT has"),
    ],
)
def test_bad_config_is_one_sentence(changes, image_size, message):
    with pytest.raises(UserError, match=message):
        CLIP(CLIPConfig(**{**TINY, **changes}), image_size=image_size, text_vocab=10, text_len=4, pad_id=0, eos_id=3)


def test_drop_path_keeps_the_expected_branch_and_zeroes_whole_samples():
    branch = torch.ones(20000, 3, 4)
    out = drop_path(branch, 0.3, training=True)
    per_sample = out.flatten(1)
    assert torch.all((per_sample == 0).all(1) | torch.isclose(per_sample, torch.tensor(1 / 0.7)).all(1))
    assert abs(float((per_sample[:, 0] == 0).float().mean()) - 0.3) < 0.02
    assert abs(float(out.mean()) - 1.0) < 0.03
    assert drop_path(branch, 0.3, training=False) is branch


def test_drop_path_rises_over_the_image_blocks_and_acts_in_training_only():
    torch.manual_seed(0)
    cfg = CLIPConfig(**{**TINY, "image_depth": 3, "drop_path": 0.2})
    model = CLIP(cfg, image_size=16, text_vocab=10, text_len=4, pad_id=0, eos_id=3)
    assert [b.drop_path for b in model.visual.transformer.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert all(b.drop_path == 0.0 for b in model.text.transformer.blocks)
    images = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.encode_image(images), model.encode_image(images))
        model.train()
        assert not torch.equal(model.encode_image(images), model.encode_image(images))


# ----------------------------------------------------------------------------------------------
# Gather and augmentation
# ----------------------------------------------------------------------------------------------


def test_gather_features_is_identity_on_one_process_and_passes_gradients():
    x = torch.randn(4, 8, requires_grad=True)
    y = gather_features(x)
    assert y is x
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).expand(4, 8))


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    img_x, txt_x, w_img, w_txt = _dist_problem()
    w_img.requires_grad_(True)
    w_txt.requires_grad_(True)
    rows = slice(rank * 4, rank * 4 + 4)
    loss = contrastive_loss(unit(img_x[rows] @ w_img), unit(txt_x[rows] @ w_txt), torch.tensor(5.0))
    loss.backward()
    grads = torch.cat([w_img.grad.flatten(), w_txt.grad.flatten()])
    dist.all_reduce(grads)  # what DDP does, then divides by the world size
    # uneven shards gather too: rank r holds r + 1 rows
    uneven = gather_features(torch.full((rank + 1, 2), float(rank)))
    if rank == 0:
        torch.save({"grad": grads / world, "loss": loss.detach(), "uneven": uneven}, out)
    dist.destroy_process_group()


def _dist_problem():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(8, 6, generator=g),
        torch.randn(8, 5, generator=g),
        torch.randn(6, 4, generator=g),
        torch.randn(5, 4, generator=g),
    )


@pytest.mark.slow
def test_gathered_loss_gradient_equals_the_full_batch_gradient(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.spawn(_gather_worker, args=(2, f"file://{tmp_path / 'init'}", str(out)), nprocs=2, join=True)
    got = torch.load(out)
    img_x, txt_x, w_img, w_txt = _dist_problem()
    w_img.requires_grad_(True)
    w_txt.requires_grad_(True)
    full = contrastive_loss(unit(img_x @ w_img), unit(txt_x @ w_txt), torch.tensor(5.0))
    full.backward()
    expected = torch.cat([w_img.grad.flatten(), w_txt.grad.flatten()])
    assert torch.allclose(got["grad"], expected, atol=1e-6)
    assert torch.equal(got["uneven"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))


def test_clip_augment_is_a_mild_crop_that_keeps_the_cell():
    images = torch.ones(8, 3, 48, 48)
    images[:, :, 4:12, 4:12] = 0  # an object in the top left cell
    g = torch.Generator().manual_seed(0)
    out = clip_augment(images, 0.85, g)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, images)
    dark = out.mean(1) < 0.5  # (b, h, w)
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    for mask in dark:
        cy, cx = ys[mask].mean(), xs[mask].mean()
        assert cy < 16 and cx < 16
    assert torch.allclose(clip_augment(images, 1.0), images, atol=1e-5)
    again = clip_augment(images, 0.85, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(UserError, match="crop_scale_min"):
        clip_augment(images, 0.0)


def test_clip_augment_shifts_whole_pixels_and_flips_without_resampling():
    images = torch.rand(64, 3, 16, 16)
    out = clip_augment(images, 1.0, torch.Generator().manual_seed(0), shift_max=0.25, flip_p=0.5)
    flips = shifts = 0
    for x, y in zip(images, out):
        # every output is its image, maybe mirrored, moved by whole pixels (at most 4 of 16), edges repeated
        found = None
        for mirrored in (False, True):
            src = x.flip(-1) if mirrored else x
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    moved = src[:, 4 + dy : 12 + dy, 4 + dx : 12 + dx]
                    if torch.allclose(y[:, 4:12, 4:12], moved, atol=1e-5):
                        found = (mirrored, dy, dx)
        assert found is not None
        flips += found[0]
        shifts += found[1:] != (0, 0)
    assert 16 < flips < 48 and shifts > 48  # about half mirrored; most moved
    again = clip_augment(images, 1.0, torch.Generator().manual_seed(0), shift_max=0.25, flip_p=0.5)
    assert torch.equal(out, again)
    # off, they draw no random number: a run without them crops exactly as before they existed
    assert torch.equal(
        clip_augment(images, 0.85, torch.Generator().manual_seed(3)),
        clip_augment(images, 0.85, torch.Generator().manual_seed(3), shift_max=0.0, flip_p=0.0),
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        ("clip.shift_max=0.5", "'clip.shift_max' is 0.5; set it in \\[0, 0.5\\)"),
        ("clip.flip_p=1.5", "'clip.flip_p' is 1.5; set it in \\[0, 1\\]"),
    ],
)
def test_clip_augment_settings_out_of_range_are_refused(imagefolder, tmp_path, setting, message):
    from train import clip as train_clip

    argv = ["--config", "emoji", "--data", str(imagefolder.root), "--out", str(tmp_path), "--set", setting]
    with pytest.raises(UserError, match=message):
        train_clip.main(argv)


def test_flips_are_refused_on_shapes(tmp_path):
    from train import clip as train_clip

    with pytest.raises(UserError, match="shapes captions name left and right"):
        train_clip.main(["--config", "shapes", "--out", str(tmp_path), "--set", "clip.flip_p=0.5"])


# ----------------------------------------------------------------------------------------------
# A tiny bundle trained on four colored squares
# ----------------------------------------------------------------------------------------------


def _square(color: tuple[int, int, int], size: int = 16) -> np.ndarray:
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = color
    return img


def _bundle_config() -> RunConfig:
    cfg = RunConfig()
    cfg.data.image_size = 16
    cfg.text.vocab_size = 320  # byte fallback needs about 280 pieces
    cfg.text.text_len = 12
    cfg.clip = CLIPConfig(**TINY)
    return cfg


def _make_bundle(folder, train_steps: int, seed: int, stem: str = "patch", tower: str = "vit") -> None:
    from dalle_mini_impl.text.tokenizer import TextTokenizer

    cfg = _bundle_config()
    cfg.clip.stem, cfg.clip.image_tower = stem, tower
    captions = [f"a {c} square" for c in COLORS] + [f"a {c} circle on the left" for c in COLORS] * 3
    tokenizer = TextTokenizer.train(captions, cfg.text, folder / "text.model")
    torch.manual_seed(seed)
    model = clip_from_config(cfg, tokenizer)
    images = torch.stack([torch.from_numpy(_square(rgb)).permute(2, 0, 1).float() / 255 for rgb in COLORS.values()])
    ids = tokenizer.encode([f"a {c} square" for c in COLORS])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(train_steps):
        loss = model.loss(*model(images, ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
    save_module(model, folder / "clip.safetensors")
    save_config(cfg, folder / "config.json")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    _make_bundle(folder, train_steps=40, seed=0)
    return folder


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other")
    _make_bundle(folder, train_steps=0, seed=1)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name, rgb in COLORS.items():
        Image.fromarray(_square(rgb, 24)).save(folder / f"{name}.png")  # 24 px: the scorer resizes
    (folder / "sub").mkdir()
    Image.fromarray(_square(COLORS["blue"])).save(folder / "sub" / "blue2.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_load_clip_scores_and_classifies(bundle, photos):
    from dalle_mini_impl.clip.uses import clip_score, read_image
    from dalle_mini_impl.pipeline.bundle import load_clip

    scorer = load_clip(bundle)
    images = torch.stack([read_image(photos / f"{c}.png", scorer.image_size) for c in COLORS])
    scores = scorer.score(images, "a green square")
    assert scores.shape == (4,) and scores.argmax().item() == 1
    probs = scorer.classify(images, list(COLORS), templates=["a {} square"])
    assert probs.shape == (4, 4)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    assert probs.argmax(1).tolist() == [0, 1, 2, 3]
    # template ensembling: the label embedding is the renormalised mean over templates
    ensembled = scorer.embed_labels(["red"], ["a {} square", "a {} circle on the left"])
    by_hand = unit(scorer.embed_texts(["a red square", "a red circle on the left"]).mean(0, keepdim=True))
    assert torch.allclose(ensembled, by_hand, atol=1e-6)
    cs = clip_score(scorer, images, [f"a {c} square" for c in COLORS])
    assert cs.shape == (4,) and (cs >= 0).all() and (cs <= 100).all()
    assert torch.allclose(
        cs,
        100
        * (scorer.embed_images(images) * scorer.embed_texts([f"a {c} square" for c in COLORS])).sum(-1).clamp_min(0),
    )
    assert scorer.fingerprint() == load_clip(bundle).fingerprint()
    with pytest.raises(UserError, match="labels"):
        scorer.classify(images, [])
    with pytest.raises(UserError, match="template"):
        scorer.classify(images, ["red"], templates=["no slot"])


@pytest.mark.parametrize("stem,tower", [("conv", "vit"), ("patch", "resnet")])
def test_a_bundle_loads_with_its_image_tower(tmp_path, photos, stem, tower):
    from dalle_mini_impl.clip.uses import read_image
    from dalle_mini_impl.pipeline.bundle import load_clip

    _make_bundle(tmp_path, train_steps=40, seed=0, stem=stem, tower=tower)
    scorer = load_clip(tmp_path)
    assert (scorer.model.cfg.stem, scorer.model.cfg.image_tower) == (stem, tower)
    # trained on the four squares, it matches each photo to its own color, as the patchify one does
    images = torch.stack([read_image(photos / f"{name}.png", 16) for name in COLORS])
    sims = scorer.embed_images(images) @ scorer.embed_texts([f"a {c} square" for c in COLORS]).T
    assert sims.argmax(1).tolist() == [0, 1, 2, 3]


def test_index_and_search(bundle, other_bundle, photos, tmp_path):
    from dalle_mini_impl.clip.uses import build_index, search
    from dalle_mini_impl.pipeline.bundle import load_clip

    scorer = load_clip(bundle)
    meta = build_index(scorer, photos, tmp_path / "idx", batch_size=2)
    assert meta["n"] == 5 and meta["skipped"] == ["broken.png"]
    emb = np.load(tmp_path / "idx" / "embeddings.npy")
    assert emb.dtype == np.float16 and emb.shape == (5, 16)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
    files = json.loads((tmp_path / "idx" / "files.json").read_text())
    assert sorted(files) == ["blue.png", "green.png", "red.png", "sub/blue2.png", "yellow.png"]
    hits = search(scorer, tmp_path / "idx", "a blue square", k=2)
    assert {p.split("/")[-1] for p, _ in hits} == {"blue.png", "blue2.png"}
    assert hits[0][1] >= hits[1][1]
    assert len(search(scorer, tmp_path / "idx", "a red square", k=50)) == 5
    with pytest.raises(UserError) as e:
        search(load_clip(other_bundle), tmp_path / "idx", "a blue square", k=2)
    assert str(e.value).startswith(f"index '{tmp_path / 'idx'}' was built by another CLIP model")
    assert "pass that --model or rebuild the index" in str(e.value)


def test_cli_classify_index_search(bundle, photos, tmp_path, capsys):
    from dalle_mini_impl.clip.__main__ import main

    main(
        [
            "classify",
            str(photos / "red.png"),
            str(photos / "yellow.png"),
            "--labels",
            "red, green,blue,yellow",
            "--template",
            "a {} square",
            "--model",
            str(bundle),
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["best"] for r in rows] == ["red", "yellow"]
    assert set(rows[0]["probs"]) == {"red", "green", "blue", "yellow"}
    assert sum(rows[0]["probs"].values()) == pytest.approx(1, abs=1e-5)

    main(["index", str(photos), "--out", str(tmp_path / "idx"), "--model", str(bundle)])
    assert json.loads(capsys.readouterr().out)["n"] == 5
    main(["search", str(tmp_path / "idx"), "a green square", "-k", "1", "--model", str(bundle)])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["path"].endswith("green.png") and -1 <= row["score"] <= 1
    # without --model, search loads the bundle that built the index (it was refused as the shipped model's)
    main(["search", str(tmp_path / "idx"), "a green square", "-k", "1"])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [row]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify", "missing.png", "--labels", "a,b"], "does not exist"),
        (["classify", "{photos}/notes.txt", "--labels", "a,b"], "is not a readable image"),
        (["classify", "{photos}/red.png", "--labels", " , "], "--labels is empty"),
        (["search", "{photos}", "a red square"], "has no embeddings.npy"),
        (["search", "{photos}", "a red square", "-k", "0"], "at least 1"),
        (["index", "{photos}/nowhere", "--out", "{photos}/idx"], "does not exist"),
        # once a FileExistsError traceback after the embedding
        (["index", "{photos}", "--out", "{photos}/red.png"], "is a file; give a folder for the index"),
        # once ignored: the bundle's CLIP labelled the images
        (["classify", "{photos}/red.png", "--labels", "a,b", "--pretrained", "x"], "--pretrained names open_clip"),
        (["classify", "{photos}/red.png", "--labels", "a,b", "--openclip", "ViT-B-32"], "name two models"),
    ],
)
def test_cli_bad_inputs_are_one_sentence(bundle, photos, argv, message):
    from dalle_mini_impl.clip.__main__ import main

    argv = [a.replace("{photos}", str(photos)) for a in argv] + ["--model", str(bundle)]
    with pytest.raises(UserError, match=message):
        main(argv)


def test_cli_defaults_to_the_shipped_model(tmp_path, capsys):
    from PIL import Image

    from dalle_mini_impl.clip.__main__ import main
    from dalle_mini_impl.pipeline.bundle import SHIPPED_MODEL
    from dalle_mini_impl.shapes.generator import Obj, Scene, render

    assert SHIPPED_MODEL.is_dir()
    scene = Scene(objects=[Obj("red", "circle", "large", 16.0, 16.0)], caption="a large red circle", stated={})
    Image.fromarray(render(scene, 32)).save(tmp_path / "red_circle.png")
    capsys.readouterr()
    main(["classify", str(tmp_path / "red_circle.png"), "--labels", "circle,square,triangle", "--template", "a {}"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["best"] == "circle", out


# ----------------------------------------------------------------------------------------------
# The open_clip adapter
# ----------------------------------------------------------------------------------------------


class OpenClipLike(torch.nn.Module):
    """The part of an open_clip model the adapter uses: encode_image, encode_text, logit_scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(3 * 8 * 8, 12)
        self.text = torch.nn.EmbeddingBag(128, 12)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(50.0)))

    def encode_image(self, pixels):
        return self.image(pixels.flatten(1))

    def encode_text(self, tokens):
        return self.text(tokens)


def char_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(ch) % 128 for ch in t.ljust(16)[:16]] for t in texts])


def test_pretrained_adapter_preprocesses_like_open_clip():
    from dalle_mini_impl.clip.openclip import PretrainedClipScorer

    model = OpenClipLike()
    scorer = PretrainedClipScorer(
        model, char_tokenizer, image_size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), source="toy"
    )
    images = torch.rand(3, 3, 16, 16)
    resized = F.interpolate(images, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    pixels = (resized - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = unit(model.encode_image(pixels))
        expected_text = unit(model.encode_text(char_tokenizer(["a red circle"])))
    assert torch.allclose(scorer.embed_images(images), expected, atol=1e-5)
    assert torch.allclose(scorer.score(images, "a red circle"), (expected @ expected_text.T)[:, 0], atol=1e-5)
    probs = scorer.classify(images, ["red", "blue"])
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    assert scorer.logit_scale() == pytest.approx(50.0)
    assert len(scorer.fingerprint()) == 16


def test_pretrained_adapter_over_our_clip_agrees_with_load_clip(bundle, photos):
    from dalle_mini_impl.clip.openclip import PretrainedClipScorer
    from dalle_mini_impl.clip.uses import read_image
    from dalle_mini_impl.pipeline.bundle import load_clip

    ours = load_clip(bundle)
    # our CLIP standardises pixels itself, so the adapter passes them through unchanged
    adapted = PretrainedClipScorer(
        ours.model, ours.tokenizer.encode, image_size=16, mean=(0, 0, 0), std=(1, 1, 1), source=str(bundle)
    )
    images = torch.stack([read_image(photos / f"{c}.png", 16) for c in COLORS])
    assert torch.allclose(adapted.embed_images(images), ours.embed_images(images), atol=1e-6)
    assert torch.allclose(adapted.classify(images, list(COLORS)), ours.classify(images, list(COLORS)), atol=1e-3)


def test_openclip_missing_dependency_is_one_sentence(monkeypatch):
    from dalle_mini_impl.clip.openclip import OpenCLIPScorer

    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an uninstalled package looks like
    with pytest.raises(UserError, match="pip install open_clip_torch"):
        OpenCLIPScorer("ViT-B-32", pretrained="openai")


def test_an_open_clip_model_it_cannot_build_is_one_sentence(monkeypatch):
    """open_clip is an optional package this machine lacks: a stand-in raises what open_clip raises for a name it
    does not know (its RuntimeError "Model config for X not found."), to hold the adapter's sentence."""
    import types

    from dalle_mini_impl.clip.openclip import OpenCLIPScorer

    def create_model_and_transforms(name, pretrained=None, device="cpu"):
        raise RuntimeError(f"Model config for {name} not found.\nsecond line")

    monkeypatch.setitem(
        sys.modules, "open_clip", types.SimpleNamespace(create_model_and_transforms=create_model_and_transforms)
    )
    with pytest.raises(UserError) as e:
        OpenCLIPScorer("ViT-Q-99", pretrained="laion2b")
    assert str(e.value) == (
        "open_clip could not build 'ViT-Q-99' with pretrained='laion2b' (Model config for ViT-Q-99 not found.); "
        "check the name (open_clip.list_models()) and the weights"
    )


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def test_retrieval_metrics_count_same_caption_hits():
    from dalle_mini_impl.eval.clip import retrieval_metrics

    feats = unit(torch.eye(4)[:, :4] + 0.0)
    captions = ["a", "b", "c", "d"]
    perfect = retrieval_metrics(feats, feats, captions)
    assert perfect["t2i_R@1"] == perfect["i2t_R@1"] == 1.0 and perfect["n"] == 4
    # every text points at the next image: wrong, unless that image has the same caption
    shifted = feats[[1, 2, 3, 0]]
    wrong = retrieval_metrics(feats, shifted, captions)
    assert wrong["t2i_R@1"] == 0.0 and wrong["i2t_R@1"] == 0.0 and wrong["t2i_R@5"] == 1.0
    same = retrieval_metrics(feats, shifted, ["x", "x", "c", "c"])
    assert same["t2i_R@1"] == 0.5 and same["i2t_R@1"] == 0.5


def test_zero_shot_shapes_reports_three_accuracies(bundle):
    from dalle_mini_impl.config import ShapesConfig
    from dalle_mini_impl.eval.clip import one_object_scenes, zero_shot_shapes
    from dalle_mini_impl.pipeline.bundle import load_clip

    images, objects = one_object_scenes(ShapesConfig(), 16, "validation", 6)
    assert images.shape == (6, 3, 16, 16) and len(objects) == 6
    out = zero_shot_shapes(load_clip(bundle), images, objects)
    assert set(out) == {"color", "shape", "position", "n"} and out["n"] == 6
    assert all(0 <= out[k] <= 1 for k in ("color", "shape", "position"))


def test_the_same_caption_ceiling_counts_other_captions_that_fit():
    from dalle_mini_impl.data.images import from_uint8
    from dalle_mini_impl.eval.clip import same_caption_ceiling
    from dalle_mini_impl.shapes.generator import Obj, Scene, render

    def image(*objects: Obj) -> torch.Tensor:
        return from_uint8(render(Scene(list(objects), caption=""), 32))

    red = Obj("red", "circle", "large", 16, 16)
    blue_square = Obj("blue", "square", "small", 6, 6)
    images = torch.stack([image(red), image(red), image(blue_square)])
    # both red images fit both red captions: each red query's own caption holds 1 of the 2 that fit
    assert same_caption_ceiling(images, ["a red circle", "a large red circle", "a blue square"]) == pytest.approx(
        (0.5 + 0.5 + 1.0) / 3
    )
    assert same_caption_ceiling(images, ["a red circle", "a red circle", "a blue square"]) == 1.0


def test_eval_clip_command_prints_json(bundle, capsys):
    from dalle_mini_impl.eval.clip import main

    main(["--model", str(bundle), "--data", "shapes", "--split", "validation", "--limit", "12", "--zero-shot", "6"])
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 12 and out["hit_rule"] == "same caption"
    assert {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"} <= set(out)
    assert out["zero_shot"]["n"] == 6 and 0 < out["t2i_R@1_ceiling"] <= 1


def test_swap_phrase_makes_a_caption_false_in_its_own_phrase():
    import random

    from dalle_mini_impl.clip.negatives import swap_phrase

    phrases = [", emojione style", ", emojione classic style", ", noto style"]
    rng = random.Random(0)
    made = {swap_phrase("pizza, emojione classic style", phrases, rng) for _ in range(50)}
    assert made == {"pizza, emojione style", "pizza, noto style"}  # the longest phrase held is the one swapped
    assert {swap_phrase("pizza, noto style", phrases, rng) for _ in range(50)} == {
        "pizza, emojione style",
        "pizza, emojione classic style",
    }
    assert swap_phrase("a red circle", phrases, rng) is None


def test_swapped_captions_are_distinct_and_one_is_swap_phrases_draw():
    import random

    from dalle_mini_impl.clip.negatives import swap_phrase, swapped_captions

    phrases = [", noto style", ", twemoji style", ", blob style", ", fluent style"]
    every = swapped_captions("pizza, blob style", phrases, 3, random.Random(0))
    assert sorted(every) == [
        "pizza, fluent style",
        "pizza, noto style",
        "pizza, twemoji style",
    ]  # the caption in every other
    two = swapped_captions("pizza, blob style", phrases, 2, random.Random(1))
    assert len(set(two)) == 2 and "pizza, blob style" not in two
    # one swap draws exactly what swap_phrase draws, so runs with the default are the runs of before
    assert swapped_captions("pizza, noto style", phrases, 1, random.Random(5)) == [
        swap_phrase("pizza, noto style", phrases, random.Random(5))
    ]
    assert swapped_captions("a red circle", phrases, 2, random.Random(0)) == []


def test_swaps_seen_only_name_only_captions_some_image_has():
    import random

    from dalle_mini_impl.clip.negatives import rest_swapped_captions, swap_phrase, swapped_captions

    phrases = [", noto style", ", twemoji style", ", blob style", ", fluent style"]
    seen = {"pizza, noto style", "pizza, blob style", "apple, twemoji style", "apple, noto style"}
    # pizza is seen in noto and blob only: its twemoji and fluent captions are never made
    assert {swap_phrase("pizza, noto style", phrases, random.Random(k), seen) for k in range(30)} == {
        "pizza, blob style"
    }
    assert sorted(swapped_captions("pizza, fluent style", phrases, 3, random.Random(0), seen)) == [
        "pizza, blob style",
        "pizza, noto style",
    ]  # fewer than asked where fewer are seen
    assert swapped_captions("cat, noto style", phrases, 1, random.Random(0), seen) == []
    assert swap_phrase("cat, noto style", phrases, random.Random(0), seen) is None
    # the same draws as without `seen` where every swap is seen
    every = {f"pizza{p}" for p in phrases}
    for k in range(5):
        assert swapped_captions("pizza, noto style", phrases, 2, random.Random(k), every) == swapped_captions(
            "pizza, noto style", phrases, 2, random.Random(k)
        )
    batch = ["pizza, noto style", "apple, twemoji style"]
    assert rest_swapped_captions(batch, phrases, 1, random.Random(0)) == ["apple, noto style", "pizza, twemoji style"]
    assert rest_swapped_captions(batch, phrases, 1, random.Random(0), seen) == ["apple, noto style"]


def test_rest_swaps_keep_the_phrase_take_another_captions_rest_and_never_a_true_caption():
    import random

    from dalle_mini_impl.clip.negatives import rest_swapped_captions

    phrases = [", noto style", ", blob style", ", fluent style"]
    batch = ["pizza, noto style", "apple, blob style", "apple, noto style", "cat, fluent style", "a red circle"]
    made = rest_swapped_captions(batch, phrases, 5, random.Random(0))
    # the noto captions can only take cat (apple in noto is a true caption); apple in blob takes pizza or cat;
    # cat in fluent takes pizza, and apple once though two captions hold it; the circle holds no phrase
    assert sorted(made) == sorted(
        ["cat, noto style", "pizza, blob style", "cat, blob style", "cat, noto style", "pizza, fluent style"]
        + ["apple, fluent style"]
    )
    assert not set(made) & set(batch)
    one = rest_swapped_captions(batch, phrases, 1, random.Random(3))
    assert len(one) == 4 and one == rest_swapped_captions(batch, phrases, 1, random.Random(3))  # seeded
    assert rest_swapped_captions(batch, phrases, 0, random.Random(0)) == []


def test_hard_negatives_off_shapes_need_swap_phrases(imagefolder, tmp_path):
    from train import clip as train_clip

    argv = ["--config", "emoji", "--data", str(imagefolder.root), "--out", str(tmp_path)]
    # hard negatives off: also swaps_per_caption=1, the emoji preset's 7 needing them (refused below)
    hard_off = [*argv, "--set", "clip.hard_negatives=false", "--set", "clip.swaps_per_caption=1"]
    with pytest.raises(UserError, match="clip.hard_negatives on data other than shapes needs clip.swap_phrases"):
        train_clip.main([*argv, "--set", "clip.hard_negatives=true", "--set", "clip.swap_phrases=[]"])
    with pytest.raises(UserError, match="swapped for 1 to 7 others of clip.swap_phrases"):  # emoji's eight styles
        train_clip.main([*argv, "--set", "clip.swaps_per_caption=8"])
    with pytest.raises(UserError, match="clip.hard_negatives is off and makes no negative to swap"):
        train_clip.main([*argv, "--set", "clip.hard_negatives=false", "--set", "clip.swaps_per_caption=2"])
    with pytest.raises(UserError, match="'clip.rest_swaps' is 1; it keeps a caption's phrase .* needs clip.hard_neg"):
        train_clip.main([*hard_off, "--set", "clip.rest_swaps=1"])
    with pytest.raises(UserError, match="'clip.rest_swaps' is -1; set it to 0 \\(none\\) or a count per caption"):
        train_clip.main([*argv, "--set", "clip.rest_swaps=-1"])
    with pytest.raises(UserError, match="'clip.swaps_seen_only' is true; .* needs clip.hard_negatives=true"):
        train_clip.main([*hard_off, "--set", "clip.swaps_seen_only=true"])
    with pytest.raises(UserError, match="'clip.swaps_seen_only' is true; .* on data other than shapes"):
        train_clip.main(["--config", "shapes", "--out", str(tmp_path / "s"), "--set", "clip.swaps_seen_only=true"])
    # without hard negatives nothing is swapped, and no phrases are needed
    plain = load_config("emoji")
    plain.data.source, plain.clip.hard_negatives, plain.clip.swap_phrases = str(imagefolder.root), False, []
    plain.clip.swaps_per_caption = 1  # the preset's 7 swaps need hard negatives (refused above)
    train_clip.check_config(plain)
    with pytest.raises(UserError, match="'clip.swaps_per_caption' is 0; on shapes it is how many edits .* 1 or more"):
        train_clip.main(["--config", "shapes", "--out", str(tmp_path / "s"), "--set", "clip.swaps_per_caption=0"])
    shapes = load_config("shapes")
    shapes.clip.swaps_per_caption = 4  # every kind of edit: allowed on shapes
    train_clip.check_config(shapes)
    from train import all as train_all

    with pytest.raises(UserError, match="needs clip.swap_phrases"):  # train.all says so before any stage runs
        train_all.main(["--config", "shapes", "--data", str(imagefolder.root), "--out", str(tmp_path / "all")])
    assert not (tmp_path / "all").exists()
