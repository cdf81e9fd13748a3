"""Speculative Jacobi decoding: the plain sampler's tokens under greedy decoding, its distribution under sampling.

Greedy (top_k=1) speculative decoding must give exactly the cached sampler's tokens for every model variant,
with and without guidance, at batches whose rows accept different numbers of drafts (float64, so that no
near-tie flips between a one-position and a window pass). Under sampling it draws other random numbers, so
the check is on distributions: on tiny models whose whole image sequences can be enumerated (3 codes on a
2x2 grid: 81 sequences; product codes 2x2 on a 3x1 grid: 64), the frequencies of 16,000 speculative samples
must match the exact joint distribution within a total-variation bound that the plain sampler meets and a
wrong acceptance rule fails by far (measured: 0.10-0.86 for accept-always, ratio without q, residual = p, or
a q not updated after the Jacobi step; for the coupled redraft, 0.21 when every later draft is kept untested
and 0.12 when q is not updated; 0.01-0.03 for the right rule), with the Jacobi step's redrafts coupled to the
old drafts (MC-SJD) and drawn afresh (SJD). The "above" drafts are one-hot copies of the cell above,
the adversarial case. Run with `pytest tests/test_speculative.py`.
"""

import itertools

import pytest
import torch

from dalle_mini_impl.config import TransformerConfig
from dalle_mini_impl.model.generate import MAX_WINDOW, _new_drafts, final_probs, generate, window_width
from dalle_mini_impl.model.transformer import DALLE
from tests.test_generate import IV, NULL, TEXT, VARIANTS, make

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = [
    dict(),
    dict(guidance_scale=3.0, null_text=NULL),
    dict(guidance_scale=2.0, null_text=NULL, guidance_until=0.5),
]


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("sampling", GREEDY)
def test_greedy_speculative_decoding_gives_the_cached_tokens(kw, sampling):
    model = make(**kw).double()
    expected = generate(model, TEXT, top_k=1, **sampling)
    runs = (
        (2, "above", "coupled"),
        (5, "random", "coupled"),
        (MAX_WINDOW, "above", "coupled"),
        (5, "above", "independent"),
    )
    for window, draft, redraft in runs:  # 5 and 16: wider than a row
        stats = {}
        g = torch.Generator().manual_seed(window)
        got = generate(
            model, TEXT, top_k=1, decode="speculative", window=window, draft=draft, redraft=redraft, generator=g,
            stats=stats, **sampling,
        )  # fmt: skip
        assert torch.equal(got, expected), (window, draft, redraft)
        assert 1 < stats["passes"] <= TEXT.shape[1] + 1 + 16


@pytest.mark.parametrize("kw", VARIANTS)
def test_transform_rows_gives_every_row_its_own_positions_hidden_states(kw):
    # the whole sequence in one forward, then each row's window re-fed at its own positions from the cache
    model = make(**kw).double()
    image = torch.randint(0, IV, (3, 16), generator=torch.Generator().manual_seed(1))
    x = model.embed(TEXT, image[:, :-1])  # (3, t + 15, d)
    masks = model.attn_masks(TEXT)
    cache = model.new_cache(3)
    with torch.no_grad():
        full = model.transform(x, 0, masks, cache)
        pos = torch.tensor([9, 13, 6])[:, None] + torch.arange(5)  # rows at different positions
        rows = model.transform_rows(x[torch.arange(3)[:, None], pos], pos, masks, cache)
    torch.testing.assert_close(rows, full[torch.arange(3)[:, None], pos])


def test_greedy_speculative_decoding_takes_fewer_passes_than_tokens():
    model = make().double()
    stats = {}
    generate(model, TEXT, top_k=1, decode="speculative", window=8, stats=stats)
    assert stats["passes"] < 16  # the prefill plus fewer window passes than the 16 tokens plain decoding needs


