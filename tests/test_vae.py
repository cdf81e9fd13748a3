"""Tests of the image tokenizers in `vae/`: shapes and ranges, schedules, learning, I/O, codebook care.

Run: pytest tests/test_vae.py (the overfitting tests are marked slow). Every model is a tiny real one
trained on synthetic coloured rectangles; nothing is mocked.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import vae
from vae import schedules

VAE_DIR = Path(vae.__file__).resolve().parent
TINY = dict(codebook_size=32, hidden=8, res_blocks=1, code_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def rectangles(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n white images (n, 3, size, size) in [0, 1], each with one or two flat coloured rectangles."""
    rng = np.random.default_rng(seed)
    palette = np.array([(220, 30, 30), (40, 170, 60), (40, 80, 220), (235, 205, 20), (30, 30, 30)]) / 255
    images = np.ones((n, size, size, 3), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            y0, x0 = rng.integers(0, size - 8, 2)
            h, w = rng.integers(6, size // 2, 2)
            images[i, y0 : y0 + h, x0 : x0 + w] = palette[rng.integers(len(palette))]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def tiny(kind: str, **overrides) -> vae.ImageTokenizer:
    torch.manual_seed(0)
    return vae.build(kind, **{**TINY, **overrides})


# -- encode / decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dvae", "vq"])
@pytest.mark.parametrize("factor", [4, 8, 16])
def test_encode_decode_shapes_dtypes_ranges(kind, factor):
    model = tiny(kind, factor=factor).eval()
    images = rectangles(2)
    ids = model.encode(images)
    side = 32 // factor
    assert ids.shape == (2, side, side) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < model.codebook_size
    assert model.grid(32) == (side, side) and model.grid((32, 64)) == (side, 2 * side)
    out = model.decode(ids)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # a flat (b, n) sequence of ids, as a transformer emits them, decodes to the same images
    assert torch.equal(model.decode(ids.reshape(2, -1)), out)
    assert torch.equal(model.encode(images), ids)  # deterministic


@pytest.mark.parametrize("kind", ["dvae", "vq"])
def test_logit_laplace_decodes_into_unit_range(kind):
    model = tiny(kind, recon_loss="logit_laplace")
    images = rectangles(2)
    loss, metrics = model(images, 0)
    assert torch.isfinite(loss)
    out = model.decode(model.encode(images))
    assert out.shape == (2, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_pixel_mapping_round_trips():
    x = torch.rand(2, 3, 4, 4)
    mapped = vae.losses.map_pixels(x)
    assert float(mapped.min()) >= 0.1 and float(mapped.max()) <= 0.9
    assert torch.allclose(vae.losses.unmap_pixels(mapped), x, atol=1e-6)


def test_bad_inputs_are_vae_errors():
    model = tiny("dvae")
    with pytest.raises(vae.VAEError, match="multiple of"):
        model.encode(torch.rand(1, 3, 30, 30))
    with pytest.raises(vae.VAEError, match="float tensor"):
        model.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(vae.VAEError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(vae.VAEError, match="square"):
        model.decode(torch.zeros(1, 10, dtype=torch.long))


# -- schedules and metrics -------------------------------------------------------------------------


def test_temperature_schedule_anneals_monotonically_then_holds():
    values = [schedules.temperature_at(s, 1.0, 1 / 16, 1000) for s in range(0, 1300, 10)]
    assert values[0] == pytest.approx(1.0)
    assert schedules.temperature_at(1000, 1.0, 1 / 16, 1000) == pytest.approx(1 / 16)
    assert values[-1] == pytest.approx(1 / 16)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert schedules.temperature_at(5, 1.0, 0.5, 0) == pytest.approx(0.5)  # no annealing: the end value


def test_kl_weight_schedule_warms_up_monotonically_then_holds():
    values = [schedules.kl_weight_at(s, 1e-3, 200) for s in range(0, 400, 5)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert schedules.kl_weight_at(0, 1e-3, 0) == pytest.approx(1e-3)
    assert schedules.values_at(
        0, temperature_start=1.0, temperature_end=0.1, temperature_steps=10, kl_weight=1.0, kl_warmup_steps=10
    ) == {"temperature": pytest.approx(1.0), "kl_weight": 0.0}


def test_psnr_and_code_usage():
    x = torch.zeros(1, 3, 4, 4)
    assert float(vae.psnr(x + 0.1, x)) == pytest.approx(20.0, abs=1e-4)
    usage = vae.metrics.CodeUsage(codebook_size=8, window=2)
    assert usage.update(torch.tensor([[0, 1], [2, 3]])) == (pytest.approx(0.5), pytest.approx(4.0))
    usage.update(torch.tensor([[4, 4], [4, 4]]))
    fraction, perplexity = usage.update(torch.tensor([[5, 5], [5, 5]]))  # the first batch left the window
    assert fraction == pytest.approx(2 / 8) and perplexity == pytest.approx(2.0)


def test_code_usage_restored_from_its_state_continues_as_if_never_stopped():
    batches = [torch.tensor([[0, 1]]), torch.tensor([[2, 2]]), torch.tensor([[3, 4]]), torch.tensor([[5, 5]])]
    whole = vae.metrics.CodeUsage(codebook_size=8, window=2)
    for ids in batches[:3]:
        whole.update(ids)
    restored = vae.metrics.CodeUsage(codebook_size=8, window=2)
    restored.load_state_dict(whole.state_dict())
    expected = (pytest.approx(3 / 8), pytest.approx(2**1.5))  # codes 3, 4, 5 at 1/4, 1/4, 1/2
    assert restored.update(batches[3]) == whole.update(batches[3]) == expected
    # a window of 1 keeps the newest batch (the fourth) of a state saved with 2
    narrow = vae.metrics.CodeUsage(codebook_size=8, window=1)
    narrow.load_state_dict(whole.state_dict())
    assert narrow.counts().tolist() == [0, 0, 0, 0, 0, 2, 0, 0]
    empty = vae.metrics.CodeUsage(codebook_size=8).state_dict()["batches"]
    assert empty.shape == (0, 8)
    with pytest.raises(ValueError, match="for a codebook of 16"):
        vae.metrics.CodeUsage(codebook_size=16).load_state_dict({"batches": empty})


# -- training --------------------------------------------------------------------------------------


def test_dvae_training_step_metrics_and_schedule_values():
    model = tiny("dvae")
    loss, metrics = model(rectangles(4), 3, temperature=0.5, kl_weight=0.01)
    loss.backward()
    assert float(metrics["temperature"]) == 0.5 and float(metrics["kl_weight"]) == pytest.approx(0.01)
    for key in ("loss", "recon", "kl", "psnr"):
        assert metrics[key].ndim == 0 and torch.isfinite(metrics[key])
    assert metrics["ids"].shape == (4, 8, 8) and metrics["reconstruction"].shape == (4, 3, 32, 32)
    assert model.codebook.weight.grad is not None and model.encoder.head.weight.grad.abs().sum() > 0


def test_dvae_straight_through_feeds_one_hot_codes():
    model = tiny("dvae", straight_through=True)
    logits = torch.randn(2, 32, 4, 4, requires_grad=True)
    weights = model.relaxed_one_hot(logits, temperature=0.7)
    assert torch.equal(weights.detach().sum(1), torch.ones(2, 4, 4))
    assert set(weights.detach().unique().tolist()) <= {0.0, 1.0}
    weights[:, 0].sum().backward()
    assert logits.grad.abs().sum() > 0  # the relaxed sample carries the gradient


@pytest.mark.parametrize("kind", ["dvae", "vq"])
def test_training_under_bf16_autocast_keeps_fp32_weights_and_learns(kind):
    # what `train.vae.mixed_precision=bf16` runs on a CPU: accelerate's autocast around the forward
    torch.manual_seed(0)
    model = tiny(kind)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = rectangles(8)
    losses = []
    for step in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, metrics = model(images, step, **({"temperature": 0.5} if kind == "dvae" else {}))
        assert torch.isfinite(loss) and metrics["ids"].shape == (8, 8, 8)
        if kind == "dvae":  # its softmax terms in float32 (CPU autocast left them in bf16: 3 significant digits)
            assert metrics["kl"].dtype == metrics["diversity"].dtype == torch.float32
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trained = [p for p in model.parameters() if p.grad is not None]
    assert trained and all(p.dtype == p.grad.dtype == torch.float32 for p in trained)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def _overfit(model: vae.ImageTokenizer, images: torch.Tensor, steps: int, **schedule) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        values = {k: v(step) if callable(v) else v for k, v in schedule.items()}
        loss, _ = model(images, step, **values)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(vae.psnr(model.decode(model.encode(images)), images))


@pytest.mark.slow
def test_dvae_overfits_one_batch():
    torch.manual_seed(0)
    model = vae.build("dvae", codebook_size=64, hidden=16, res_blocks=1, code_dim=32)
    images = rectangles(8)
    temperature = lambda s: schedules.temperature_at(s, 1.0, 1 / 16, 300)  # noqa: E731
    assert _overfit(model, images, 400, temperature=temperature, kl_weight=0.0) > 25  # ~28 dB here


@pytest.mark.slow
def test_vq_overfits_one_batch():
    torch.manual_seed(0)
    model = vae.build("vq", codebook_size=64, hidden=16, res_blocks=1, code_dim=32, dead_code_steps=20)
    assert _overfit(model, rectangles(8), 400) > 25  # ~28.5 dB here


def test_vq_without_ema_learns_its_codebook():
    model = tiny("vq", ema=False)
    loss, metrics = model(rectangles(4), 0)
    loss.backward()
    assert "codebook" in metrics and model.quantizer.embed.grad.abs().sum() > 0


def test_vq_ema_moves_codes_towards_their_latents():
    model = tiny("vq", dead_code_steps=0, ema_decay=0.5)
    images = rectangles(4)
    before = model.quantizer.codes().clone()
    with torch.no_grad():
        z = rearrange(model.free_latent(images), "b l h w -> (b h w) l")
        ids = model.quantizer.nearest(z)
        model(images, 0)
    code = int(ids.mode().values)
    target = torch.nn.functional.normalize(z[ids == code].mean(0), dim=0)
    assert float(model.quantizer.codes()[code] @ target) > float(before[code] @ target)


def test_vq_ema_counts_and_sums_in_float32_under_bf16_latents():
    """Under bf16 autocast on a CPU the latents reach the EMA as bf16, whose counts and sums once rounded there
    (a code chosen 4,187 times counted as 4,192)."""
    from vae.vq import CosineCodebook

    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6000, 8, generator=gen), dim=-1).bfloat16()
    ids = torch.cat([torch.zeros(4187, dtype=torch.long), torch.randint(1, 4, (1813,), generator=gen)])
    books = []
    for latents in (z, z.float()):  # the same values, as bf16 and as float32
        torch.manual_seed(0)
        book = CosineCodebook(4, 8, ema=True, ema_decay=0.5, dead_code_steps=0)
        book.update(latents, ids)
        books.append(book)
    for name in ("cluster_size", "embed_sum", "embed"):
        assert torch.equal(getattr(books[0], name), getattr(books[1], name)), name


def test_dead_codes_restart_from_the_batch_and_get_used():
    model = tiny("vq", codebook_size=64, dead_code_steps=3)
    images = rectangles(8)
    q = model.quantizer
    with torch.no_grad():  # every code identical: ties go to code 0, all others are never chosen
        q.embed.copy_(q.embed[:1].expand_as(q.embed))
        q.embed_sum.copy_(q.embed)
        q.unused_steps.zero_()
    restarted = [int(model(images, step)[1]["restarted"]) for step in range(3)]
    # nothing restarts before dead_code_steps steps; then the codes never chosen do (code 0 and maybe one
    # more, picked by ties once the EMA has moved code 0, stay)
    assert restarted[:2] == [0, 0] and restarted[2] >= 60
    codes = q.codes()
    assert not torch.allclose(codes[1:], codes[:1].expand(63, -1))
    # each restarted code sits on a latent of the batch, so it is that latent's nearest code now
    usage = vae.metrics.CodeUsage(64, window=1)
    fraction, _ = usage.update(model(images, 3)[1]["ids"])
    assert fraction > 0.3


def test_vq_discriminator_losses():
    model = tiny("vq", disc_start=1, disc_weight=0.5)
    images = rectangles(4)
    _, before = model(images, 0)
    assert "adversarial" not in before
    loss, metrics = model(images, 1)
    assert "adversarial" in metrics
    loss.backward()
    assert all(p.grad is not None for p in model.discriminator.parameters())  # dropped by the critic's own step
    generator = {id(p) for p in model.generator_parameters()}
    assert not any(id(p) in generator for p in model.discriminator.parameters())
    d_loss, d_metrics = model(images, 1, reconstruction=metrics["reconstruction"])
    assert torch.isfinite(d_loss) and {"disc_loss", "disc_real", "disc_fake"} <= set(d_metrics)
    with pytest.raises(vae.VAEError, match="no discriminator"):
        tiny("vq").discriminator_loss(images, images)


def test_vq_gan_term_is_weighted_to_pull_as_hard_as_reconstruction_at_the_last_layer():
    model = tiny("vq", disc_start=0, disc_weight=1.0).eval()  # eval: no codebook moves, the same forward twice
    images = rectangles(4)
    last = model.decoder.layers[-1].weight
    pixels = model.decode_latent(model.snap(model.free_latent(images))[0])
    recon = F.mse_loss(pixels, images)
    adversarial = -model.discriminator(pixels * 2 - 1).mean()  # a term of another scale than the MSE
    weight = model.adversarial_balance(recon, adversarial)
    (recon_grad,) = torch.autograd.grad(recon, last, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(weight * adversarial, last, retain_graph=True)
    assert weight > 0 and gan_grad.norm() == pytest.approx(recon_grad.norm(), rel=1e-3)
    # the training loss uses it: recon + commitment + disc_weight * balance * adversarial
    loss, metrics = model(images, 0)
    assert float(metrics["adversarial_weight"]) == pytest.approx(float(weight), rel=1e-4)
    expected = metrics["recon"] + 0.25 * metrics["commitment"] + metrics["adversarial_weight"] * metrics["adversarial"]
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    half = tiny("vq", disc_start=0, disc_weight=0.5).eval()
    assert float(half(images, 0)[1]["adversarial_weight"]) == pytest.approx(0.5 * float(weight), rel=1e-4)
    with torch.no_grad():  # evaluation takes no gradient: the GAN term is left out, as VQGAN leaves it
        assert float(model(images, 0)[1]["adversarial_weight"]) == 0.0
    for p in model.decoder.layers[-1].parameters():  # a frozen last layer: the fixed weight disc_weight
        p.requires_grad_(False)
    assert float(model(images, 0)[1]["adversarial_weight"]) == 1.0


# -- the continuous side (for CLIP guidance) -------------------------------------------------------


@pytest.mark.parametrize("kind", ["dvae", "vq"])
def test_snap_passes_gradients_to_the_free_latent(kind):
    model = tiny(kind).eval()
    images = rectangles(2)
    free = model.free_latent(images).detach().requires_grad_()
    latent, ids = model.snap(free)
    assert torch.equal(ids, model.encode(images))
    assert torch.allclose(model.decode_latent(latent), model.decode(ids), atol=1e-5)
    model.decode_latent(latent).mean().backward()
    assert free.grad is not None and torch.isfinite(free.grad).all() and free.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["dvae", "vq"])
def test_embed_ids_is_the_decoder_input_of_each_code(kind):
    model = tiny(kind).eval()
    ids = torch.randint(0, 32, (2, 8, 8))
    latent = model.embed_ids(ids)
    assert latent.shape[:1] + latent.shape[2:] == (2, 8, 8)
    assert torch.allclose(model.decode_latent(latent), model.decode(ids))


@pytest.mark.parametrize("kind", ["dvae", "vq"])
def test_nearest_codes_are_sorted_by_latent_distance_itself_first(kind):
    model = tiny(kind).eval()
    near = model.nearest_codes(5)
    assert near.shape == (32, 5) and torch.equal(near[:, 0], torch.arange(32))
    vectors = model.embed_ids(torch.arange(32).view(1, 1, -1))[0, :, 0].T  # (32, d)
    dist = (vectors[:, None] - vectors[near]).norm(dim=-1)  # (32, 5)
    assert (dist[:, 1:].diff(dim=-1) >= -1e-6).all()
    others = torch.cdist(vectors, vectors).fill_diagonal_(float("inf")).min(dim=-1).values
    assert torch.allclose(dist[:, 1], others, atol=1e-6)  # the second is the nearest other code
    assert model.nearest_codes(100).shape == (32, 32)  # at most the codebook


def test_dvae_soft_latent_is_a_codebook_mixture():
    model = tiny("dvae")
    logits = torch.full((1, 32, 2, 2), -1e4)
    logits[:, 7] = 0
    assert torch.allclose(model.soft_latent(logits), model.embed_ids(torch.full((1, 2, 2), 7)))


def test_product_codes_pick_one_code_per_group_and_sum_their_vectors():
    """group_sizes (4, 9) over 36 ids: id 9a + b is a pair of codes (a, b), one from each group."""
    model = tiny("dvae", codebook_size=36, group_sizes=[4, 9]).eval()
    assert model.groups == 2 and model.codebook.num_embeddings == 13
    ids = model.encode(rectangles(2))  # (2, 8, 8)
    assert ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < 36
    factors = model.factor_ids(ids)  # (2, 2, 8, 8)
    assert torch.equal(factors[:, 0] * 9 + factors[:, 1], ids) and torch.equal(model.flat_ids(factors), ids)
    every = torch.arange(36).view(1, 6, 6)
    expected = model.codebook.weight[every // 9] + model.codebook.weight[4 + every % 9]  # (1, 6, 6, d)
    torch.testing.assert_close(model.embed_ids(every), rearrange(expected, "b h w d -> b d h w"))
    assert torch.equal(model.snap(model.one_hot(every))[1], every)  # one-hot per group snaps back to the ids
    soft = model.soft_latent(model.one_hot(every) * 1e4)  # each group's softmax is that group's one-hot
    torch.testing.assert_close(soft, model.embed_ids(every))
    loss, metrics = model(rectangles(2), 0, temperature=1.0, kl_weight=1e-3)
    assert metrics["ids"].shape == (2, 8, 8) and int(metrics["ids"].max()) < 36
    assert 0 <= float(metrics["kl"]) <= math.log(4) + math.log(9) + 1e-5  # the sum of the groups' KL to uniform


def test_group_dropout_zeroes_the_later_groups_of_some_cells_only():
    model = tiny("dvae", codebook_size=64, group_sizes=[4, 4, 4], group_dropout=0.5)
    torch.manual_seed(0)
    kept = model.drop_groups(torch.ones(64, 12, 8, 8)).unflatten(1, (3, 4))  # (b, g, k, h, w)
    per_group = kept.amax(dim=2)  # (b, g, h, w): 1 where the group reaches the decoder
    assert bool((per_group[:, 0] == 1).all())  # the first group is never dropped
    assert bool((per_group[:, 2] <= per_group[:, 1]).all())  # nested: a later group goes first
    assert 0.45 < float((per_group[:, 2] == 0).float().mean()) < 0.55  # the last group dropped half the time
    assert 0.2 < float((per_group[:, 1] == 0).float().mean()) < 0.3  # the middle one a quarter
    with pytest.raises(vae.VAEError, match="group_dropout"):
        tiny("dvae", group_dropout=0.5)  # one group: nothing to drop


def test_ink_groups_see_where_things_are_drawn_not_their_color(tmp_path):
    """group_inputs ['rgb', 'ink']: the second group's codes are the same for a shape in any color."""
    assert torch.allclose(vae.dvae.ink_map(torch.tensor([1.0, 0.4, 0.9]).view(1, 3, 1, 1)), torch.tensor(0.6))
    model = tiny("dvae", codebook_size=36, group_sizes=[4, 9], group_inputs=["rgb", "ink"]).eval()
    red = rectangles(2)
    gray = red.amin(dim=1, keepdim=True)  # the same ink drawn in gray: every pixel's min channel kept
    assert torch.equal(vae.dvae.ink_map(gray.expand(-1, 3, -1, -1)), vae.dvae.ink_map(red))
    recolored = torch.cat([gray, gray, red[:, 2:]], dim=1)  # another color, same min channel
    layout_red, layout_other = (model.factor_ids(model.encode(x))[:, 1] for x in (red, recolored))
    assert torch.equal(layout_red, layout_other)
    assert not torch.equal(model.free_latent(red)[:, :4], model.free_latent(recolored)[:, :4])  # rgb group sees it
    vae.save_pretrained(model, tmp_path / "tok")
    loaded = vae.load_pretrained(tmp_path / "tok").eval()
    assert loaded.group_inputs == ("rgb", "ink") and torch.equal(loaded.encode(red), model.encode(red))
    loss, _ = model(red, 0, temperature=1.0, kl_weight=1e-3)
    loss.backward()
    assert model.ink_encoder.head.weight.grad.abs().sum() > 0  # the layout group trains through the decoder
    for bad in (["rgb"], ["ink", "ink"], ["rgb", "luma"]):
        with pytest.raises(vae.VAEError, match="group_inputs .* must name 'rgb' or 'ink' for each of the 2"):
            tiny("dvae", codebook_size=36, group_sizes=[4, 9], group_inputs=bad)
    with pytest.raises(vae.VAEError, match="group_inputs .* needs the dvae tokenizer"):
        vae.model_kwargs("vq", {"codebook_size": 36, "group_inputs": ["rgb", "ink"]})


def test_product_codes_need_sizes_that_multiply_to_the_codebook_and_the_dvae():
    with pytest.raises(vae.VAEError, match=r"codebook_size 32 is not the product of group_sizes \[4, 9\] \(36\)"):
        tiny("dvae", codebook_size=32, group_sizes=[4, 9])
    with pytest.raises(vae.VAEError, match="integers >= 2"):
        tiny("dvae", codebook_size=32, group_sizes=[1, 32])
    with pytest.raises(vae.VAEError, match="needs the dvae tokenizer"):
        vae.model_kwargs("vq", {"codebook_size": 36, "group_sizes": [4, 9]})
    assert vae.model_kwargs("vq", {"codebook_size": 36, "group_sizes": []}) == {"codebook_size": 36}


# -- build, save, load -----------------------------------------------------------------------------


def test_build_rejects_unknown_kinds_and_arguments():
    with pytest.raises(vae.VAEError, match="unknown tokenizer kind 'vqvae'"):
        vae.build("vqvae")
    with pytest.raises(vae.VAEError, match="unknown argument 'lookup_dim' for the dvae"):
        vae.build("dvae", lookup_dim=8)
    with pytest.raises(vae.VAEError, match="factor must be a power of two"):
        vae.build("vq", factor=6)
    with pytest.raises(vae.VAEError, match="recon_loss"):
        vae.build("dvae", recon_loss="ssim")


def test_project_config_maps_onto_constructor_and_schedules():
    from dalle_mini_impl.config import VAEConfig

    fields = dataclasses.asdict(VAEConfig())
    assert set(vae.SCHEDULE_FIELDS) <= set(fields)
    for kind in vae.KINDS:
        model = vae.build(kind, **vae.model_kwargs(kind, fields))
        assert model.kind == kind
        # every constructor argument comes from the config
        assert set(vae.constructor_fields(kind)) <= set(fields)
        assert not set(vae.constructor_fields(kind)) & set(vae.SCHEDULE_FIELDS)
    values = schedules.values_at(10, **{k: fields[k] for k in vae.SCHEDULE_FIELDS})
    assert set(values) == {"temperature", "kl_weight"}


@pytest.mark.parametrize("kind", ["dvae", "vq"])
def test_save_load_round_trip_gives_identical_ids(kind, tmp_path):
    model = tiny(kind, factor=8)
    images = rectangles(4)
    model(images, 0)  # a training step moves the VQ's EMA buffers: they must be saved too
    model.eval()
    vae.save_pretrained(model, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["vae.json", "vae.safetensors"]
    meta = json.loads((tmp_path / "tok" / "vae.json").read_text())
    assert meta["kind"] == kind and meta["kwargs"]["factor"] == 8 and meta["format_version"] == 1
    loaded = vae.load_pretrained(tmp_path / "tok")
    assert not loaded.training and type(loaded) is type(model)
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert torch.equal(loaded.decode(model.encode(images)), model.decode(model.encode(images)))


def test_load_errors_are_one_sentence_vae_errors(tmp_path):
    with pytest.raises(vae.VAEError, match="has no vae.json"):
        vae.load_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "tok"
    vae.save_pretrained(tiny("dvae"), folder)
    weights = folder / "vae.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(vae.VAEError, match="corrupt"):
        vae.load_pretrained(folder)
    weights.unlink()
    with pytest.raises(vae.VAEError, match="does not exist"):
        vae.load_pretrained(folder)
    weights.write_bytes(good)
    meta = json.loads((folder / "vae.json").read_text())
    meta["kwargs"]["code_dim"] = 24
    (folder / "vae.json").write_text(json.dumps(meta))
    with pytest.raises(vae.VAEError, match="shape") as info:
        vae.load_pretrained(folder)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    (folder / "vae.json").write_text("{not json")
    with pytest.raises(vae.VAEError, match="not valid JSON"):
        vae.load_pretrained(folder)


# -- the package stands alone ----------------------------------------------------------------------

ALLOWED = {"torch", "einops", "numpy", "safetensors"}
OPTIONAL = {"convert.py": {"yaml"}}  # the converter reads taming's YAML configs, importing PyYAML where it does


def test_vae_sources_import_only_torch_einops_numpy_safetensors_and_stdlib():
    for path in sorted(VAE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                allowed = ALLOWED | OPTIONAL.get(path.name, set())
                assert top in allowed or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_importing_vae_loads_no_project_module():
    code = (
        "import sys, vae\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dalle_mini_impl', 'train', 'sample'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_parameter_count_of_the_shapes_preset_is_lean():
    model = vae.build("dvae", codebook_size=512, factor=4, hidden=64, res_blocks=1, code_dim=256)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert math.isclose(model.grid(32)[0], 8)


def test_saved_tokenizer_files_get_the_mode_a_new_file_gets(tmp_path):
    """Once vae.safetensors was 0600 (safetensors writes it so): no other account could load the tokenizer."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    folder = vae.save_pretrained(tiny("dvae"), tmp_path / "tok")
    for name in ("vae.safetensors", "vae.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
