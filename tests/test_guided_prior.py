"""CLIP-guided refinement with the transformer's prior: the log-likelihood term, its gradient, the rule
that refinement never hands back an image it scores below its start, and the Jacobi optimiser.

Tiny random bundles with a dVAE and with a VQ (tests/bundle_factory.py); run with
`pytest tests/test_guided_prior.py`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from einops import rearrange

from dalle_mini_impl.errors import UserError
from dalle_mini_impl.model.generate import generate
from dalle_mini_impl.pipeline.guided import code_vectors, jacobi_update, random_codes, refine, start_latent
from dalle_mini_impl.pipeline.pipeline import Pipeline
from tests.bundle_factory import make_tiny_bundle, tiny_config
from tests.test_generate import TEXT, VARIANTS, make
from vae.product import id_rows

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle"


@pytest.fixture(scope="module", params=["dvae", "vq"])
def pipe(request, tmp_path_factory) -> Pipeline:
    cfg = tiny_config()
    cfg.vae.kind = request.param
    return Pipeline.from_pretrained(make_tiny_bundle(tmp_path_factory.mktemp(request.param), cfg=cfg), device="cpu")


@pytest.mark.parametrize("kw", VARIANTS)
def test_the_log_likelihood_of_one_hot_codes_is_the_models_image_loss(kw):
    model = make(**kw).double()
    ids = torch.randint(0, model.cfg.image_vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    factors = model.cfg.image_factors
    one_hot = torch.zeros(3, 16, sum(factors), dtype=torch.double).scatter_(-1, id_rows(ids, factors), 1.0)
    with torch.no_grad():
        per_image = model.code_log_likelihood(TEXT, one_hot)
        _, parts = model.loss(TEXT, ids)
    assert per_image.shape == (3,)
    torch.testing.assert_close(per_image.mean(), -parts["image_loss"].double(), atol=1e-5, rtol=0)  # loss: fp32


def test_code_weights_are_one_hots_of_the_snapped_codes_and_carry_the_priors_gradient(pipe):
    tok = pipe.image_tokenizer
    h, w = pipe.grid
    ids = random_codes(tok.codebook_size, 2, h, w, torch.Generator().manual_seed(1))
    free = (start_latent(tok, ids) + 0.3 * torch.randn(2, *start_latent(tok, ids).shape[1:])).requires_grad_(True)
    weights = tok.code_weights(free)
    _, snapped = tok.snap(free)
    expected = pipe.transformer.embed_image(snapped.flatten(1))
    got = pipe.transformer.embed_code_weights(rearrange(weights, "b k h w -> b (h w) k"))
    torch.testing.assert_close(got, expected)  # forward: exactly the snapped codes
    log_likelihood = pipe.prior(PROMPT)(rearrange(weights, "b k h w -> b (h w) k"))
    (grad,) = torch.autograd.grad(log_likelihood.sum(), [free])
    assert grad.abs().sum() > 0  # backward: the prior's gradient reaches the latents


def test_a_prior_weight_of_zero_is_clip_alone(pipe):
    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 2, h, w, torch.Generator().manual_seed(2))
    kw = dict(steps=6, lr=0.1, cutouts=4, progress=False)
    plain = refine(pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator(), **kw)
    zero = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator(),
        prior=pipe.prior(PROMPT), prior_weight=0.0, **kw,
    )  # fmt: skip
    for a, b in zip(plain, zero):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight", [0.5, 50.0])
def test_refinement_never_returns_less_than_its_start_by_the_combined_objective(pipe, weight):
    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 3, h, w, torch.Generator().manual_seed(3))
    prior = pipe.prior(PROMPT)

    def objective(ids: torch.Tensor) -> torch.Tensor:
        one_hot = pipe.image_tokenizer.code_weights(start_latent(pipe.image_tokenizer, ids))
        with torch.no_grad():
            return pipe.clip.score(pipe.decode(ids), PROMPT) + weight * prior(
                rearrange(one_hot, "b k h w -> b (h w) k")
            )

    ids, _, scores = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, steps=8, lr=0.2, cutouts=4,
        generator=torch.Generator().manual_seed(0), progress=False, prior=prior, prior_weight=weight,
    )  # fmt: skip
    assert (objective(ids) >= objective(start) - 1e-5).all()
    torch.testing.assert_close(scores, pipe.clip.score(pipe.decode(ids), PROMPT), atol=1e-5, rtol=0)


def test_refinement_returns_its_start_when_no_step_beats_it(pipe):
    # a prior that rewards only the start's own codes and gives no gradient: the steps are CLIP's alone (they
    # move, as the first refinement shows), but every one that changes a code scores lower than the start
    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 2, h, w, torch.Generator().manual_seed(4))
    start_weights = rearrange(
        pipe.image_tokenizer.code_weights(start_latent(pipe.image_tokenizer, start)), "b k h w -> b (h w) k"
    ).detach()

    def same_codes(weights: torch.Tensor) -> torch.Tensor:
        return (weights.detach() * start_weights).sum(dim=-1).mean(dim=-1)  # the share of cells at the start's code

    kw = dict(steps=8, lr=0.2, cutouts=4, progress=False)
    moved, _, _ = refine(pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator(), **kw)
    assert (moved != start).any()
    kept, images, _ = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator(),
        prior=same_codes, prior_weight=10.0, **kw,
    )  # fmt: skip
    assert torch.equal(kept, start)
    torch.testing.assert_close(images, pipe.decode(start))


def test_a_negative_prior_weight_is_one_sentence(pipe):
    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 1, h, w)
    with pytest.raises(UserError, match="guided_prior_weight' is -1.0; set it to 0"):
        refine(pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, steps=1, lr=0.1, cutouts=1, prior_weight=-1.0)
    with pytest.raises(UserError, match="--guided-prior-weight is -1.0"):
        pipe.generate([PROMPT], guided_prior_weight=-1.0, progress=False)


def test_generation_from_random_codes_samples_nothing_and_writes_its_images(pipe):
    results = pipe.generate([PROMPT], method="clip-guided", init="random", guided_prior_weight=0.5, progress=False)
    assert len(results[0]) == pipe.cfg.sample.num_images
    scores = [r.clip_score for r in results[0]]
    assert scores == sorted(scores, reverse=True)
    again = pipe.generate([PROMPT], method="clip-guided", init="random", guided_prior_weight=0.5, progress=False)
    assert [r.image.tobytes() for r in again[0]] == [r.image.tobytes() for r in results[0]]  # seeded
    with pytest.raises(UserError, match="--init random starts CLIP-guided generation from random codes"):
        pipe.generate([PROMPT], init="random", progress=False)
    with pytest.raises(UserError, match="init 'noise' is unknown; use samples or random"):
        pipe.generate([PROMPT], method="clip-guided", init="noise", progress=False)


def test_code_vectors_are_each_codes_decoder_input(pipe):
    tok = pipe.image_tokenizer
    ids = random_codes(tok.codebook_size, 2, *pipe.grid, torch.Generator().manual_seed(5))
    vectors = code_vectors(tok)  # (K, d)
    assert vectors.shape[0] == tok.codebook_size
    torch.testing.assert_close(rearrange(vectors[ids], "b h w d -> b d h w"), tok.embed_ids(ids))


def test_jacobi_iterations_from_noise_reach_greedy_decoding(pipe):
    # with no pull from CLIP (lr 0), every Jacobi step fixes at least the first cell that differs from the
    # greedy decode, so within n steps the codes are a fixed point, and that fixed point is greedy decoding
    h, w = pipe.grid
    log_probs = pipe.cell_log_probs(PROMPT)
    ids = random_codes(pipe.image_tokenizer.codebook_size, 3, h, w, torch.Generator().manual_seed(6)).flatten(1)
    for _ in range(h * w):
        with torch.no_grad():
            scores, _ = log_probs(ids)  # unguided: the moves are the plain log-probabilities
        new = jacobi_update(scores, torch.zeros_like(scores), lr=0.0)
        if torch.equal(new, ids):
            break
        ids = new
    assert torch.equal(jacobi_update(scores, torch.zeros_like(scores), 0.0), ids)  # a fixed point
    with torch.no_grad():
        greedy = generate(pipe.transformer, pipe.encode_prompt(PROMPT).expand(3, -1), top_k=1)
    assert torch.equal(ids, greedy)


def test_refinements_guided_cells_are_the_ones_sampling_guides(pipe):
    """Once refinement guided the first guidance_until of the whole image while sampling (since it counts drawn
    cells) guided the first guidance_until of those after the kept rows: a completion of the bottom half was
    sampled guided and refined unguided."""
    h, w = pipe.grid
    n, first = h * w, (h // 2) * w
    ids = random_codes(pipe.image_tokenizer.codebook_size, 1, h, w, torch.Generator().manual_seed(7)).flatten(1)
    with torch.no_grad():
        moves, plain = pipe.cell_log_probs(PROMPT, 3.0, 0.5, first=first)(ids)
    guided = (moves != plain).any(dim=-1)[0]  # (n,): the cells whose moves guidance changed
    stop = first + round(0.5 * (n - first))
    assert not guided[:first].any() and not guided[stop:].any() and guided[first:stop].all()


def test_jacobi_refinement_never_scores_below_its_start_and_keeps_the_kept_rows(pipe):
    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 2, h, w, torch.Generator().manual_seed(7))
    weight, prior, log_probs = 0.5, pipe.prior(PROMPT), pipe.cell_log_probs(PROMPT)
    text = pipe.encode_prompt(PROMPT)

    def objective(ids):
        with torch.no_grad():
            log_likelihood = pipe.transformer.cell_log_likelihoods(text.expand(len(ids), -1), ids.flatten(1))
            return pipe.clip.score(pipe.decode(ids), PROMPT) + weight * log_likelihood.mean(-1)

    kw = dict(steps=6, lr=5.0, cutouts=2, progress=False, prior=prior, prior_weight=weight)
    ids, _, scores = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator().manual_seed(0),
        optimizer="jacobi", cell_log_probs=log_probs, **kw,
    )  # fmt: skip
    assert (ids != start).any()  # it moved
    assert (objective(ids) >= objective(start) - 1e-5).all()
    torch.testing.assert_close(scores, pipe.clip.score(pipe.decode(ids), PROMPT), atol=1e-5, rtol=0)
    kept, _, _ = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator().manual_seed(0),
        optimizer="jacobi", cell_log_probs=log_probs, keep_rows=1, **kw,
    )  # fmt: skip
    assert torch.equal(kept[:, :1], start[:, :1])


def test_the_jacobi_optimiser_without_the_prior_and_an_unknown_one_are_one_sentence(pipe):
    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 1, h, w)
    kw = dict(steps=1, lr=0.1, cutouts=1, progress=False)
    with pytest.raises(UserError, match="jacobi optimiser moves along the transformer's predictions; give it"):
        refine(pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, optimizer="jacobi", **kw)
    with pytest.raises(UserError, match="'sample.guided_optimizer' is 'sgd'; use adam or jacobi"):
        refine(pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, optimizer="sgd", **kw)
    with pytest.raises(UserError, match="'sample.guided_optimizer' is 'sgd'; use auto, adam, jacobi"):
        pipe.generate([PROMPT], guided_optimizer="sgd", progress=False)


def images_of(pipe, **kw) -> list[bytes]:
    return [r.image.tobytes() for r in pipe.generate([PROMPT], method="clip-guided", progress=False, **kw)[0]]


def test_auto_refines_random_codes_by_jacobi_steps_and_samples_by_adam(pipe):
    for init in ("random", "samples"):
        auto = images_of(pipe, init=init, guided_prior_weight=0.5, guided_optimizer="auto")
        jacobi = images_of(pipe, init=init, guided_prior_weight=0.5, guided_optimizer="jacobi")
        adam = images_of(pipe, init=init, guided_prior_weight=0.5, guided_optimizer="adam")
        assert auto == (jacobi if init == "random" else adam)
        assert jacobi != adam  # the two optimisers go different ways from the same start


def test_with_a_prior_weight_of_zero_the_jacobi_setting_refines_by_clip_alone(pipe):
    # Jacobi steps need the prior; without it refinement is VQGAN+CLIP as published, whatever the setting (the
    # evaluations' CLIP-alone columns run so), and a user who asks generate for it is told in one sentence
    s = pipe.settings(guided_prior_weight=0.0, guided_steps=3)
    start = random_codes(pipe.image_tokenizer.codebook_size, 2, *pipe.grid, torch.Generator().manual_seed(3))
    refined = {
        optimizer: pipe.refine(
            start, [(PROMPT, 1.0)], dataclasses.replace(s, guided_optimizer=optimizer), torch.Generator().manual_seed(0)
        )[0]
        for optimizer in ("jacobi", "adam")
    }
    assert torch.equal(refined["jacobi"], refined["adam"])
    with pytest.raises(UserError, match="--guided-optimizer jacobi moves along the transformer's predictions, and"):
        images_of(pipe, init="random", guided_prior_weight=0.0, guided_optimizer="jacobi")


def test_random_starts_that_reach_one_image_warn_that_the_images_repeat(pipe):
    # with no pull from CLIP every random start's Jacobi steps reach greedy decoding (the best-scoring codes on
    # the way, which are returned, may differ before it): fewer distinct images than starts, said once
    pipe.cfg.sample.guided_jacobi_lr = 0.0
    try:
        with pytest.warns(UserWarning, match=r"gave only \d distinct images? from 4 random starts; Jacobi steps") as w:
            results = pipe.generate(
                [PROMPT], method="clip-guided", init="random", guided_prior_weight=0.5, num_images=4, progress=False
            )
    finally:
        pipe.cfg.sample.guided_jacobi_lr = 10.0
    distinct = len({r.image.tobytes() for r in results[0]})
    assert len(results[0]) == 4 and distinct < 4
    assert f"gave only {distinct} distinct" in str(w[0].message) and len(w) == 1


def test_contrast_pulls_toward_what_tells_the_prompt_from_its_near_misses(pipe):
    from dalle_mini_impl.pipeline.guided import contrast_direction, prompt_direction

    near = pipe.contrast_captions(PROMPT)  # the tiny bundle is a shapes one: every one-word edit
    assert near == [f"a {c} circle" for c in ("green", "blue", "yellow", "purple", "black")] + [
        "a red square", "a red triangle"]  # fmt: skip
    d = prompt_direction(pipe.clip, [(PROMPT, 1.0)])
    near_emb, itself = pipe.clip.embed_texts(near), pipe.clip.embed_texts([PROMPT])  # (7, e), (1, e)
    assert contrast_direction(d, near_emb, 0.0) is d and contrast_direction(d, None, 0.5) is d
    pull = contrast_direction(d, near_emb, 0.7)
    by_hand = d - 0.7 * near_emb.mean(0)
    torch.testing.assert_close(pull, by_hand * d.norm() / by_hand.norm())  # turned, not shrunk
    torch.testing.assert_close(contrast_direction(d, itself, 0.5), d)  # contrast with itself: no turn
    with pytest.raises(UserError, match="the contrast captions cancel the prompt"):
        contrast_direction(d, itself, 1.0)

    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 3, h, w, torch.Generator().manual_seed(5))
    kw = dict(steps=8, lr=0.2, cutouts=4, progress=False)
    ids, _, scores = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator().manual_seed(0),
        contrast=near, contrast_weight=0.7, **kw,
    )  # fmt: skip
    with torch.no_grad():
        pulled = [pipe.clip.embed_images(pipe.decode(x)) @ pull for x in (ids, start)]
    assert (pulled[0] >= pulled[1] - 1e-5).all()  # never below its start by the contrasted objective
    torch.testing.assert_close(scores, pipe.clip.score(pipe.decode(ids), PROMPT), atol=1e-5, rtol=0)  # the prompt's
    plain, _, _ = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator().manual_seed(0), **kw
    )
    assert not torch.equal(ids, plain)  # the contrast moves refinement elsewhere


def test_contrast_captions_of_swap_phrases_and_their_errors(pipe, monkeypatch):
    with pytest.raises(UserError, match="'a smiling face' has no word a shapes caption can edit, .*weight to 0"):
        pipe.contrast_captions("a smiling face")
    with pytest.raises(UserError, match="--guided-contrast-weight is -1.0; use 0"):
        pipe.generate([PROMPT], method="clip-guided", guided_contrast_weight=-1.0, progress=False)
    with monkeypatch.context() as m, pytest.raises(UserError, match="'a smiling face' has no word"):
        m.setattr(pipe, "candidates", None)  # refused before the first prompt's candidates are sampled
        pipe.generate([PROMPT, "a smiling face"], method="clip-guided", guided_contrast_weight=0.5, progress=False)
    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 1, h, w)
    with pytest.raises(UserError, match="guided_contrast_weight' is -1; set it to 0"):
        refine(pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, steps=1, lr=0.1, cutouts=1, contrast_weight=-1)
    # on other data: the prompt's phrase of clip.swap_phrases swapped for each other one, in their order
    monkeypatch.setattr(pipe.cfg.data, "source", "some/folder")
    monkeypatch.setattr(pipe.cfg.clip, "swap_phrases", [", noto style", ", openmoji style", ", blob style"])
    assert pipe.contrast_captions("pizza, openmoji style") == ["pizza, noto style", "pizza, blob style"]
    with pytest.raises(UserError, match="'pizza' has none of the bundle's clip.swap_phrases"):
        pipe.contrast_captions("pizza")


def test_the_contrast_guard_never_returns_an_image_nearer_its_near_misses_than_its_start(pipe, monkeypatch):
    from dalle_mini_impl.pipeline.guided import prompt_direction

    near = pipe.contrast_captions(PROMPT)
    d, misses = prompt_direction(pipe.clip, [(PROMPT, 1.0)]), pipe.clip.embed_texts(near)

    def margin(ids):  # the prompt's similarity over the nearest contrast caption's
        with torch.no_grad():
            e = pipe.clip.embed_images(pipe.decode(ids))
        return e @ d - (e @ misses.T).amax(dim=-1)

    h, w = pipe.grid
    start = random_codes(pipe.image_tokenizer.codebook_size, 6, h, w, torch.Generator().manual_seed(5))
    kw = dict(steps=8, lr=0.2, cutouts=4, progress=False)
    guarded, _, _ = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator().manual_seed(0),
        contrast=near, contrast_guard=True, **kw,
    )  # fmt: skip
    plain, _, _ = refine(
        pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, generator=torch.Generator().manual_seed(0), **kw
    )
    assert (margin(guarded) >= margin(start) - 1e-5).all()
    assert (margin(plain) < margin(start) - 1e-5).any()  # unguarded, refinement does lose margin here
    with pytest.raises(UserError, match=r"the contrast guard \(sample.guided_contrast_guard\) compares .* got none"):
        refine(pipe.image_tokenizer, pipe.clip, [(PROMPT, 1.0)], start, contrast_guard=True, **kw)
    with monkeypatch.context() as m, pytest.raises(UserError, match="'a smiling face' has no word .*guard to false"):
        m.setattr(pipe, "candidates", None)  # refused before the first prompt's candidates are sampled
        pipe.generate([PROMPT, "a smiling face"], method="clip-guided", guided_contrast_guard=True, progress=False)
