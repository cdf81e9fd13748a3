"""CLIP-guided refinement of sampled images (VQGAN+CLIP), over any image tokenizer of `vae`.

After Crowson et al. 2022 ("VQGAN-CLIP: Open Domain Image Generation and Editing with Natural Language
Guidance"): the image is a grid of continuous latents of the image tokenizer; every step snaps them to
the nearest codes (straight-through gradients, the tokenizer's own `snap`), decodes them differentiably
(`decode_latent`), and takes an Adam step that raises CLIP's similarity to the prompt, averaged over
random crops of the decoded image ("cutouts"). What comes out is always a grid of real codes.

Here the latents start at the codes of a sample (the transformer's, or `random_codes`), so refinement
begins from exactly that image; of every snapped image seen on the way (the start included), the one
with the highest objective on the whole, un-augmented image is returned, so refinement never hands
back something it scores lower than its start (and returns the start itself when no step is better).

The prior term: CLIP alone finds images a small CLIP likes and the prompt does not describe (adversarial
images). `prior` adds `prior_weight` times the transformer's mean log-likelihood of the snapped codes
given the prompt (`DALLE.code_log_likelihood` of the tokenizer's straight-through `code_weights`), which
knows what real images look like, to the objective that is optimised and to the one that picks the result.

Two optimisers (`optimizer`). "adam" (VQGAN+CLIP as published) moves the latents by Adam. From random codes it
fails with or without the prior: the transformer's predictions after a prefix of noise say nothing, and
Adam's sign-like steps over every code of every cell wander. "jacobi" (needs `cell_log_probs`, the
transformer's prediction of every cell given the cells before it, one teacher-forced pass) sets every cell
at once to the code that maximises the prior's log-probability of it plus `lr` times CLIP's first-order
gain of that code (its gradient with respect to the cell's decoder input, dotted with each code's vector):
a Jacobi iteration of greedy decoding, tilted toward CLIP. From noise, the first cell is right after one
step, and each step fixes at least one more, as in Jacobi decoding (Song et al. 2021; SJD, Teng et al.
2025, drafts from random tokens the same way); it stops at a fixed point. The objective that picks the
result is the same for both.

Cutouts are random resized crops (`clip.model.clip_augment`, the augmentation CLIP was trained with,
at a wider scale range) and, only when no prompt part mentions left or right (or, from the pipeline, is a
caption the bundle's `data.encode_flip_exclude` keeps from mirror images: `letter j`), random horizontal flips:
a flip turns "a circle on the left" into one on the right.

Weighted prompts, as in VQGAN+CLIP: "a red circle:1 | a blue square:-0.5" moves towards a red circle
and away from a blue square; the objective is the weighted sum of cosine similarities.

Contrast captions do that by themselves: `contrast` (the pipeline's: the prompt with one part made false, such
as its style swapped for every other style) and `contrast_weight` c turn CLIP's pull from the prompt's text
embedding t to t - c * mean(contrast embeddings), rescaled to t's length: toward what tells the prompt from its
near misses rather than what it shares with them (`contrast_direction`). `contrast_guard` uses them as a check
instead: a snapped image may be returned only if CLIP's margin of the prompt over its nearest miss (the similarity
to the prompt minus the highest similarity to a contrast caption) is at least the start's, so that refinement never
hands back an image that looks more like a caption it should not be (the start passes, so it always has one).

Usage:
    parts = parse_weighted_prompt("a red circle:1 | a blue square:-0.5")   # [("a red circle", 1.0), ...]
    ids, images, scores = refine(tokenizer, scorer, parts, start_ids, steps=60, lr=0.1, cutouts=16,
                                 generator=torch.Generator().manual_seed(0))    # (b, h, w), (b, 3, H, W), (b,)
    ids, images, scores = refine(tokenizer, scorer, parts, random_codes(K, 1, h, w), steps=60, lr=10, cutouts=16,
                                 prior=ll, prior_weight=0.3, optimizer="jacobi", cell_log_probs=log_probs)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

import vae

from ..clip.model import clip_augment
from ..config import GUIDED_OPTIMIZERS
from ..errors import UserError

# a dVAE's start logits: the start code leads every other by this much, so Adam at lr ~0.1 can switch a
# cell to another code within a few steps, yet the first snapped image is exactly the start image
START_MARGIN = 1.0
# cutouts keep at least this fraction of the image side: wide enough to keep a shape whole on 16-32 px images
CUTOUT_SCALE_MIN = 0.6
OPTIMIZERS = tuple(o for o in GUIDED_OPTIMIZERS if o != "auto")  # "auto" is the pipeline's choice of one
_SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)
# what a weight after a part's last colon starts with: a sign, a digit or a point ('inf' and 'nan' as words too)
_WEIGHT_START = re.compile(r"^([-+]?[\d.]|[-+]?(inf|nan)\b)", re.IGNORECASE)


def parse_weighted_prompt(prompt: str) -> list[tuple[str, float]]:
    """'a red circle:1 | a blue square:-0.5' -> [('a red circle', 1.0), ('a blue square', -0.5)].

    A part without ':weight' weighs 1, and so does one whose last colon is the caption's own: a space and words
    follow it ('flag: japan, noto style', an emoji name), or digits are on both sides of it ('a clock at 12:30').
    An empty part, a weight that is not a finite number ('a circle:heavy', 'a circle:inf'), or no part with a
    positive weight is a UserError.
    """
    parts = []
    for raw in prompt.split("|"):
        text, sep, weight_text = raw.rpartition(":")
        said = weight_text.strip()
        words = weight_text[:1].isspace() and not _WEIGHT_START.match(said)
        if not sep or words or (text[-1:].isdigit() and weight_text[:1].isdigit()):
            text, weight = raw, 1.0
        else:
            try:
                weight = float(said)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise UserError(
                    f"the weight '{said}' in prompt part '{raw.strip()}' is not a number; "
                    "write parts like 'a red circle:1 | a blue square:-0.5'"
                )
        if not text.strip():
            raise UserError(f"the weighted prompt '{prompt}' has an empty part; write 'text:weight' between the '|'s")
        parts.append((text.strip(), weight))
    if not any(w > 0 for _, w in parts):
        raise UserError(
            f"the weighted prompt '{prompt}' has no part with a positive weight; give one, e.g. 'a circle:1'"
        )
    return parts


def mentions_sides(texts: Sequence[str]) -> bool:
    """Whether any text says left or right (then cutouts are never flipped)."""
    return any(_SIDES.search(t) for t in texts)


def random_codes(codebook_size: int, batch: int, h: int, w: int, generator: torch.Generator | None = None):
    """Uniformly random code ids (batch, h, w): the other starting point of refinement."""
    return torch.randint(codebook_size, (batch, h, w), generator=generator)


def start_latent(tokenizer: vae.ImageTokenizer, ids: torch.Tensor) -> torch.Tensor:
    """The free latent (what `tokenizer.snap` takes) that snaps to exactly `ids` (b, h, w)."""
    if isinstance(tokenizer, vae.DiscreteVAE):
        # logits (b, K_1 + .. + K_G, h, w): the argmax of each group is the start code's factor
        return START_MARGIN * tokenizer.one_hot(ids)
    if isinstance(tokenizer, vae.VQ):
        return tokenizer.embed_ids(ids)  # unit codes in the lookup space, whose nearest code is themselves
    return tokenizer.free_latent(tokenizer.decode(ids))  # any other tokenizer: re-encode its own decoding


def make_cutouts(
    images: torch.Tensor, n: int, size: int, generator: torch.Generator | None = None, flips: bool = True
) -> torch.Tensor:
    """Images (b, 3, H, W) -> n random crops of each, (n * b, 3, size, size), row j from image j % b."""
    x = clip_augment(images.repeat(n, 1, 1, 1), CUTOUT_SCALE_MIN, generator)  # (n b, 3, H, W), differentiable
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if flips:
        flip = torch.rand(x.shape[0], generator=generator).to(x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def prompt_direction(scorer, parts: Sequence[tuple[str, float]]) -> torch.Tensor:
    """The weighted sum of the parts' text embeddings (e,): its dot product with an image embedding is the score."""
    weights = torch.tensor([w for _, w in parts])
    return weights @ scorer.embed_texts([t for t, _ in parts])  # (e,)


