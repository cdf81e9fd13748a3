"""Sampling image token ids from a DALLE transformer: static KV cache, batched guidance, top-k/top-p.

After LlamaGen (Sun et al. 2024) and min-dalle: the text (and any primed image tokens) go through the
model in one prefill forward that fills a preallocated key/value cache; then each image token costs one
single-position forward whose keys and values are written in place at their position (no growing
tensors, masks precomputed once and sliced); rows with the same prefix (a prompt's candidates, the
unconditional rows) prefill it once and copy its keys and values, as parallel sampling shares a prompt's
cache in LLM servers (vLLM). Classifier-free guidance (Ho & Salimans 2022) runs the
conditional and unconditional rows as one batch of 2b and mixes logits as u + scale * (c - u). With
`guidance_until` < 1 only the first part of the image is guided: at the first unguided token the
unconditional rows leave the batch (their cache rows are dropped), so the rest costs what unguided
sampling costs.

Sampling draws one uniform number per row and token from the caller's `torch.Generator` (inverse-CDF
sampling), the same draws in every decoding mode, so every mode gives the same tokens for the same seed in
float32; `decode="uncached"`, which recomputes the whole prefix every step, is the reference the others are
tested against. In bf16 the modes round their different sums differently, so a near-tie of two codes can fall
either way and the tokens part there (a few cells in a hundred on the shapes bundle); each mode alone is still
repeatable.

`decode="speculative"` is speculative Jacobi decoding (Teng et al. 2025, "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding"): one forward pass feeds the last
accepted token and a window of drafted ones, which gives the model's distribution p at every cell of the
window at once. Each draft d, drawn from a distribution q, is accepted with probability min(1, p(d) / q(d)),
in order; the first one refused is redrawn from the residual max(0, p - q) (normalised) and the cells after it
are redrafted from this pass's p (the Jacobi step: a guess conditioned on the refused draft, verified next
pass). The redraft is coupled to the old draft (So et al. 2025, MC-SJD): a cell keeps its draft if its own
test min(1, p / q) passes and is drawn from its residual if not, a maximal coupling whose draws still follow
p, so that a window's drafts stay put between passes and more of them are accepted next time
(`redraft="independent"` draws from p afresh, as SJD does). That is speculative sampling's rule (Leviathan et
al. 2023; Chen et al. 2023), so every token has exactly the plain sampler's distribution whatever the drafts,
and at least one token is accepted per pass. Cells that no pass has reached yet are drafted from the row above
(one-hot q) or at random (uniform q). It draws other random numbers than the plain sampler, so the same seed
gives other (equally distributed) images; with top_k=1 it gives the plain sampler's tokens in exact arithmetic
(float64 in the tests; in bf16 a window pass and a one-token pass can round a near-tie differently). Every row
of a batch has its own window at its own positions (`DALLE.transform_rows`), so a row that accepted more is
not held back by one that accepted less; the window narrows as the batch grows (a pass over rows x window
positions costs about its size once it is compute-bound; `window_width`) and at one cell it is plain cached
decoding.

`relax` > 0 trades that exactness for fewer passes, as LANTERN does (Jang et al., ICLR 2025, "Accelerating
Visual Autoregressive Models with Relaxed Speculative Decoding"): an image model spreads its probability over
codes that look alike, so a draft is tested as its group A, itself and its nearest codes in the image
tokenizer's latent space (`neighbours`, nearest first) as long as their probability under p, the draft's own
left out, sums to at most `relax`: accepted with probability min(1, p(A) / q(A)), and if refused redrawn from
the residual outside A. A group's mass goes to whichever of its codes was drafted, so each token is drawn
within about `relax` of p in total variation (LANTERN's bound); at 0 the rule above, exactly.

Usage:
    from dalle_mini_impl.model.generate import generate
    g = torch.Generator().manual_seed(0)
    ids = generate(model, text, null_text=empty, guidance_scale=3.0, top_k=64, generator=g)  # (b, n)
    images = vae.decode(ids.reshape(-1, model.cfg.grid_h, model.cfg.grid_w))
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator

import torch

from ..errors import UserError
from .transformer import DALLE, KVCache

DECODE_MODES = ("uncached", "cached", "static", "compiled", "speculative")
DRAFTS = ("above", "random")  # how speculative decoding drafts a cell no pass has reached yet
REDRAFTS = ("coupled", "independent")  # how its Jacobi step redrafts the cells after a refused one
# Speculative decoding's window: the widest with rows x window <= the budget of positions per pass (the model
# rows: twice the batch under guidance), at most MAX_WINDOW cells; narrower than MIN_WINDOW it decodes plainly.
# The budget is where a pass stays bound by its fixed cost rather than arithmetic, measured with
# `python -m dalle_mini_impl.bench --only sample` (docs/RESULTS.md): on this project's 2-core CPU a bf16
# pass (AMX) over 32 positions costs 1.3-1.6x a pass over one, an fp32 pass over 8 already 2-3x, so fp32 on
# the CPU decodes plainly. Windows of 4 cells (8 rows) ran the emoji bundle slower than plain decoding (its
# drafts pass less often), so 8 is the narrowest. The GPU budget is not measured yet (no GPU was lent): eager
# decoding of models this size is bound by kernel launches there up to thousands of positions per pass.
MAX_WINDOW, MIN_WINDOW = 16, 8
MIN_TEMPERATURE = 1e-6
WINDOW_TOKENS_CPU = {torch.bfloat16: 32}  # any other dtype: 0, plain decoding
WINDOW_TOKENS_GPU = 256


def guided_stop(first: int, end: int, guidance_until: float) -> int:
    """The cell after the last guided one when cells first .. end - 1 are drawn: the first guidance_until of
    them (a completion's or an edit's first drawn cells decide what it draws, as an image's first cells do)."""
    return first + round(guidance_until * (end - first))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (b, k) with -inf outside the top_k ids (0: off) and outside the top_p nucleus (1: off). Exactly
    top_k ids stay: of ids tied at the k-th value (common in bf16), those topk returns first."""
    if 0 < top_k < logits.shape[-1]:
        kept = logits.topk(top_k, dim=-1).indices
        logits = torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an id once the ids ranked above it already hold top_p of the mass; the first always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One id per row of logits (b, k) -> (b,), drawn from softmax(filtered logits / temperature).

    Inverse-CDF sampling with one uniform number per row: a (b, k) draw of Gumbel or exponential noise
    would cost more than the whole tiny-model step on a CPU.
    """
    return draw(final_probs(logits, temperature, top_k, top_p), generator)


def final_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a sampler draws from: softmax(filtered logits / temperature), (b, k) float32."""
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One id per row of probs (b, k) -> (b,), by inverse CDF from one uniform number per row (`u` (b, 1), drawn
    from `generator` when not given).

    The weights need not sum to 1 (a residual distribution of speculative decoding does not).
    """
    cdf = probs.cumsum(dim=-1)  # (b, k)
    if u is None:
        device = generator.device if generator is not None else probs.device
        u = torch.rand(probs.shape[0], 1, generator=generator, device=device)  # (b, 1)
    # the first id whose cdf exceeds u * total: never an id of probability 0, whose cdf step is flat
    ids = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True)  # (b, 1)
    return ids.clamp_(max=probs.shape[-1] - 1).squeeze(1)