def enumerable_model(factors: list[int], grid: tuple[int, int], seed: int = 0) -> DALLE:
    """A model whose weights are scaled up so that its distributions are far from uniform and from one-hot."""
    k = 1
    for f in factors:
        k *= f
    cfg = dict(text_vocab=10, image_vocab=k, image_factors=factors, text_len=3, grid_h=grid[0], grid_w=grid[1])
    torch.manual_seed(seed)
    model = DALLE(TransformerConfig(**cfg, pad_id=0, dim=32, depth=2, heads=2)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def joint(model: DALLE, text, null, scale: float, temperature: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image sequence (S, n) and its exact probability under the sampler's (guided, filtered) rule."""
    c = model.cfg
    seqs = torch.tensor(list(itertools.product(range(c.image_vocab), repeat=c.image_len)))

    def logits(t):
        with torch.no_grad():  # positions t - 1 .. t + n - 2 predict cells 0 .. n - 1
            h = model.transform(model.embed(t.expand(len(seqs), -1), seqs[:, :-1]))
            return model.image_logits(h[:, c.text_len - 1 :])

    mixed = logits(text) if scale == 1.0 else logits(null) + scale * (logits(text) - logits(null))
    p = final_probs(mixed.reshape(-1, c.image_vocab), temperature, top_k).view(len(seqs), c.image_len, -1)
    return seqs, p.gather(-1, seqs[..., None]).squeeze(-1).prod(dim=-1)


def total_variation(ids: torch.Tensor, seqs: torch.Tensor, probs: torch.Tensor, k: int) -> float:
    weights = k ** torch.arange(ids.shape[1] - 1, -1, -1)
    counts = torch.bincount((ids * weights).sum(-1), minlength=len(seqs)).double()
    order = (seqs * weights).sum(-1)  # itertools.product is already in this order; index anyway
    return 0.5 * (counts[order] / len(ids) - probs).abs().sum().item()


@pytest.mark.parametrize(
    "factors, grid, sampling",
    [
        ([3], (2, 2), dict(scale=1.0, temperature=1.0, top_k=0)),
        ([3], (2, 2), dict(scale=2.0, temperature=0.8, top_k=2)),
        ([2, 2], (3, 1), dict(scale=1.5, temperature=0.9, top_k=0)),  # product codes; "above" = the cell before
    ],
)
def test_speculative_samples_follow_the_exact_joint_distribution(factors, grid, sampling):
    model = enumerable_model(factors, grid)
    text, null = torch.tensor([[1, 4, 2]]), torch.tensor([[1, 2, 0]])
    seqs, probs = joint(model, text, null, sampling["scale"], sampling["temperature"], sampling["top_k"])
    assert probs.max() < 0.5 and abs(probs.sum().item() - 1) < 1e-5  # not degenerate; sums to 1
    k, rows = model.cfg.image_vocab, 16_000
    kw = dict(
        null_text=null, guidance_scale=sampling["scale"], temperature=sampling["temperature"], top_k=sampling["top_k"]
    )
    runs = (
        ("cached", "above", "coupled"),
        ("speculative", "above", "coupled"),
        ("speculative", "random", "coupled"),
        ("speculative", "above", "independent"),
    )
    for decode, draft, redraft in runs:
        g = torch.Generator().manual_seed(3)
        ids = generate(
            model, text.expand(rows, -1), decode=decode, window=4, draft=draft, redraft=redraft, generator=g, **kw
        )
        assert total_variation(ids, seqs, probs, k) < 0.05, (decode, draft, redraft)


def test_relaxed_speculative_decoding_stays_within_its_total_variation_budget():
    model = enumerable_model([3], (2, 2))
    text = torch.tensor([[1, 4, 2]])
    seqs, probs = joint(model, text, None, 1.0, 1.0, 0)
    near = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0]])  # each code's neighbours, itself first

    def sample(rows: int, relax: float, neighbours=near) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        kw = dict(decode="speculative", window=4, generator=g)
        return generate(model, text.expand(rows, -1), relax=relax, neighbours=neighbours, **kw)

    assert torch.equal(sample(2_000, 0.0), sample(2_000, 0.0, None))  # relax 0 is the exact rule
    tv = {relax: total_variation(sample(16_000, relax), seqs, probs, 3) for relax in (0.0, 0.3)}
    # each of the 4 tokens is drawn within 0.3 of its distribution: the joint within 4 x 0.3 (measured 0.17,
    # against 0.02 for the exact rule, whose frequencies differ from the joint by sampling noise alone)
    assert tv[0.0] < 0.05 and 0.1 < tv[0.3] < 4 * 0.3


def test_relax_one_accepts_every_draft():
    # with every code a neighbour and all of p's mass allowed, each draft's group holds all the mass, so the
    # drafts are kept: random ones in the first grid row, copies of the cell above below it
    model = make()
    near = torch.stack([torch.arange(IV).roll(-code) for code in range(IV)])  # row c: c, c + 1, ..., itself first
    g = torch.Generator().manual_seed(0)
    ids = generate(model, TEXT, decode="speculative", window=8, relax=1.5, neighbours=near, generator=g)
    assert torch.equal(ids[:, 4:], ids[:, :-4])  # a 4 x 4 grid: every row repeats the one above