def contrast_direction(direction: torch.Tensor, near: torch.Tensor | None, weight: float) -> torch.Tensor:
    """`direction` (e,) minus `weight` times the mean of `near`, the contrast captions' text embeddings (m, e),
    rescaled to `direction`'s length (so that the weight turns CLIP's pull and does not also shrink it against
    the prior's): the part of the prompt that its near misses lack ("pizza, openmoji style" against the pizza in
    the other styles: the style). `direction` itself when the weight is 0 or there is no contrast caption. Only
    a contrast whose mean is the prompt, at weight 1, cancels it (refused)."""
    if not weight or near is None or not len(near):
        return direction
    pull = direction - weight * near.to(direction).mean(0)
    length = pull.norm()
    if length <= 1e-6 * direction.norm():
        raise UserError(
            "the contrast captions cancel the prompt (their mean embedding is the prompt's); lower "
            "sample.guided_contrast_weight below 1 or set it to 0"
        )
    return pull * (direction.norm() / length)


def weighted_score(scorer, images: torch.Tensor, parts: Sequence[tuple[str, float]]) -> torch.Tensor:
    """Sum over parts of weight * cosine similarity, per image (m,); one part of weight 1 is `scorer.score`."""
    return scorer.embed_images(images) @ prompt_direction(scorer, parts)