def _uniforms(generator: torch.Generator | None, b: int, cells: int, device: torch.device) -> Iterator | None:
    """The uniform numbers `draw` takes for `cells` steps of b rows, drawn at once from a generator on another
    device than the rows (a CPU generator for GPU sampling) and moved in one copy: drawn a step at a time, each
    copy from the CPU waited for the GPU to finish the step before the next could be queued. The same numbers
    as a step at a time (the generator's stream is consumed in the same order); None where the generator is on
    the rows' device, which draws as it goes."""
    if generator is None or generator.device == device:
        return None
    return iter(torch.rand(cells, b, 1, generator=generator, device=generator.device).to(device))


def _pair(ids: torch.Tensor, guided: bool) -> torch.Tensor:
    """The image ids for the conditional rows and, under guidance, again for the unconditional ones."""
    return torch.cat([ids, ids]) if guided else ids


def _guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided logits of the conditional rows from (2b, ...) logits, conditional rows first: u + scale * (c - u)."""
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


def _drop_unconditional(b: int, masks: list, cache: list | None = None) -> None:
    """Keep the first b (conditional) rows of the masks and of the cache, in place: the decoding step reads both."""
    masks[:] = [m if m is None or m.shape[0] == 1 else m[:b] for m in masks]
    for layer in cache or []:
        layer.k, layer.v = layer.k[:b], layer.v[:b]


def _distinct_rows(key: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For the rows of key (B, m): (first, inverse) on `device`, one row index per distinct row and each row's
    distinct row, or None when no two rows are equal."""
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == key.shape[0]:
        return None
    rows = torch.arange(key.shape[0], device=key.device)
    first = torch.full((distinct.shape[0],), key.shape[0], device=key.device)
    return first.scatter_reduce_(0, inverse, rows, "amin").to(device), inverse.to(device)