def test_speculative_decoding_keeps_primed_tokens_and_reports_rows_in_order():
    model = make()
    prime = torch.randint(0, IV, (3, 5), generator=torch.Generator().manual_seed(5))  # row 0 and one cell
    calls = []
    g = torch.Generator().manual_seed(0)
    ids = generate(
        model, TEXT, prime=prime, decode="speculative", window=6, generator=g, on_row=lambda r, x: calls.append((r, x))
    )
    assert torch.equal(ids[:, :5], prime)
    assert [r for r, _ in calls] == [0, 1, 2, 3]
    for r, x in calls:
        assert torch.equal(x, ids[:, : 4 * (r + 1)])
    full = torch.randint(0, IV, (3, 16))
    assert torch.equal(generate(model, TEXT, prime=full, decode="speculative", window=4), full)


def test_a_bfloat16_model_decodes_speculatively_with_the_window_its_batch_allows():
    model = make().to(torch.bfloat16)
    stats = {}
    ids = generate(model, TEXT, temperature=0.7, decode="speculative", generator=torch.Generator(), stats=stats)
    assert ids.shape == (3, 16) and 0 <= int(ids.min()) and int(ids.max()) < IV
    assert stats["passes"] < 16 and stats["window"] == 10  # a window of 32 // 3 = 10 cells on the CPU in bf16


def test_the_window_falls_back_to_plain_decoding_where_wide_passes_do_not_pay():
    cpu = torch.device("cpu")
    assert window_width(1, cpu, torch.float32) == 1  # fp32 on the CPU: a wider pass costs about its width
    assert window_width(1, cpu, torch.bfloat16) == MAX_WINDOW
    assert window_width(4, cpu, torch.bfloat16) == 8
    assert window_width(5, cpu, torch.bfloat16) == 1  # 6 cells would not pay for their pass
    assert window_width(64, cpu, torch.float32, window=3) == 3  # an explicit window is kept
    model = make()
    stats = {}
    generate(model, TEXT, decode="speculative", generator=torch.Generator().manual_seed(0), stats=stats)
    assert stats["passes"] == 16 and stats["window"] == 1 and stats["rows"] == 3  # plain: one pass per token
    expected = generate(model, TEXT, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        generate(model, TEXT, decode="speculative", generator=torch.Generator().manual_seed(0)), expected
    )


def test_an_empty_batch_gives_no_images():
    assert generate(make(), TEXT[:0], decode="speculative", window=4).shape == (0, 16)


def test_bad_window_or_draft_is_refused():
    with pytest.raises(ValueError, match="window must be >= 0"):
        generate(make(), TEXT, decode="speculative", window=-1)
    with pytest.raises(ValueError, match="draft one of"):
        generate(make(), TEXT, decode="speculative", draft="left")
    with pytest.raises(ValueError, match="redraft one of"):
        generate(make(), TEXT, decode="speculative", redraft="fresh")
    with pytest.raises(ValueError, match=r"above 0 needs neighbours \(\d+, k\)"):
        generate(make(), TEXT, decode="speculative", relax=0.2)
    with pytest.raises(ValueError, match="relax must be >= 0"):
        generate(make(), TEXT, decode="speculative", relax=-0.1)


@pytest.mark.parametrize("draft", ["above", "random"])
def test_new_drafts_copy_the_cell_above_one_hot_or_draw_uniformly(draft):
    # a 4-wide grid: the window holds cells 2 .. 7, of which 2, 3 (first row) and 6 are fresh
    out = torch.tensor([[5, 9, 1, 1, 1, 1, 1, 1]])
    cells = torch.arange(2, 8)[None]
    fresh = torch.tensor([[True, True, False, False, True, False]])
    q = _new_drafts(out, cells, fresh, draft, 4, 12, torch.Generator().manual_seed(0))
    assert q.shape == (1, 6, 12) and torch.allclose(q.sum(-1), torch.ones(1, 6))
    assert torch.equal(q[0, :2], torch.full((2, 12), 1 / 12))  # nothing above the first row: uniform
    assert out[0, 4] == 1 and out[0, 5] == 1  # cells that are not fresh keep their drafts
    if draft == "above":
        # cell 6 copies cell 2's id as this call drafted it, one-hot
        assert out[0, 6] == out[0, 2] and torch.equal(q[0, 4], torch.eye(12)[int(out[0, 2])])
    else:
        assert torch.equal(q[0, 4], torch.full((12,), 1 / 12))
