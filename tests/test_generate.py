"""The sampler: cached == uncached tokens, guidance, top-k/top-p, priming, progressive rows, overfitting.

Tiny real models (dim 32, depth 2, a 4x4 grid, 6 text positions); run with `pytest tests/test_generate.py`.
"""

import pytest
import torch

from dalle_mini_impl.config import TransformerConfig
from dalle_mini_impl.model.generate import NonFiniteLogits, filter_logits, generate, sample_logits
from dalle_mini_impl.model.transformer import DALLE

PAD, BOS, EOS = 0, 1, 2
T, TV, IV, N = 6, 20, 16, 16


def make(seed=0, **kw) -> DALLE:
    cfg = dict(text_vocab=TV, image_vocab=IV, text_len=T, grid_h=4, grid_w=4, pad_id=PAD, dim=32, depth=2, heads=4)
    torch.manual_seed(seed)
    return DALLE(TransformerConfig(**{**cfg, **kw})).eval()


def captions(*words: list[int]) -> torch.Tensor:
    text = torch.full((len(words), T), PAD)
    for i, w in enumerate(words):
        text[i, : len(w) + 2] = torch.tensor([BOS, *w, EOS])
    return text


TEXT = captions([5, 6, 7], [8], [9, 10, 11, 12])
NULL = captions([])  # (1, T): the empty caption


pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = [
    dict(),
    dict(pos_2d="rope"),
    dict(text_pad="mask"),
    dict(attn_patterns=["row", "column", "conv"], conv_kernel=3, depth=3),
    dict(attn_patterns=["conv", "row"], pos_2d="rope", text_pad="mask", qk_norm=True),
    dict(image_factors=[2, 8]),  # product codes: 16 ids as pairs (a, b), a in [0, 2), b in [0, 8)
]
SAMPLING = [
    dict(),
    dict(guidance_scale=3.0, null_text=NULL),
    dict(top_k=4, temperature=0.7),
    dict(top_p=0.8, guidance_scale=2.0, null_text=NULL),
]


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_cached_static_and_uncached_decoding_give_the_same_tokens(kw, sampling):
    model = make(**kw)
    for seed in (0, 1):
        ids = [
            generate(model, TEXT, generator=torch.Generator().manual_seed(seed), decode=d, **sampling)
            for d in ("cached", "static", "uncached")
        ]
        assert ids[0].shape == (3, N) and ids[0].dtype == torch.long
        assert ids[0].min() >= 0 and ids[0].max() < IV
        assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])


def test_the_static_step_has_the_same_shapes_at_every_position():
    model = make(text_pad="mask", attn_patterns=["row", "full"])
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append((args[0].shape, args[2].shape)))
    generate(model, TEXT, generator=torch.Generator().manual_seed(0), decode="static")
    steps = seen[1:]  # after the prefill: one position, and the mask row over all L keys, every time
    assert len(steps) == N - 1 and set(steps) == {(torch.Size([3, 1, 32]), torch.Size([3, 1, 1, T + N - 1]))}
    with pytest.raises(ValueError, match="decode must be one of uncached, cached, static, compiled"):
        generate(model, TEXT, decode="graph")


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(text_pad="mask", pos_2d="rope"), dict(image_factors=[2, 8])])
@pytest.mark.parametrize("decode", ["cached", "static", "uncached"])
def test_guidance_until_guides_the_first_tokens_then_samples_unguided_from_them(kw, decode):
    model = make(**kw)
    guided = dict(null_text=NULL, guidance_scale=3.0, top_k=6, decode=decode)
    full = generate(model, TEXT, generator=torch.Generator().manual_seed(0), **guided)
    until_end = generate(model, TEXT, generator=torch.Generator().manual_seed(0), guidance_until=1.0, **guided)
    assert torch.equal(until_end, full)
    unguided = generate(model, TEXT, generator=torch.Generator().manual_seed(0), top_k=6, decode=decode)
    none = generate(model, TEXT, generator=torch.Generator().manual_seed(0), guidance_until=0.0, **guided)
    assert torch.equal(none, unguided) and not torch.equal(full, unguided)
    for until, stop in ((0.5, 8), (0.3, 5)):
        half = generate(model, TEXT, generator=torch.Generator().manual_seed(0), guidance_until=until, **guided)
        assert torch.equal(half[:, :stop], full[:, :stop])  # the same draws, the same guided logits
        g = torch.Generator().manual_seed(0)
        for _ in range(stop):  # the draws the guided tokens used: one per row and token
            torch.rand(len(TEXT), 1, generator=g)
        rest = generate(model, TEXT, generator=g, prime=half[:, :stop], top_k=6, decode=decode)
        assert torch.equal(half, rest)  # after `stop`, unguided sampling that continues the guided start