def _prefill(model: DALLE, x: torch.Tensor, masks: list, cache: list, shared) -> torch.Tensor:
    """`model.transform(x, 0, masks, cache)` that runs each distinct row of x (B, s, d) once.

    `shared` is `_distinct_rows` of the rows' inputs (None: all differ). The candidates of one prompt, and
    the unconditional rows of every prompt, start from the same prefix: its keys and values are computed
    for one row and copied into the others' cache rows, and its hidden states are repeated.
    """
    if shared is None:
        return model.transform(x, 0, masks, cache)
    first, inverse = shared
    s = x.shape[1]
    part = [
        KVCache(*(t.new_empty(len(first), t.shape[1], s, t.shape[3]) for t in (layer.k, layer.v))) for layer in cache
    ]
    h = model.transform(x[first], 0, [m if m is None or m.shape[0] == 1 else m[first] for m in masks], part)
    for layer, small in zip(cache, part):
        layer.k[:, :, :s] = small.k[inverse]
        layer.v[:, :, :s] = small.v[inverse]
    return h[inverse]


def _with_image(model: DALLE, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The embedded prefix (B, P, d) followed by the embedded image ids of cells 0 .. m - 1 (B, m)."""
    return torch.cat([prefix, model.embed_image(ids)], dim=1)


def _cached_logits(
    model: DALLE, prefix: torch.Tensor, out: torch.Tensor, k: int, masks: list, stop: int, decode: str, shared
) -> Iterator[torch.Tensor]:
    """Image logits predicting token i for i = k .. n-1; reads out[:, i - 1] when resumed for token i.

    One prefill of the embedded prefix (B, P, d) and the primed cells fills the cache (`_prefill`, with
    `shared`), then one cached step per token, run as `decode` says (`_decode_step`). Rows are guided (2b:
    conditional, then unconditional) for tokens k .. stop - 1, and b after.
    """
    n, b = model.cfg.image_len, out.shape[0]
    guided = stop > k
    cache = model.new_cache(prefix.shape[0])
    step = _decode_step(model, decode, masks, cache)
    h = _prefill(model, _with_image(model, prefix, _pair(out[:, :k], guided)), masks, cache, shared)  # (B, P + k, d)
    yield model.image_logits(h[:, -1])  # (B, k_image)
    for i in range(k + 1, n):
        if guided and i == stop:
            _drop_unconditional(b, masks, cache)
            guided = False
        yield step(_pair(out[:, i - 1 : i], guided), i - 1)


def _decode_step(model: DALLE, decode: str, masks: list, cache: list) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A function (ids (B, 1) fed at grid cell c) -> image logits (B, k_image) predicting cell c + 1.

    "cached": one position attending to the positions so far; "static": `DALLE.decode_step`, whose
    shapes never change; "compiled": that step under torch.compile.
    """
    if decode == "cached":
        t = model.cfg.prefix_len

        def step(ids: torch.Tensor, c: int) -> torch.Tensor:
            h = model.transform(model.embed_image(ids, c), t + c, masks, cache)  # (B, 1, d) at position t + c
            return model.image_logits(h[:, -1])

        return step
    fixed = model.decode_step
    if decode == "compiled":
        fixed = compiled_step(model)
    marked: set[int] = set()
    cell = torch.zeros(1, dtype=torch.long, device=cache[0].k.device)

    def static_step(ids: torch.Tensor, c: int) -> torch.Tensor:
        if decode == "compiled" and ids.shape[0] not in marked:  # and again once guidance stops: new views
            marked.add(ids.shape[0])
            # fixed addresses: a CUDA graph replays them, and the step writes them in place. Unguarded, as newer
            # torch has it by default: a guard (older torch's default) recompiled for each call's new cache and
            # kept every one alive
            for layer in cache:
                torch._dynamo.mark_static_address(layer.k, guard=False)
                torch._dynamo.mark_static_address(layer.v, guard=False)
        cell.fill_(c)
        return fixed(ids, cell, masks, cache).clone()  # a CUDA graph's output is overwritten by its next replay

    return static_step


def compiled_step(model: DALLE) -> Callable:
    """`model.decode_step` under torch.compile, built once per model; CUDA graphs on GPUs (reduce-overhead)."""
    step = getattr(model, "_compiled_decode_step", None)
    if step is None:
        mode = "reduce-overhead" if model.head.weight.is_cuda else None
        # default dynamic: the first batch size compiles static, a second one recompiles with the batch
        # dimension symbolic, and every later size reuses that (CUDA graphs are still captured per size)
        step = torch.compile(model.decode_step, mode=mode, fullgraph=True)
        model._compiled_decode_step = step
    return step


def _uncached_logits(
    model: DALLE, prefix: torch.Tensor, out: torch.Tensor, k: int, masks: list, stop: int
) -> Iterator[torch.Tensor]:
    """The same logits as `_cached_logits`, each from a forward over the whole sequence so far."""
    b = out.shape[0]
    for i in range(k, model.cfg.image_len):
        guided = i < stop
        if i == stop and stop > k:
            prefix = prefix[:b]
            _drop_unconditional(b, masks)
        h = model.transform(_with_image(model, prefix, _pair(out[:, :i], guided)), 0, masks)  # (B, P + i, d)
        yield model.image_logits(h[:, -1])


def window_width(rows: int, device: torch.device, dtype: torch.dtype, window: int = 0, cells: int = MAX_WINDOW) -> int:
    """Speculative decoding's window in cells for a pass over `rows` model rows of weights in `dtype` on
    `device`, with `cells` left to draw: `window` if given (> 0), else by the budget above; never more than
    `cells`; 1 means plain decoding."""
    if window > 0:
        return max(1, min(window, cells))
    budget = WINDOW_TOKENS_CPU.get(dtype, 0) if device.type == "cpu" else WINDOW_TOKENS_GPU
    width = min(MAX_WINDOW, budget // rows, cells)
    return width if width >= MIN_WINDOW else 1


def _new_drafts(
    out: torch.Tensor, cells: torch.Tensor, fresh: torch.Tensor, draft: str, w: int, k_image: int, generator
) -> torch.Tensor:
    """Draft the `fresh` (b, W) of each row's window cells (b, W) into out; returns the distributions they
    came from, (b, W, K) (rows of cells that are not fresh are meaningless).

    "above": the id of the cell above (itself accepted or drafted), one-hot; cells of the first grid row,
    and every cell under "random", a uniformly drawn id.
    """
    gen_device = generator.device if generator is not None else out.device
    drawn = torch.randint(k_image, cells.shape, generator=generator, device=gen_device).to(out.device)
    above = fresh & (cells >= w) if draft == "above" else torch.zeros_like(fresh)
    for _ in range(-(-cells.shape[1] // w)):  # a window wider than a grid row reads cells it drafts itself
        ids = torch.where(above, out.gather(1, (cells - w).clamp(min=0)), drawn)
        out.scatter_(1, cells, torch.where(fresh, ids, out.gather(1, cells)))
    q = torch.full((*cells.shape, k_image), 1.0 / k_image, device=out.device)
    q.masked_fill_(above[..., None], 0.0)  # a drafted copy of the cell above: one-hot
    return q.scatter_(-1, ids[..., None], torch.where(above, 1.0, 1.0 / k_image)[..., None])


def _test_masses(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, neighbours: torch.Tensor | None, relax: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What the acceptance test of drafts (b, W) compares, under p and q (b, W, K): the draft's probabilities
    (b, W) under each, or with relax > 0 its group's (module docstring); then the group's ids and membership
    (b, W, k), both None without relax."""
    if relax <= 0:
        return p.gather(-1, drafts[..., None]).squeeze(-1), q.gather(-1, drafts[..., None]).squeeze(-1), None, None
    near = neighbours[drafts]  # (b, W, k): the draft, then its nearest codes
    p_near, q_near = p.gather(-1, near), q.gather(-1, near)
    # the draft and the nearest codes while their mass under p, the draft's own left out, stays within relax
    group = p_near.cumsum(dim=-1) - p_near[..., :1] <= relax  # a prefix: p is never negative
    return (p_near * group).sum(dim=-1), (q_near * group).sum(dim=-1), near, group


def _speculative(
    model: DALLE,
    prefix: torch.Tensor,
    out: torch.Tensor,
    k: int,
    masks: list,
    stop: int,
    guidance_scale: float,
    probs_of: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator | None,
    W: int,
    draft: str,
    redraft: str,
    on_row: Callable[[int, torch.Tensor], None] | None,
    shared,
    neighbours: torch.Tensor | None,
    relax: float,
) -> int:
    """Fill out[:, k:] by speculative Jacobi decoding (module docstring) with windows of W cells, 2 <= W < n - k
    (or W = n - k with k >= 1); returns the forward passes run. `shared`: `_prefill`'s.

    out holds, per row, its accepted ids (cells < acc) and then its drafts. Every row has its own window,
    cells (b, W) from its first unaccepted cell (held back so that it ends by the last cell; it then
    re-reads accepted cells, which pass), and q (b, W, K) holds the distribution each draft was drawn from.
    """
    c = model.cfg
    b, n, t, w, k_image = out.shape[0], c.image_len, c.prefix_len, c.grid_w, c.image_vocab
    guided = stop > k
    device = out.device
    gen_device = generator.device if generator is not None else device
    cache = model.new_cache(prefix.shape[0])
    x_text = prefix  # (B, P, d)
    # prefill every input but the last known one (the last prefix position, or the last primed cell), which
    # opens the first window: positions 0 .. P + k - 2
    _prefill(model, _with_image(model, prefix, _pair(out[:, :k], guided))[:, : t + k - 1], masks, cache, shared)
    passes, rows_done = 1, k // w
    span = torch.arange(W, device=device)
    acc = torch.full((b,), k, device=device)  # accepted ids per row
    start = acc.clone()  # each row's window: cells start .. start + W - 1
    cells = start[:, None] + span
    q = _new_drafts(out, cells, torch.ones_like(cells, dtype=torch.bool), draft, w, k_image, generator)
    while int(acc.min()) < n:
        s0 = int(start.min())
        if guided and s0 >= stop:
            _drop_unconditional(b, masks, cache)
            x_text, guided = x_text[:b], False
        if s0 == int(start.max()):  # one window for all rows: contiguous positions
            if s0 == 0:  # the last prefix position, then the drafts of cells 0 .. W - 2
                x = torch.cat([x_text[:, -1:], model.embed_image(_pair(out[:, : W - 1], guided), 0)], dim=1)
            else:
                x = model.embed_image(_pair(out[:, s0 - 1 : s0 + W - 1], guided), s0 - 1)
            h = model.transform(x, t + s0 - 1, masks, cache)
        else:  # every row at its own cells: the inputs are the cells before them
            fed = _pair(cells - 1, guided)
            x = model.embed_image(_pair(out.gather(1, cells - 1), guided), fed)
            h = model.transform_rows(x, t + fed, masks, cache)
        logits = model.image_logits(h)  # (B, W, K): the distributions of `cells`
        passes += 1
        if guided:
            logits = torch.where((cells < stop)[..., None], _guide(logits, guidance_scale), logits[:b])
        p = probs_of(logits.reshape(b * W, k_image)).view(b, W, k_image)

        # accept each draft with probability min(1, p / q) (of its group under relax), in order; a row's
        # accepted cells pass
        drafts = out.gather(1, cells)  # (b, W)
        p_d, q_d, near, group = _test_masses(p, q, drafts, neighbours, relax)
        u = torch.rand(b, W, generator=generator, device=gen_device).to(device)
        refused = (u * q_d >= p_d) & (cells >= acc[:, None])
        first = torch.where(refused.any(dim=1), refused.int().argmax(dim=1), W)  # (b,): W = all accepted
        # the first refused draft is redrawn from the residual max(0, p - q); the cells after it are redrafted
        # from this pass's p (the Jacobi step): "coupled", each keeps its draft if it passed its own test and
        # is drawn from its residual if not (a maximal coupling of q and p); "independent", drawn from p
        later = span[None] > first[:, None]  # (b, W)
        redo = refused if redraft == "coupled" else refused & ~later
        if redo.any():
            at = redo.nonzero(as_tuple=True)
            p_r, q_r = p[at], q[at]  # (r, K)
            residual = (p_r - q_r).clamp_(min=0)
            if group is not None:  # a group's codes passed with it: outside it, max(0, p - q) holds q(A) - p(A) > 0
                residual.scatter_(-1, near[at], residual.gather(-1, near[at]) * ~group[at])
            residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_r)  # p == q: nothing refused
            drafts[at] = draw(residual, generator)
        if later.any():
            if redraft == "independent":
                drafts = torch.where(later, draw(p.view(b * W, k_image), generator).view(b, W), drafts)
            q = torch.where(later[..., None], p, q)
        out.scatter_(1, cells, drafts)
        acc = torch.maximum(acc, start + torch.clamp(first + 1, max=W))

        while on_row is not None and rows_done < int(acc.min()) // w:
            on_row(rows_done, out[:, : (rows_done + 1) * w].clone())
            rows_done += 1
        # the next windows: the cells still in this one keep their drafts, the new ones are drafted
        shift = acc.clamp(max=n - W) - start  # (b,) in 0 .. W
        start = start + shift
        cells = start[:, None] + span
        moved = span[None] + shift[:, None]  # (b, W): each next cell's index in this window
        kept = moved < W
        q = q.gather(1, moved.clamp(max=W - 1)[..., None].expand(-1, -1, k_image))
        if not kept.all():
            q = torch.where(kept[..., None], q, _new_drafts(out, cells, ~kept, draft, w, k_image, generator))
    return passes


class NonFiniteLogits(UserError):
    """Sampling met logits that are NaN or inf (diverged weights, an overflowing guidance scale): no distribution to
    draw from, where the inverse CDF would have drawn the vocabulary's last id every time."""


def _check_ids(name: str, ids: torch.Tensor, vocab: int) -> None:
    """One sentence for ids outside [0, vocab), which the embedding would meet as an IndexError."""
    if ids.dtype != torch.long or (ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab)):
        raise ValueError(f"{name} ids must be a LongTensor of ids in [0, {vocab})")


def _check_args(
    model,
    text,
    cond,
    null_text,
    guidance_scale,
    guidance_until,
    temperature,
    top_k,
    top_p,
    prime,
    decode,
    window,
    draft,
    redraft,
    keep,
    redraw,
    relax,
    neighbours,
):
    c = model.cfg
    if text.dim() != 2 or text.shape[1] != c.text_len or text.dtype != torch.long:
        raise ValueError(f"text must be a LongTensor (b, {c.text_len}), got {text.dtype} {tuple(text.shape)}")
    _check_ids("text", text, c.text_vocab)
    if cond is not None and (not c.cond_len or cond.shape != (text.shape[0], c.cond_dim)):
        want = f"({text.shape[0]}, {c.cond_dim})" if c.cond_len else "None: this transformer takes no embedding"
        raise ValueError(f"cond must be {want}, got {tuple(cond.shape)}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if window < 0 or draft not in DRAFTS or redraft not in REDRAFTS:
        raise ValueError(
            f"window must be >= 0 (0: chosen by the batch), draft one of {DRAFTS} and redraft one of {REDRAFTS},"
            f" got {window}, {draft!r}, {redraft!r}"
        )
    table = neighbours is not None and neighbours.dim() == 2 and neighbours.shape[0] == c.image_vocab
    if relax < 0 or (relax > 0 and not table):
        got = None if neighbours is None else tuple(neighbours.shape)
        raise ValueError(
            f"relax must be >= 0, and above 0 needs neighbours ({c.image_vocab}, k): each code's nearest codes, itself"
            f" first (ImageTokenizer.nearest_codes); got relax={relax}, neighbours {got}"
        )
    if guidance_scale != 1.0:
        if null_text is None:
            raise ValueError("guidance_scale != 1 needs null_text: the ids of the empty caption, (1, t) or (b, t)")
        if null_text.dim() != 2 or null_text.shape[0] not in (1, text.shape[0]) or null_text.shape[1] != c.text_len:
            raise ValueError(f"null_text must be (1 or b, {c.text_len}), got {tuple(null_text.shape)}")
        _check_ids("null_text", null_text, c.text_vocab)
    if not 0.0 <= guidance_until <= 1.0:
        raise ValueError(f"guidance_until must lie in [0, 1] (the guided fraction of the image), got {guidance_until}")
    if not temperature >= MIN_TEMPERATURE:  # below it, logits / temperature overflow float32: NaN, then the last id
        raise ValueError(
            f"temperature must be at least {MIN_TEMPERATURE:g} (use top_k=1 for greedy decoding), got {temperature}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k must be an integer >= 0 and top_p in (0, 1], got top_k={top_k!r}, top_p={top_p}")
    if prime is not None:
        if prime.dim() != 2 or prime.shape[0] != text.shape[0] or prime.shape[1] > c.image_len:
            raise ValueError(f"prime must be (b, k) image ids with k <= {c.image_len}, got {tuple(prime.shape)}")
        _check_ids("prime", prime, c.image_vocab)
    if (keep is None) != (redraw is None) or (redraw is not None and prime is not None):
        raise ValueError("keep and redraw go together, and without prime (a prime is kept leading cells already)")
    if redraw is not None:
        if redraw.shape != (c.image_len,) or redraw.dtype != torch.bool or not bool(redraw.any()):
            raise ValueError(f"redraw must be a bool mask ({c.image_len},) with at least one True cell")
        if keep.shape != (text.shape[0], c.image_len):
            raise ValueError(f"keep must be ({text.shape[0]}, {c.image_len}) image ids, got {tuple(keep.shape)}")
        _check_ids("keep", keep, c.image_vocab)
        if decode == "speculative":
            raise ValueError("decode='speculative' cannot keep cells inside the image; use cached")


@torch.inference_mode()
def generate(
    model: DALLE,
    text: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    null_text: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_until: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    prime: torch.Tensor | None = None,
    on_row: Callable[[int, torch.Tensor], None] | None = None,
    decode: str = "cached",
    window: int = 0,
    draft: str = "above",
    redraft: str = "coupled",
    relax: float = 0.0,
    neighbours: torch.Tensor | None = None,
    stats: dict | None = None,
    keep: torch.Tensor | None = None,
    redraw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample image ids (b, n), raster order, for text ids (b, t); every prompt in one batch.

    cond: an unCLIP decoder's CLIP image embeddings (b, cond_dim) (None: dropped, as in the unconditional rows).
    null_text: the empty caption's ids, (1, t) or (b, t); needed when guidance_scale != 1. The unconditional
        rows read it and, for an unCLIP decoder, the dropped (zero) embedding.
    guidance_scale: classifier-free guidance scale on the logits (1: off, no unconditional rows run).
    guidance_until: the fraction of the tokens this call draws that are guided, counted from the first drawn
        (1: all, 0: none); after them the unconditional rows leave the batch. Primed (kept) tokens before the
        first drawn one do not count: a completion of the image's bottom half guides the first part of it.
    temperature, top_k (0: off), top_p (1: off): applied in this order to the (guided) image logits.
    generator: the source of all randomness; the same seed gives the same ids in every decode mode (in float32;
        in bf16 each mode's rounding may part them at a near-tie).
    prime: (b, k) image ids that are kept as the first k tokens; generation continues after them.
    on_row(r, ids): called once per grid row r = 0 .. h-1, in order, as soon as the row is complete
        (primed rows first, before any sampling), with a copy of the ids so far, (b, (r + 1) * w).
    decode: how a step runs. "uncached": a forward over the whole prefix every step (the slow reference);
        "cached": the prefix's keys and values kept, one position attending to them (fastest eager on
        CPU); "static": `DALLE.decode_step`, the same step at shapes that never change (it reads all L
        cached positions under a mask); "compiled": that step under torch.compile, compiled on the first
        call for a model and batch size and reused after (mode reduce-overhead, i.e. CUDA graphs, on
        GPUs: eager decoding of a large model is bound by per-step kernel launches there); "speculative":
        speculative Jacobi decoding (module docstring), cached passes over a window of drafted tokens.
    window: speculative decoding's window in cells (0: `window_width` of the batch, device and dtype; 1:
        plain decoding); read only when decode is "speculative".
    draft: how speculative decoding drafts a cell no pass has reached: "above" (the cell above's id) or
        "random".
    redraft: how speculative decoding's Jacobi step redrafts the cells after a refused draft: "coupled" (each
        keeps its draft unless its own test refuses it, then drawn from max(0, p - q): MC-SJD) or
        "independent" (drawn from p afresh, as SJD does).
    relax, neighbours: speculative decoding's relaxed test (LANTERN, module docstring): each draft tested with
        its nearest codes while their probability sums to at most relax (0: exact, neighbours unread);
        neighbours (K, k) holds each code's nearest codes, itself first (`ImageTokenizer.nearest_codes`).
    keep, redraw: editing (inpainting): ids (b, n) and a bool mask (n,); the cells where redraw is False keep
        their ids from keep, the others are sampled in raster order, each seeing the kept cells before it (the
        kept cells before the first redrawn one are a prime; none after the last redrawn one is run).
        Not with prime, nor with decode "speculative".
    stats: a dict that receives "passes", the sequential forward passes the batch took (prefill included),
        "window", the cells per pass (1: plain decoding), and "rows", the model rows (2b under guidance).

    The model runs in eval mode under inference_mode and is put back in its former mode; the caller's
    tensors are never written.
    """
    _check_args(
        model,
        text,
        cond,
        null_text,
        guidance_scale,
        guidance_until,
        temperature,
        top_k,
        top_p,
        prime,
        decode,
        window,
        draft,
        redraft,
        keep,
        redraw,
        relax,
        neighbours,
    )
    c = model.cfg
    b, n, w = text.shape[0], c.image_len, c.grid_w
    end = n  # cells k .. end - 1 are run
    if redraw is not None:
        drawn = redraw.nonzero().squeeze(1)
        prime, end = keep[:, : int(drawn[0])], int(drawn[-1]) + 1
        redraw = redraw.tolist()
    k = 0 if prime is None else prime.shape[1]
    stop = guided_stop(k, end, guidance_until) if guidance_scale != 1.0 else k  # tokens k .. stop - 1 are guided
    guided = stop > k
    rows_text = torch.cat([text, null_text.to(text.device).expand(b, -1)]) if guided else text  # (B, t)
    if cond is not None and guided:
        cond = torch.cat([cond, torch.zeros_like(cond)])  # the unconditional rows: the embedding dropped
    if cond is not None:
        cond = cond.to(text.device)
    out = torch.empty(b, n, dtype=torch.long, device=text.device)
    if keep is not None:
        out.copy_(keep)
    elif k:
        out[:, :k] = prime
    if on_row is not None:
        for r in range(k // w):
            on_row(r, out[:, : (r + 1) * w].clone())

    was_training = model.training
    model.eval()
    try:
        masks = model.attn_masks(rows_text)
        prefix = model.embed_prefix(rows_text, cond)  # (B, P, d)
        # rows whose prefill inputs are equal (a prompt's candidates, the unconditional rows) share its work
        inputs = [rows_text, _pair(out[:, :k], guided)] + ([] if cond is None else [cond])
        # compared on the CPU in float64, exact for ids and embeddings alike (MPS has no float64)
        shared = _distinct_rows(torch.cat([t.detach().cpu().double() for t in inputs], dim=1), out.device)
        width = 1
        if decode == "speculative":  # a window never reaches back to the text: it starts at cell 1 or later
            weight = model.head.weight
            width = window_width(rows_text.shape[0], weight.device, weight.dtype, window, n - max(k, 1))
        passes = end - k
        nonfinite = torch.zeros((), dtype=torch.bool, device=out.device)

        def probs_of(logits: torch.Tensor) -> torch.Tensor:
            probs = final_probs(logits, temperature, top_k, top_p)
            # a row that is no distribution (NaN or inf logits) would draw the last id: noted without a sync,
            # which would stall a GPU's queue every step, and said once, at the end
            nonfinite.logical_or_(~torch.isfinite(probs.sum(dim=-1)).all())
            return probs

        if width > 1 and b > 0:
            passes = _speculative(
                model, prefix, out, k, masks, stop, guidance_scale, probs_of, generator, width, draft, redraft, on_row,
                shared, None if neighbours is None else neighbours.to(out.device), relax,
            )  # fmt: skip
        else:
            if decode == "uncached":
                source = _uncached_logits(model, prefix, out, k, masks, stop)
            else:  # speculative at a window of 1 cell is plain cached decoding
                source = _cached_logits(
                    model, prefix, out, k, masks, stop, "cached" if decode == "speculative" else decode, shared
                )
            uniforms = _uniforms(generator, b, sum(redraw[k:end]) if redraw is not None else end - k, out.device)
            for i, logits in zip(range(k, end), source):
                if redraw is None or redraw[i]:  # else a kept cell: its id is in out already
                    if i < stop:
                        logits = _guide(logits, guidance_scale)
                    out[:, i] = draw(probs_of(logits), generator, None if uniforms is None else next(uniforms))
                if on_row is not None and (i + 1) % w == 0:
                    on_row(i // w, out[:, : i + 1].clone())
            if on_row is not None:  # the kept rows after the last redrawn cell's row, complete already
                for r in range(end // w, n // w):
                    on_row(r, out[:, : (r + 1) * w].clone())
        if bool(nonfinite):
            cause = f", or the guidance scale {guidance_scale:g} overflowed them" if guided else ""
            fix = ", or lower the guidance scale" if guided else ""
            raise NonFiniteLogits(
                "the transformer's next-token logits are not finite (NaN or inf): its weights diverged in training"
                f"{cause}; retrain it at a lower learning rate{fix}"
            )
        if stats is not None:
            stats.update(passes=passes, window=width if b > 0 else 1, rows=rows_text.shape[0])
    finally:
        model.train(was_training)
    return out


__all__ = [
    "DECODE_MODES",
    "DRAFTS",
    "NonFiniteLogits",
    "REDRAFTS",
    "compiled_step",
    "draw",
    "filter_logits",
    "final_probs",
    "generate",
    "guided_stop",
    "sample_logits",
    "window_width",
]