def _where(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """Per batch row (b,), `new` where `rows` is True, else `old` (None: all new)."""
    if old is None:
        return new
    return torch.where(rows.view(-1, *[1] * (new.dim() - 1)), new, old)


def code_vectors(tokenizer: vae.ImageTokenizer) -> torch.Tensor:
    """Every code's decoder input (K, d): the decoder input of a cell is linear in its one-hot code, so a
    gradient with respect to it (d,) dotted with these is each code's first-order gain (K,)."""
    ids = torch.arange(tokenizer.codebook_size, device=next(tokenizer.parameters()).device)
    return rearrange(tokenizer.embed_ids(ids.view(1, 1, -1)), "1 d 1 k -> k d")


def jacobi_update(log_probs: torch.Tensor, gain: torch.Tensor, lr: float) -> torch.Tensor:
    """One Jacobi step: the prior's log-probabilities (b, n, K) of every cell given the current cells before
    it, plus lr times CLIP's first-order gain of every code (b, n, K) -> each cell's best code (b, n)."""
    return (log_probs + lr * gain).argmax(dim=-1)


def _check(
    steps: int, lr: float, cutouts: int, prior_weight: float, optimizer: str, contrast_weight: float, guard: bool
) -> None:
    """The refinement settings, each refused in one sentence; `guard`: the contrast guard is on without captions."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"config key 'sample.guided_optimizer' is '{optimizer}'; use {' or '.join(OPTIMIZERS)}")
    if steps < 0:
        raise UserError(f"config key 'sample.guided_steps' is {steps}; set it to 0 or more")
    if optimizer == "jacobi" and not (lr >= 0 and math.isfinite(lr)):  # 0: the prior's moves alone
        raise UserError(f"config key 'sample.guided_jacobi_lr' is {lr}; set it to 0 or more, e.g. 10")
    if optimizer == "adam" and not lr > 0:
        raise UserError(f"config key 'sample.guided_lr' is {lr}; set it to a positive number, e.g. 0.1")
    if cutouts < 1:
        raise UserError(f"config key 'sample.guided_cutouts' is {cutouts}; set it to 1 or more")
    if prior_weight < 0 or not math.isfinite(prior_weight):
        raise UserError(f"config key 'sample.guided_prior_weight' is {prior_weight}; set it to 0 (off) or more")
    if contrast_weight < 0 or not math.isfinite(contrast_weight):
        raise UserError(f"config key 'sample.guided_contrast_weight' is {contrast_weight}; set it to 0 (off) or more")
    if guard:
        raise UserError(
            "the contrast guard (sample.guided_contrast_guard) compares the prompt with its contrast captions and "
            "got none; pass contrast=[...] or set sample.guided_contrast_guard to false"
        )


def refine(
    tokenizer: vae.ImageTokenizer,
    scorer,
    parts: Sequence[tuple[str, float]],
    start_ids: torch.Tensor,
    *,
    steps: int,
    lr: float,
    cutouts: int,
    generator: torch.Generator | None = None,
    keep_rows: int = 0,
    progress: bool = True,
    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prior_weight: float = 0.0,
    optimizer: str = "adam",
    cell_log_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
    contrast: Sequence[str] = (),
    contrast_weight: float = 0.0,
    contrast_guard: bool = False,
    flips: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raise CLIP's weighted similarity of the images of `start_ids` (b, h, w) by optimising their latents.

    scorer: a ClipScorer over a CLIP module it exposes as `.model` (the bundle's own, `load_clip`).
    keep_rows: the top rows of codes that stay as they are (completion).
    prior: code weights (b, n, K_1 + .. + K_G), raster order -> mean log-likelihood per image (b,) (the
        transformer's, given the prompt); prior_weight times it joins the objective (0: CLIP alone).
    optimizer: "adam" (lr: Adam's step on the latents) or "jacobi" (lr: CLIP's weight in each Jacobi update;
        needs cell_log_probs: ids (b, n), raster order -> the transformer's log-probabilities (b, n, K) of
        every code at every cell given the prompt and the cells before it, twice: the ones the steps move by
        (sampling's guidance may sharpen them) and the plain ones, whose mean at the ids is the prior term).
    contrast, contrast_weight: captions that nearly say what the prompt says (`contrast_direction`): CLIP's part
        of the objective becomes the similarity to what tells the prompt from them (0 or none: the prompt alone).
    contrast_guard: a snapped image may be returned only if CLIP's margin of the prompt over the nearest contrast
        caption (similarity to the prompt's parts minus the highest similarity to a contrast caption) is at least
        the start's: refinement never makes an image look more like a caption it should not be (needs contrast).
    flips: whether cutouts may be mirrored (None: unless a part mentions left or right, `mentions_sides`).
    Returns the snapped images of the best objective seen, among those the guard lets through (ids (b, h, w),
    images (b, 3, H, W) in [0, 1], CLIP scores (b,): the similarity to the prompt's parts, without the contrast),
    on the CPU: with a dVAE or VQ the start itself when no step improves on it (another tokenizer's start is its
    re-encoded decoding, `start_latent`). Only the latents get gradients; the models' weights are never touched.
    """
    _check(steps, lr, cutouts, prior_weight, optimizer, contrast_weight, contrast_guard and not contrast)
    jacobi = optimizer == "jacobi"
    if jacobi and cell_log_probs is None:
        raise UserError(
            "the jacobi optimiser moves along the transformer's predictions; give it the prior "
            "(sample.guided_prior_weight above 0) or set sample.guided_optimizer to adam"
        )
    use_prior = prior is not None and prior_weight > 0
    if not 0 <= keep_rows < start_ids.shape[1]:
        raise UserError(f"keep_rows is {keep_rows}; keep fewer rows than the grid's {start_ids.shape[1]}")
    model = getattr(scorer, "model", None)
    if model is None or not hasattr(model, "encode_image"):
        raise UserError("clip-guided generation needs the bundle's own CLIP (clip.safetensors); use --method ar")
    device = next(tokenizer.parameters()).device
    texts = [t for t, _ in parts]
    if flips is None:
        flips = not mentions_sides(texts)
    direction = prompt_direction(scorer, parts).to(device)  # (e,): what the returned scores measure
    near = scorer.embed_texts(list(contrast)).to(device) if contrast and (contrast_weight or contrast_guard) else None
    pull = contrast_direction(direction, near, contrast_weight)  # (e,): what the objective raises
    near_misses = near.T if contrast_guard else None  # (e, m)
    # a plain copy: ids sampled under inference_mode cannot take part in autograd
    start_ids = start_ids.to(device).clone()
    r = keep_rows

    with torch.enable_grad():
        if jacobi:
            ids, vectors = start_ids, code_vectors(tokenizer).float()  # (b, h, w), (K, d)
        else:
            free = start_latent(tokenizer, start_ids).detach().requires_grad_(True)
            kept = tokenizer.embed_ids(start_ids).detach()  # (b, d, h, w)
            kept_weights = tokenizer.code_weights(free).detach() if use_prior else None  # the start's, one-hot
            adam = torch.optim.Adam([free], lr=lr)
        best_ids = best_images = best = best_score = start_margin = None
        bar = tqdm(range(steps + 1), desc="clip-guided", unit="step", leave=False, disable=None if progress else True)
        for step in bar:
            if jacobi:
                latent = tokenizer.embed_ids(ids).detach().requires_grad_(True)  # CLIP's gradient lands here
            else:
                latent, ids = tokenizer.snap(free)
                if r:
                    latent = torch.cat([kept[:, :, :r], latent[:, :, r:]], dim=2)
                    ids = torch.cat([start_ids[:, :r], ids[:, r:]], dim=1)
            images = tokenizer.decode_latent(latent)  # (b, 3, H, W)
            embedded = scorer.embed_images(images.detach()).to(device)  # (b, e)
            score, pulled = embedded @ direction, embedded @ pull  # (b,) each; the same without a contrast
            log_likelihood = torch.zeros_like(score)
            if jacobi:
                with torch.no_grad():
                    moves, plain = cell_log_probs(ids.flatten(1))  # (b, n, K) each: the next step's moves
                if use_prior:  # the mean log-likelihood of the codes, from the pass the moves needed anyway
                    log_likelihood = plain.gather(-1, ids.flatten(1)[..., None]).squeeze(-1).mean(-1).to(device)
            elif use_prior:
                weights = tokenizer.code_weights(free)  # (b, K, h, w), straight-through one-hots
                if r:
                    weights = torch.cat([kept_weights[:, :, :r], weights[:, :, r:]], dim=2)
                log_likelihood = prior(rearrange(weights, "b k h w -> b (h w) k")).to(device)  # (b,)
            objective = pulled + prior_weight * log_likelihood.detach()
            better = torch.ones_like(score, dtype=torch.bool) if best is None else objective > best
            if near_misses is not None:  # the prompt's margin over its nearest miss may not fall below the start's
                margin = score - (embedded @ near_misses).amax(dim=-1)
                start_margin = margin if start_margin is None else start_margin
                better &= margin >= start_margin
            best = _where(better, objective, best)
            best_score = _where(better, score, best_score)
            best_ids = _where(better, ids, best_ids)
            best_images = _where(better, images.detach(), best_images)
            bar.set_postfix(score=f"{float(score.mean()):.4f}", best=f"{float(best.mean()):.4f}")
            if step == steps:
                break  # the last snap is scored, not optimised
            crops = make_cutouts(images, cutouts, model.image_size, generator, flips)  # (n b, 3, S, S)
            sims = rearrange(model.encode_image(crops) @ pull, "(n b) -> n b", n=cutouts)
            if jacobi:  # the prior's part is exact in log_probs; CLIP's is first-order
                (grad,) = torch.autograd.grad(sims.mean(0).sum(), [latent])  # (b, d, h, w)
                gain = torch.einsum("bdhw,kd->bhwk", grad.float(), vectors).flatten(1, 2)  # (b, n, K)
                new = jacobi_update(moves.to(device), gain, lr).view_as(ids)
                if r:
                    new[:, :r] = start_ids[:, :r]
                if torch.equal(new, ids):
                    break  # a fixed point: every later step would score these codes again
                ids = new
                continue
            loss = -(sims.mean(0) + prior_weight * log_likelihood).sum()  # log_likelihood 0 without the prior
            (grad,) = torch.autograd.grad(loss, [free])
            free.grad = grad
            adam.step()
    return best_ids.cpu(), best_images.float().cpu(), best_score.float().cpu()


__all__ = [
    "code_vectors",
    "contrast_direction",
    "jacobi_update",
    "make_cutouts",
    "mentions_sides",
    "parse_weighted_prompt",
    "prompt_direction",
    "random_codes",
    "refine",
    "start_latent",
    "weighted_score",
]