def test_guidance_until_drops_the_unconditional_rows():
    model = make()
    rows, image_logits = [], model.image_logits
    model.image_logits = lambda h: (rows.append(h.shape[0]), image_logits(h))[1]  # rows of every step's logits
    generate(model, TEXT, null_text=NULL, guidance_scale=3.0, guidance_until=0.25, generator=torch.Generator())
    assert rows == [6] * 4 + [3] * 12  # 2b rows for the first quarter of the 16 tokens, b after
    # a completion guides the first part of what it draws (once the kept tokens counted: a kept top half left
    # guidance_until 0.5 guiding nothing, silently)
    rows.clear()
    prime = torch.zeros(3, 8, dtype=torch.long)
    generate(
        model, TEXT, null_text=NULL, guidance_scale=3.0, guidance_until=0.5, prime=prime, generator=torch.Generator()
    )
    assert rows == [6] * 4 + [3] * 4  # 2b rows for the first half of the 8 drawn tokens
    with pytest.raises(ValueError, match="guidance_until must lie in \\[0, 1\\]"):
        generate(model, TEXT, null_text=NULL, guidance_scale=3.0, guidance_until=1.5)


def test_compiled_decoding_gives_the_cached_tokens_and_compiles_at_most_twice():
    from torch._dynamo.utils import counters

    model = make(pos_2d="rope", text_pad="mask", attn_patterns=["conv", "full"], qk_norm=True)
    counters.clear()
    for seed in (0, 1):
        kw = dict(null_text=NULL, guidance_scale=3.0, top_k=8, generator=torch.Generator().manual_seed(seed))
        expected = generate(model, TEXT, **kw | dict(generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(generate(model, TEXT, decode="compiled", **kw), expected)
    assert counters["stats"]["unique_graphs"] == 1  # the second call and every step reuse the first compile
    for rows in (2, 1):  # a second batch size compiles once more, with the batch symbolic; a third reuses it
        kw = dict(null_text=NULL, guidance_scale=3.0, top_k=8)
        expected = generate(model, TEXT[:rows], generator=torch.Generator().manual_seed(rows), **kw)
        got = generate(model, TEXT[:rows], generator=torch.Generator().manual_seed(rows), decode="compiled", **kw)
        assert torch.equal(got, expected)
    assert counters["stats"]["unique_graphs"] == 2


def test_the_cache_is_used_one_position_per_step():
    model = make()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    generate(model, TEXT, generator=torch.Generator().manual_seed(0))
    assert seen == [T] + [1] * (N - 1)  # prefill, then one position per token
    seen.clear()
    generate(model, TEXT, generator=torch.Generator().manual_seed(0), decode="uncached")
    assert seen == [T + i for i in range(N)]  # the reference recomputes the prefix


@pytest.mark.parametrize("kw", [dict(), dict(text_pad="mask", pos_2d="rope")])
def test_rows_with_the_same_prefix_prefill_it_once_and_sample_as_if_apart(kw):
    model = make(**kw)
    text = TEXT[[0, 1, 0, 0, 2, 1]]  # three prompts, two of them repeated: a prompt's candidates
    prefills = []  # (rows, positions) of every forward from position 0

    def watch(m: DALLE) -> None:
        def hook(_, args):
            if isinstance(args[1], int) and args[1] == 0:  # start: an int, or a tensor of per-row positions
                prefills.append(args[0].shape[:2])

        m.blocks[0].register_forward_pre_hook(hook)

    watch(model)
    sampling = dict(null_text=NULL, guidance_scale=3.0, top_k=6, guidance_until=0.5)
    for prime in (None, torch.randint(0, IV, (6, 5), generator=torch.Generator().manual_seed(1))[[0, 1, 0, 3, 4, 5]]):
        prefills.clear()
        ids = [
            generate(model, text, generator=torch.Generator().manual_seed(0), prime=prime, decode=d, **sampling)
            for d in ("cached", "uncached")  # the reference runs every row of every position
        ]
        assert torch.equal(ids[0], ids[1])
        # cached: 3 prompts and the empty caption once each; with primes, 5 distinct (prompt, prime) rows and
        # 5 distinct (empty caption, prime) ones; uncached: all 12 rows, every step
        want = [(4, T)] if prime is None else [(10, T + 5)]
        assert prefills[:1] == want and prefills[1][0] == 12
    # speculative decoding shares its prefill too, and greedy it gives the plain sampler's tokens
    wide = make(**kw).double()
    watch(wide)
    greedy = dict(null_text=NULL, guidance_scale=3.0, top_k=1)
    plain = generate(wide, text, generator=torch.Generator().manual_seed(0), **greedy)
    prefills.clear()
    spec = generate(wide, text, generator=torch.Generator().manual_seed(0), decode="speculative", window=4, **greedy)
    assert torch.equal(spec, plain) and prefills == [(4, T - 1)]  # it feeds the last text position itself


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    model = make()
    a, b, c = (generate(model, TEXT, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_leaves_the_callers_tensors_and_model_mode_alone():
    model = make(text_pad="mask").train()
    text, null, prime = TEXT.clone(), NULL.clone(), torch.randint(0, IV, (3, 5))
    prime_copy = prime.clone()
    generate(model, text, null_text=null, guidance_scale=3.0, prime=prime, generator=torch.Generator().manual_seed(0))
    assert torch.equal(text, TEXT) and torch.equal(null, NULL) and torch.equal(prime, prime_copy)
    assert model.training  # put back in train mode


def test_guidance_changes_the_samples_and_needs_an_empty_caption():
    model = make(seed=3)
    a = generate(model, TEXT, generator=torch.Generator().manual_seed(0))
    # a fresh model barely tells captions apart, so it takes a large scale to move the samples
    b = generate(model, TEXT, null_text=NULL, guidance_scale=100.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="null_text"):
        generate(model, TEXT, guidance_scale=3.0)


@pytest.mark.parametrize("decode", ["cached", "static", "uncached", "speculative"])
def test_logits_that_are_not_finite_are_one_sentence_not_the_last_id(decode):
    """NaN logits (a diverged model's, or guidance overflowing float32) make no distribution: the inverse CDF drew
    the vocabulary's last id for every cell, and the speculative test accepted every draft."""
    model = make(seed=3)
    kw = dict(decode=decode, window=4 if decode == "speculative" else 0)
    g = torch.Generator().manual_seed(0)
    assert generate(model, TEXT, null_text=NULL, guidance_scale=1e20, generator=g, **kw).max() < IV
    with torch.no_grad():
        model.head.weight.mul_(1e4)  # logits far apart enough that the guided ones pass float32's largest
    with pytest.raises(NonFiniteLogits, match="logits are not finite .* or the guidance scale 1e\\+38 overflowed"):
        generate(model, TEXT, null_text=NULL, guidance_scale=1e38, generator=g, **kw)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")  # every logit NaN
    with pytest.raises(NonFiniteLogits, match="its weights diverged in training; retrain it at a lower learning rate$"):
        generate(model, TEXT, generator=g, **kw)


@pytest.mark.parametrize("decode", ["cached", "static", "uncached"])
def test_priming_keeps_the_given_tokens(decode):
    model = make()
    prime = torch.randint(0, IV, (3, 6), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(0)
    ids = generate(model, TEXT, prime=prime, generator=g, decode=decode)
    assert torch.equal(ids[:, :6], prime)
    full = torch.randint(0, IV, (3, N))
    assert torch.equal(generate(model, TEXT, prime=full), full)


def test_on_row_reports_every_finished_row_in_order():
    model = make()
    calls = []
    prime = torch.randint(0, IV, (3, 5))  # row 0 complete, row 1 started
    ids = generate(
        model, TEXT, prime=prime, on_row=lambda r, x: calls.append((r, x)), generator=torch.Generator().manual_seed(0)
    )
    assert [r for r, _ in calls] == [0, 1, 2, 3]
    for r, x in calls:
        assert torch.equal(x, ids[:, : 4 * (r + 1)])


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]
    assert torch.equal(filter_logits(logits), logits)
    # ties at the k-th value (bf16's rounding makes them common): exactly k stay, so top_k=1 is greedy (once a tie
    # kept both, and the seed chose between them)
    tied = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0]])
    for k in (1, 2):
        kept = torch.isfinite(filter_logits(tied, top_k=k))
        assert kept.sum(dim=-1).tolist() == [k, k] and not kept[0, 0] and not kept[0, 4]
    draws = {int(sample_logits(tied[:1], top_k=1, generator=torch.Generator().manual_seed(s))) for s in range(20)}
    assert len(draws) == 1


def test_sample_logits_follows_the_softmax():
    logits = torch.log(torch.tensor([0.25, 0.75])).expand(20000, 2)
    ids = sample_logits(logits, generator=torch.Generator().manual_seed(0))
    assert abs(ids.float().mean().item() - 0.75) < 0.015
    hot = sample_logits(logits, temperature=0.1, generator=torch.Generator().manual_seed(0))
    assert hot.float().mean().item() > 0.99


def test_a_temperature_too_small_to_compute_is_refused():
    """Once: logits / 1e-40 overflowed float32, the softmax was NaN, and every token was the last id."""
    model = make()
    with pytest.raises(ValueError, match="temperature must be at least 1e-06 \\(use top_k=1 for greedy"):
        generate(model, TEXT, temperature=1e-40)
    with pytest.raises(ValueError, match="temperature must be at least"):
        generate(model, TEXT, temperature=float("nan"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(
        generate(model, TEXT, temperature=1e-6, generator=g()), generate(model, TEXT, top_k=1, generator=g())
    )


def test_ids_outside_the_vocabularies_and_a_fractional_top_k_are_one_sentence():
    """Once an IndexError from the embedding (a text id >= text_vocab) or from torch.topk (top_k=2.5)."""
    model = make()
    null = torch.zeros(1, TEXT.shape[1], dtype=torch.long)
    for kwargs, says in [
        (
            {"text": TEXT + model.cfg.text_vocab},
            f"text ids must be a LongTensor of ids in \\[0, {model.cfg.text_vocab}\\)",
        ),
        ({"text": TEXT, "null_text": null - 1, "guidance_scale": 2.0}, "null_text ids must be"),
        (
            {"text": TEXT, "prime": torch.full((TEXT.shape[0], 2), IV)},
            f"prime ids must be a LongTensor of ids in \\[0, {IV}\\)",
        ),
        ({"text": TEXT, "top_k": 2.5}, "top_k must be an integer >= 0 .* got top_k=2.5"),
        ({"text": TEXT, "top_k": True}, "top_k must be an integer"),
    ]:
        text = kwargs.pop("text")
        with pytest.raises(ValueError, match=says):
            generate(model, text, **kwargs)
    import numpy as np

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(
        generate(model, TEXT, top_k=np.int64(3), generator=g()), generate(model, TEXT, top_k=3, generator=g())
    )


def test_a_model_that_memorised_four_pairs_regenerates_them_greedily():
    model = make(seed=0, dim=64, heads=4, text_loss_weight=0.1).train()
    text = captions([5, 6], [7, 8, 9], [10], [11, 12, 13, 14])
    image = torch.randint(0, IV, (4, N), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    for _ in range(200):
        loss, parts = model.loss(text, image)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["image_loss"] < 0.02
    ids = generate(model, text, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, image)


def test_a_bfloat16_model_decodes_with_a_bfloat16_cache():
    model = make(pos_2d="rope", text_pad="mask").to(torch.bfloat16)
    assert model.new_cache(2)[0].k.dtype == torch.bfloat16
    ids = generate(
        model, TEXT, null_text=NULL, guidance_scale=3.0, top_p=0.9, generator=torch.Generator().manual_seed(0)
    )
    assert ids.shape == (3, N) and ids.min() >= 0 and ids.max() < IV


def test_decoding_under_autocast_keeps_the_cache_in_the_autocast_dtype():
    model = make(attn_patterns=["row", "full"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_cache(2)[0].k.dtype == torch.bfloat16
        ids = generate(model, TEXT, null_text=NULL, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, N) and ids.min() >= 0 and ids.max() < IV
