"""The text-to-image pipeline: prompt -> transformer samples -> image tokenizer decodes -> CLIP keeps the best.

    from dalle_mini_impl.pipeline.pipeline import Pipeline
    pipe = Pipeline.from_pretrained("runs/shapes")       # a bundle folder; None: the one shipped in the package
    results = pipe.generate(["a red circle"], num_images=4, candidates=16, seed=0)
    best = results[0][0]                                 # Result: prompt, image (PIL), rank, clip_score, seed, ids
    best.image.save("a-red-circle.png")

DALL-E's recipe (Ramesh et al. 2021, section 2.5): sample many candidates for a prompt, score them with
CLIP, keep the best. More ways to use the same parts:
  method="clip-guided"   VQGAN+CLIP refinement of the kept candidates (`guided.py`); the prompt may be
                         weighted, "a red circle:1 | a blue square:-0.5" (sampling uses its top part)
  init_image, keep_rows  completion, DALL-E's image-prompt trick: the image's top `keep_rows` rows of
                         codes are given to the transformer, which samples the rest; they stay exactly
and DALL-E 2's (Ramesh et al. 2022, unCLIP), with a bundle that has its decoder and prior (`train.unclip`,
`train.prior`): the decoder draws images from a CLIP image embedding, so
  method="unclip"        the prior turns the prompt into one image embedding per candidate, the decoder
                         draws each (with the prompt), CLIP reranks as above
  variations(images)     images drawn from each image's own embedding, ranked by CLIP image similarity
  interpolate(a, b)      images drawn along the spherical path between two images' embeddings
  text_diff=(from, to)   variations of an image moved toward the difference of two captions' embeddings

Determinism: prompt i draws all its randomness from its own CPU `torch.Generator` seeded with seed + i
(reported as the result's `seed`), its candidates sampled in batches of `sample.batch_size`. So the same
seed and arguments (the number of candidates included) give the same ids on the same machine, whatever
the other prompts are, and a prompt run alone with `seed=result.seed` gives its images again.

Every default (num_images, candidates, guidance scale, temperature, top-k/p, seed, guided steps) comes from
the bundle's `sample` config section. Nothing here writes files: `python -m sample` does.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import GUIDED_OPTIMIZERS, RunConfig, SampleConfig
from ..data.images import distinct_first, prepare_image, to_pil
from ..errors import UserError
from ..model.generate import DECODE_MODES, MIN_TEMPERATURE, MIN_WINDOW, WINDOW_TOKENS_CPU, generate, guided_stop
from .bundle import (
    FILES,
    bundle_path,
    load_clip,
    load_prior,
    load_text_tokenizer,
    load_transformer,
    load_vae,
    read_bundle_config,
)

METHODS = ("ar", "clip-guided", "unclip")
INITS = ("samples", "random")  # what clip-guided refinement starts from
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_CANDIDATES = 10_000  # per prompt; more would hold too many decoded images at once (and never finish on a CPU)
# when fewer than --num-images of a prompt's candidates are distinct, up to this many more rounds of
# candidates are sampled before a kept image is repeated (with a warning). Four: with three (variations' last at
# temperature 1.5), 1 of eval unclip's 300 seed-2 sources ("a small square") still got its own codes 32 times
# and kept four copies of itself; the fourth round, at 1.75, drew three new images (docs/RESULTS.md)
MAX_EXTRA_ROUNDS = 4
# --method unclip: embeddings the prior draws per candidate (DALL-E 2 draws 2), all candidates' at once
MAX_PRIOR_SAMPLES = 64
# --method clip-guided: crops of every image through CLIP at each refinement step, all at once
MAX_GUIDED_CUTOUTS = 256


MAX_SPECULATIVE_ROWS_CPU = WINDOW_TOKENS_CPU[torch.bfloat16] // MIN_WINDOW


def ranked(scores: torch.Tensor | None, tiers: torch.Tensor) -> torch.Tensor:
    """Candidate indices best first: by tier (`Pipeline._distinct`'s: a first-round candidate before an extra
    round's, a kept copy last), then by score, higher first (None: sample order), ties in sample order."""
    order = torch.arange(len(tiers)) if scores is None else scores.sort(descending=True, stable=True)[1]
    return order[tiers[order].sort(stable=True)[1]]


def kept_order(order: torch.Tensor, num_images: int) -> torch.Tensor:
    """The first `num_images` of `order` (candidate indices, best first); when fewer exist, the last resort,
    each repeated in rank order, the better ones first: [a, a, b, b] for two of four, [a, a, b, c] for three."""
    if len(order) >= num_images:
        return order[:num_images]
    return order[torch.arange(num_images) * len(order) // num_images]


class Stopped(Exception):
    """Raised out of `Pipeline.generate` or `edit` when their `should_stop()` said so (the web page's Stop)."""


class _Bar(tqdm):
    """The sampling bar, which asks `should_stop` at each update (each image row of a batch of candidates)."""

    def __init__(self, *args, should_stop: Callable[[], bool] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.should_stop = should_stop

    @classmethod
    def over(cls, tokens: int, desc: str, progress: bool, should_stop: Callable[[], bool] | None) -> _Bar:
        """A bar over `tokens` image tokens; progress False: drawn nowhere, still asking should_stop."""
        return cls(total=tokens, unit="tok", desc=desc, disable=None if progress else True, should_stop=should_stop)

    def update(self, n: float | None = 1):
        if self.should_stop is not None and self.should_stop():
            raise Stopped("stopped before the end, as asked")
        return super().update(n)


@dataclass
class Result:
    """One kept image of a prompt."""

    prompt: str
    image: Image.Image  # at the model's native resolution
    rank: int  # 1: CLIP's favourite of the candidates (or the first sampled, without CLIP)
    clip_score: float | None  # cosine similarity to the prompt (weighted sum under clip-guided); None without CLIP
    seed: int  # the prompt's own seed: generating it alone with this seed gives the same images
    ids: torch.Tensor  # (h, w) the image's codes
    # variations, interpolations, text diffs: clip_score is the CLIP image similarity they were ranked by, and
    # t the interpolation's position (0: the first image, 1: the second); prompt names the source
    t: float | None = None


@dataclass
class EditSource:
    """What every round of an edit reads: the image (3, S, S) at the model's resolution, its codes (1, n), and
    the cells (h, w) bool that the mask redraws."""

    pixels: torch.Tensor
    ids: torch.Tensor
    cells: torch.Tensor


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' (cuda > mps > cpu), 'cpu', 'cuda' or 'mps' (with an index, 'cuda:1'; or a torch.device) as a device
    that exists on this machine."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": has_mps}
    kind, _, index = name.partition(":")
    if kind not in available or (index and not index.isdigit()):
        raise UserError(f"device '{name}' is unknown; use auto, cpu, cuda (or cuda:N) or mps")
    if not available[kind] or (kind == "cuda" and index and int(index) >= torch.cuda.device_count()):
        raise UserError(f"device '{name}' is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'fp32', 'bf16' or 'fp16' (or the torch.dtype) as the autocast dtype for `device`; fp16 on the CPU is
    refused."""
    name = next((short for short, dtype in DTYPES.items() if dtype == name), name)
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is unknown; use fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise UserError("dtype fp16 is not supported on the CPU; use --dtype fp32 or bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("dtype bf16 is not supported by this GPU; use --dtype fp16 or fp32")
    return DTYPES[name]


def check_seed(seed: int, name: str = "--seed") -> None:
    """Seeds seed torch's and numpy's generators; numpy's take no negative number. `name`: the seed's, as the
    sentence names it (`check_settings` names a config's)."""
    if isinstance(seed, bool) or not isinstance(seed, int):  # a torch.Generator, 1.5: the seed, not a generator
        raise UserError(f"{name} is {seed!r}; give a non-negative integer below 2**62 (prompt i uses seed + i)")
    if not 0 <= seed < 2**62:
        raise UserError(f"{name} is {seed}; use a non-negative integer below 2**62")


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list; none, or an empty or blank one, is a UserError."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts:
        raise UserError("no prompt was given; describe the image, e.g. python -m sample 'a red circle'")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise UserError(f"prompt {i + 1} is a {type(p).__name__}, not text; give each prompt as a str")
        if not p.strip():
            raise UserError(f"prompt {i + 1} is empty; describe the image, e.g. 'a red circle'")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: a command-line argument whose bytes are not UTF-8
            raise UserError(
                f"prompt {i + 1} is not valid UTF-8 text; retype it, or set the terminal's encoding to UTF-8"
            ) from None
    return prompts


def refines_by_jacobi(s: SampleConfig, init: str) -> bool:
    """Whether clip-guided refinement from `init` ("samples" or "random") runs the jacobi optimiser, which reads
    the transformer's predictions (the prior, guided as sampling is): "auto" picks it from random codes, and it
    needs a prior weight above 0; otherwise Adam moves the latents by CLIP alone (and the prior, if weighted)."""
    optimizer = s.guided_optimizer
    if optimizer == "auto":
        optimizer = "jacobi" if init == "random" else "adam"
    return s.guided_prior_weight > 0 and optimizer == "jacobi"


def reads_contrast(s: SampleConfig) -> bool:
    """Whether clip-guided refinement reads the prompt's contrast captions: to turn CLIP's pull
    (`guided_contrast_weight`) or to guard the margin over them (`guided_contrast_guard`)."""
    return s.guided_contrast_weight > 0 or s.guided_contrast_guard


# the command-line flag of each sampling setting `python -m sample` takes (the others are config keys alone)
SAMPLE_FLAGS = {
    "guidance_scale": "--guidance-scale", "guidance_until": "--guidance-until", "temperature": "--temperature",
    "top_p": "--top-p", "top_k": "--top-k", "candidates": "--candidates", "num_images": "--num-images",
    "speculative_relax": "--relax", "edit_likelihood_weight": "--likelihood-weight",
    "guided_prior_weight": "--guided-prior-weight", "guided_contrast_weight": "--guided-contrast-weight",
    "prior_guidance_scale": "--prior-guidance-scale", "text_diff_scale": "--text-diff-scale", "seed": "--seed",
    "decode": "--decode",
}  # fmt: skip


def check_settings(s: SampleConfig, source: str | None = None, fields: bool = False) -> None:
    """Numbers a sampler cannot use are UserErrors naming the command-line flag; with `source` (where the settings
    were written: a bundle's config.json, an evaluation's --set) naming the config key, after the source; with
    `fields`, naming the setting as a form's field (the web app's page)."""

    def name(key: str) -> str:
        if fields:
            return f"the setting {key}"
        return SAMPLE_FLAGS[key] if source is None and key in SAMPLE_FLAGS else f"config key 'sample.{key}'"

    try:
        _check_settings(s, name)
    except UserError as e:
        raise UserError(str(e) if source is None else f"{source}: {e}") from None


def _check_settings(s: SampleConfig, name) -> None:
    for flag, value in (
        (name("guidance_scale"), s.guidance_scale),
        (name("guidance_until"), s.guidance_until),
        (name("temperature"), s.temperature),
        (name("top_p"), s.top_p),
    ):
        if not math.isfinite(value):
            raise UserError(f"{flag} is {value}; give a finite number")
    if s.candidates < 1:
        raise UserError(f"{name('candidates')} is {s.candidates}; sample at least 1 candidate per prompt")
    if s.candidates > MAX_CANDIDATES:  # all of a prompt's candidates are decoded and ranked together
        raise UserError(
            f"{name('candidates')} is {s.candidates}; sample at most {MAX_CANDIDATES} candidates per prompt"
        )
    if s.num_images < 1:
        raise UserError(f"{name('num_images')} is {s.num_images}; keep at least 1 image per prompt")
    if s.num_images > s.candidates:
        raise UserError(
            f"{name('num_images')} {s.num_images} is above {name('candidates')} {s.candidates}; ask for fewer images "
            "or more candidates"
        )
    if not (math.isfinite(s.speculative_relax) and 0 <= s.speculative_relax < 1):
        raise UserError(
            f"{name('speculative_relax')} is {s.speculative_relax}; "
            "give a probability mass in [0, 1) (0: exact decoding)"
        )
    if s.speculative_relax > 0 and s.decode != "speculative":
        raise UserError(
            f"{name('speculative_relax')} relaxes speculative decoding's test, and {name('decode')} is {s.decode}; "
            "set it to speculative"
        )
    if s.speculative_neighbours < 1:
        raise UserError(
            f"config key 'sample.speculative_neighbours' is {s.speculative_neighbours}; set it to 1 or more"
        )
    if s.speculative_relax > 0 and s.speculative_neighbours < 2:
        raise UserError(
            f"{name('speculative_relax')} tests each draft together with its nearest codes, and config key "
            f"'sample.speculative_neighbours' is 1 (the draft alone); set it to 2 or more, or leave "
            f"{name('speculative_relax')} at 0"
        )
    if not 0 <= s.guidance_until <= 1:
        raise UserError(
            f"{name('guidance_until')} is {s.guidance_until}; give the guided fraction of the image, in [0, 1]"
        )
    if not s.temperature >= MIN_TEMPERATURE:  # NaN too
        raise UserError(
            f"{name('temperature')} is {s.temperature}; "
            f"it must be above 0, at least {MIN_TEMPERATURE:g} (greedy decoding: {name('top_k')} 1)"
        )
    if s.top_k < 0:
        raise UserError(f"{name('top_k')} is {s.top_k}; use 0 (off) or a positive number of ids")
    if not 0 < s.top_p <= 1:
        raise UserError(f"{name('top_p')} is {s.top_p}; it must lie in (0, 1], 1 is off")
    check_seed(s.seed, name("seed"))
    if s.batch_size < 1:
        raise UserError(f"config key 'sample.batch_size' is {s.batch_size}; set it to 1 or more")
    if not (math.isfinite(s.edit_likelihood_weight) and s.edit_likelihood_weight >= 0):
        raise UserError(
            f"{name('edit_likelihood_weight')} is {s.edit_likelihood_weight}; use 0 (CLIP alone) or a positive weight"
        )
    if not (math.isfinite(s.guided_prior_weight) and s.guided_prior_weight >= 0):
        raise UserError(
            f"{name('guided_prior_weight')} is {s.guided_prior_weight}; use 0 (CLIP alone) or a positive weight"
        )
    if not (math.isfinite(s.guided_contrast_weight) and s.guided_contrast_weight >= 0):
        raise UserError(
            f"{name('guided_contrast_weight')} is {s.guided_contrast_weight}; "
            "use 0 (the prompt alone) or a positive weight"
        )
    if s.guided_optimizer not in GUIDED_OPTIMIZERS:
        raise UserError(
            f"config key 'sample.guided_optimizer' is '{s.guided_optimizer}'; use {', '.join(GUIDED_OPTIMIZERS)}"
        )
    if not (math.isfinite(s.guided_jacobi_lr) and s.guided_jacobi_lr >= 0):
        raise UserError(f"config key 'sample.guided_jacobi_lr' is {s.guided_jacobi_lr}; set it to 0 or more")
    if not 1 <= s.prior_samples <= MAX_PRIOR_SAMPLES:
        raise UserError(
            f"config key 'sample.prior_samples' is {s.prior_samples}; draw 1 to {MAX_PRIOR_SAMPLES} embeddings"
        )
    if not 1 <= s.guided_cutouts <= MAX_GUIDED_CUTOUTS:  # a crafted bundle's once asked for a 123 GB batch
        raise UserError(
            f"config key 'sample.guided_cutouts' is {s.guided_cutouts}; use 1 to {MAX_GUIDED_CUTOUTS} cutouts"
        )
    if not math.isfinite(s.prior_guidance_scale):
        raise UserError(f"{name('prior_guidance_scale')} is {s.prior_guidance_scale}; give a finite number (1: off)")
    if not (math.isfinite(s.variation_guidance_scale) and s.variation_guidance_scale >= 0):
        raise UserError(
            f"{name('variation_guidance_scale')} is {s.variation_guidance_scale}; give a finite number >= 0 "
            "(0: sample.guidance_scale)"
        )
    if not (math.isfinite(s.text_diff_scale) and 0 <= s.text_diff_scale <= 1):
        raise UserError(f"{name('text_diff_scale')} is {s.text_diff_scale}; give how far to turn the image, in [0, 1]")
    if s.decode not in DECODE_MODES:
        raise UserError(f"decode '{s.decode}' is unknown; use {', '.join(DECODE_MODES)}")


def _warn_repeats(prompt: str, images: torch.Tensor) -> None:
    """Warn when generation from random codes drew the same image from several starts: Jacobi steps of the
    prior lead many starts of one prompt to one image (docs/RESULTS.md, VQGAN+CLIP by Jacobi steps)."""
    distinct = len(distinct_first(images))
    if distinct < len(images):
        images_word = "image" if distinct == 1 else "images"
        warnings.warn(
            f"prompt '{prompt}' gave only {distinct} distinct {images_word} from {len(images)} random starts; "
            "Jacobi steps of the prior lead many starts to one image (another --seed gives others; "
            "--guided-optimizer adam gives different, less faithful ones)",
            stacklevel=3,
        )


class Pipeline:
    """Text tokenizer + transformer + image tokenizer + (optional) CLIP, on one device, ready to sample."""

    def __init__(
        self,
        cfg: RunConfig,
        text_tokenizer,
        transformer,
        image_tokenizer,
        clip=None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        decode: str | None = None,
        unclip=None,
        prior=None,
        relax: float | None = None,
    ):
        self.cfg = copy.deepcopy(cfg)  # its own: a setting of this pipeline never reaches the caller's config
        # how `generate` runs a decoding step and how far speculative decoding relaxes its test; None: the bundle's
        how = {k: v for k, v in (("decode", decode), ("speculative_relax", relax)) if v is not None}
        if how:
            self.cfg.sample = dataclasses.replace(cfg.sample, **how)
            check_settings(self.cfg.sample)
        self.text_tokenizer = text_tokenizer
        self.device = resolve_device(device)
        self.dtype = dtype
        # bf16/fp16: the transformer's weights themselves are cast (decoding one token at a time reads every
        # weight per step, so halving their bytes nearly halves its time; autocast would recast them per step)
        self.transformer = transformer.to(self.device, dtype=dtype).eval()
        self.image_tokenizer = image_tokenizer.to(self.device).eval()
        self.clip = clip  # a ClipScorer, or None: candidates stay in sample order
        # unCLIP's decoder (a DALLE reading CLIP image embeddings) and prior, or None: a bundle without them
        self.unclip = None if unclip is None else unclip.to(self.device, dtype=dtype).eval()
        self.unclip_prior = None if prior is None else prior.to(self.device).eval()
        self._warned_plain = False  # speculative decoding fell back to plain decoding (warned once)
        self._neighbours: dict[int, torch.Tensor] = {}  # the image tokenizer's nearest codes, by how many
        self._check_parts_agree()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "fp32",
        decode: str | None = None,
        relax: float | None = None,
    ) -> Pipeline:
        """Load a bundle (a folder, a shipped bundle's name such as "emoji", or None: shapes) onto `device`.

        dtype bf16 or fp16 casts the transformer's weights to it and runs the image tokenizer under autocast;
        CLIP stays fp32. decode (None: the bundle's sample.decode) "compiled" samples with a torch.compile'd
        decoding step (CUDA graphs on GPUs; the first batch pays the compile), "static" with the same step
        uncompiled, "cached" eagerly, "speculative" by speculative Jacobi decoding (fewer, wider passes; on
        the CPU only in bf16, fp32 decodes plainly there: `generate.window_width`). relax (None: the bundle's
        sample.speculative_relax) relaxes speculative decoding's test by that much probability mass (LANTERN).
        A bundle without clip.safetensors loads with a warning; its candidates are not reranked.
        """
        path = bundle_path(path)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        cfg = read_bundle_config(path)
        check_settings(cfg.sample, f"model '{path}' (its config.json)")  # before any weight is read
        text_tokenizer = load_text_tokenizer(path, cfg)
        transformer = load_transformer(path)
        image_tokenizer = load_vae(path)
        clip = None
        if (Path(path) / "clip.safetensors").is_file():
            clip = load_clip(path, device=dev)
        else:
            warnings.warn(
                f"model folder '{path}' has no clip.safetensors, so candidates are kept in sample order "
                "and clip_score is None",
                stacklevel=2,
            )
        unclip = load_transformer(path, "unclip") if (Path(path) / FILES["unclip"]).is_file() else None
        prior = load_prior(path) if (Path(path) / FILES["prior"]).is_file() else None
        return cls(
            cfg, text_tokenizer, transformer, image_tokenizer, clip, dev, torch_dtype, decode, unclip, prior, relax
        )

    def _check_parts_agree(self) -> None:
        for model in (self.transformer, self.unclip):
            if model is not None:
                self._check_model_fits(model.cfg, "transformer" if model is self.transformer else "unCLIP decoder")
        if self.unclip is not None and self.clip is not None:
            side = self.cfg.unclip.grid
            gives = self.clip.embed_dim() + self.clip.grid_dim(side)
            if self.unclip.cfg.cond_dim != gives:
                what = f"{self.clip.embed_dim()}" + (
                    f" and a {side}x{side} grid of {self.clip.grid_dim(side)}" if side else ""
                )
                raise UserError(
                    f"the unCLIP decoder reads {self.unclip.cfg.cond_dim} numbers but this bundle's CLIP gives {what} "
                    "(unclip.grid in config.json); use a bundle whose parts were trained together"
                )

        prior = self.unclip_prior
        if prior is not None and self.clip is not None:  # a prior left from an earlier CLIP or text tokenizer
            text, vocab, width = self.text_tokenizer, prior.text_emb.num_embeddings, self.clip.embed_dim()
            for bad, detail in (
                (prior.embed_dim != width, f"embeddings of {prior.embed_dim}, not {width}"),
                (prior.text_len != text.text_len, f"captions of {prior.text_len} ids, not {text.text_len}"),
                (vocab < text.vocab_size, f"a text vocabulary of {vocab}, not {text.vocab_size}"),
            ):
                if bad:
                    raise UserError(
                        f"prior.safetensors was trained on {detail}: another CLIP or text tokenizer than this "
                        "bundle's; train the prior again (python -m train.prior) with this bundle's parts"
                    )

    def _check_model_fits(self, m, what: str) -> None:
        text, image = self.text_tokenizer, self.image_tokenizer
        grid = image.grid(self.cfg.data.image_size)
        problems = [
            (m.text_len != text.text_len, f"text length {m.text_len} vs {text.text_len}"),
            (m.text_vocab < text.vocab_size, f"text vocabulary {m.text_vocab} vs {text.vocab_size}"),
            (m.image_vocab != image.codebook_size, f"image vocabulary {m.image_vocab} vs {image.codebook_size}"),
            (
                tuple(m.image_factors) != image.group_sizes,
                f"image code groups {m.image_factors} vs {list(image.group_sizes)}",
            ),
            ((m.grid_h, m.grid_w) != grid, f"grid {m.grid_h}x{m.grid_w} vs {grid[0]}x{grid[1]}"),
        ]
        for bad, detail in problems:
            if bad:
                raise UserError(
                    f"the {what} does not fit this bundle's tokenizers ({detail}); "
                    "use a bundle whose parts were trained together"
                )

    # -- the parts ---------------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) codes per image."""
        return self.transformer.cfg.grid_h, self.transformer.cfg.grid_w

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """A prompt as text ids (1, t) on the device; a truncated prompt warns how many tokens were dropped."""
        ids, dropped = self.text_tokenizer.encode_with_info([prompt])
        if dropped[0]:
            warnings.warn(
                f"prompt '{prompt}' is longer than the model's {self.text_tokenizer.text_len} text tokens; "
                f"{dropped[0]} tokens were dropped from its end",
                stacklevel=2,
            )
        return ids.to(self.device)

    def encode_image(self, image: str | os.PathLike | Image.Image) -> torch.Tensor:
        """An image (file path or PIL) as codes (h, w) at the model's resolution, on the CPU."""
        from ..clip.uses import read_image  # one-sentence errors for missing or unreadable files

        return self._encode_pixels(read_image(image, self.cfg.data.image_size))

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """An image (3, S, S) in [0, 1] at the model's resolution as codes (h, w), on the CPU."""
        with torch.inference_mode(), self._autocast():
            return self.image_tokenizer.encode(pixels[None].to(self.device))[0].cpu()

    def sample_ids(
        self,
        text: torch.Tensor,
        s: SampleConfig,
        generator: torch.Generator,
        prime: torch.Tensor | None = None,
        bar: tqdm | None = None,
        cond: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        redraw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`s.candidates` image code sequences (m, n) for one prompt's text ids (1, t), in batches; with cond,
        one CLIP image embedding per candidate (m, e), drawn by unCLIP's decoder; with keep (1, n) and redraw
        (n,) bool, only the redrawn cells sampled (`generate`)."""
        null = self.text_tokenizer.null_ids()[None].to(self.device)  # (1, t)
        w = self.grid[1]
        model = self.transformer if cond is None else self.unclip
        out = []
        for start in range(0, s.candidates, s.batch_size):
            b = min(s.batch_size, s.candidates - start)
            stats: dict[str, int] = {}
            ids = generate(
                model,
                text.expand(b, -1),
                cond=None if cond is None else cond[start : start + b].to(self.device),
                null_text=null,
                guidance_scale=s.guidance_scale,
                guidance_until=s.guidance_until,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                generator=generator,
                prime=None if prime is None else prime.to(self.device).expand(b, -1),
                keep=None if keep is None else keep.to(self.device).expand(b, -1),
                redraw=None if redraw is None else redraw.to(self.device),
                on_row=None if bar is None else (lambda r, so_far: bar.update(so_far.shape[0] * w)),
                decode=s.decode,
                relax=s.speculative_relax,  # above 0 only with decode "speculative" (check_settings)
                neighbours=self.nearest_codes(s.speculative_neighbours) if s.speculative_relax > 0 else None,
                stats=stats,
            )
            if s.decode == "speculative" and stats["window"] == 1:
                self._warn_plain(stats["rows"], s.speculative_relax)
            out.append(ids.cpu())
        return torch.cat(out)  # (m, n)

    def nearest_codes(self, k: int) -> torch.Tensor:
        """Each image code's k nearest codes, itself first (`ImageTokenizer.nearest_codes`), computed once."""
        if k not in self._neighbours:
            self._neighbours[k] = self.image_tokenizer.nearest_codes(k).to(self.device)
        return self._neighbours[k]

    def _warn_plain(self, rows: int, relax: float) -> None:
        """Warn once that speculative decoding ran plainly (exactly, so a relaxed test relaxed nothing): its window
        was 1 cell for a batch of `rows` here."""
        if self._warned_plain:
            return
        self._warned_plain = True
        dtype = str(self.dtype).removeprefix("torch.")
        exact = f" (exact: --relax {relax} changes nothing)" if relax > 0 else ""
        warnings.warn(
            f"speculative decoding runs as plain cached decoding{exact} for {rows} model rows in {dtype} on "
            f"{self.device.type}: a wider pass would cost more than it saves here (on the CPU it pays in bf16, "
            f"--dtype bf16, for at most {MAX_SPECULATIVE_ROWS_CPU} model rows per batch; a candidate is one row, two "
            "under guidance)",
            stacklevel=4,
        )

    def candidates(
        self,
        parts: list[tuple[str, float]],
        s: SampleConfig,
        generator: torch.Generator,
        prime: torch.Tensor | None = None,
        bar: tqdm | None = None,
        method: str = "ar",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A (weighted) prompt's `s.candidates` samples in sample order: code ids (m, n), images (m, 3, H, W)
        and CLIP's scores (m,), None without CLIP. Sampling reads the prompt's top-weighted part; under method
        "unclip" through the prior (one image embedding per candidate) and the decoder."""
        prompt = max(parts, key=lambda part: part[1])[0]
        text = self.encode_prompt(prompt)
        cond = None
        if method == "unclip":
            drawn = self.prior_embeddings(
                prompt, s.candidates, generator, text, s.prior_guidance_scale, s.prior_samples
            )
            cond = self.decoder_input(drawn)
        ids = self.sample_ids(text, s, generator, prime, bar, cond)  # (m, n)
        images = self.decode(ids)  # (m, 3, H, W)
        return ids, images, self._score(images, parts)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes (m, n) or (m, h, w) -> images (m, 3, H, W) float32 in [0, 1], on the CPU, in batches."""
        h, w = self.grid
        out = []
        for chunk in ids.reshape(-1, h, w).split(max(1, self.cfg.sample.batch_size)):
            with torch.inference_mode(), self._autocast():
                out.append(self.image_tokenizer.decode(chunk.to(self.device)).float().cpu())
        return torch.cat(out)

    # -- the whole pipeline --------------------------------------------------------------------

    def settings(self, **overrides) -> SampleConfig:
        """The bundle's `sample` section with every override that is not None, checked; a name that is no sampling
        setting is one sentence (dataclasses' TypeError named SampleConfig.__init__)."""
        known = {f.name for f in dataclasses.fields(SampleConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(
                f"'{unknown[0]}' is not a sampling setting here; give keys of the config's sample section, e.g. "
                "candidates, num_images, guidance_scale, temperature, seed"
            )
        s = dataclasses.replace(self.cfg.sample, **{k: v for k, v in overrides.items() if v is not None})
        check_settings(s)
        return s

    def generate(
        self,
        prompts: Sequence[str] | str,
        *,
        num_images: int | None = None,
        candidates: int | None = None,
        guidance_scale: float | None = None,
        guidance_until: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        decode: str | None = None,
        guided_prior_weight: float | None = None,
        guided_optimizer: str | None = None,
        guided_contrast_weight: float | None = None,
        guided_contrast_guard: bool | None = None,
        prior_guidance_scale: float | None = None,
        method: str = "ar",
        init: str = "samples",
        init_image: str | os.PathLike | Image.Image | None = None,
        keep_rows: int | None = None,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Result]]:
        """For each prompt, its best `num_images` of `candidates` samples, best first (None: bundle default).

        method: "ar" (sample and rerank), "clip-guided" (then refine the kept ones with CLIP) or "unclip" (the
            prior's image embeddings drawn by unCLIP's decoder, then reranked).
        init: what clip-guided refinement starts from: "samples" (the kept samples) or "random" (uniformly
            random codes, no sampling: VQGAN+CLIP as Pixray runs it).
        init_image, keep_rows: complete an image from its top keep_rows rows of codes (1 .. h-1; None: h // 2).
        progress: tqdm bars on stderr over prompts and tokens (and guided steps).
        should_stop: asked at each image row sampled; when it answers true, `Stopped` is raised (a server's client
            gone). Refinement's steps are not asked.
        """
        prompts = check_prompts(prompts)
        if init == "random":  # no samples: refinement starts from num_images random codes
            for flag, value in (("--candidates", candidates), ("--temperature", temperature), ("--top-k", top_k),
                                ("--top-p", top_p)):  # fmt: skip
                if value is not None:
                    raise UserError(
                        f"{flag} shapes how candidates are sampled, and --init random samples none; leave it out"
                    )
            candidates = num_images if num_images is not None else self.cfg.sample.num_images
            if not 1 <= candidates <= MAX_CANDIDATES:  # named as what the user gave: --candidates is refused here
                raise UserError(
                    f"--num-images is {candidates}; --init random refines that many random starts: use 1 to "
                    f"{MAX_CANDIDATES}"
                )
        s = self.settings(
            num_images=num_images,
            candidates=candidates,
            guidance_scale=guidance_scale,
            guidance_until=guidance_until,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            decode=decode,
            guided_prior_weight=guided_prior_weight,
            guided_optimizer=guided_optimizer,
            guided_contrast_weight=guided_contrast_weight,
            guided_contrast_guard=guided_contrast_guard,
            prior_guidance_scale=prior_guidance_scale,
        )
        if method not in METHODS:
            raise UserError(f"method '{method}' is unknown; use {', '.join(METHODS)}")
        if method == "clip-guided" and self.clip is None:
            raise UserError("clip-guided generation needs a bundle with clip.safetensors; use --method ar")
        if method == "unclip":
            self.require_unclip("--method unclip", prior=True)
            if init_image is not None:
                raise UserError("--method unclip does not complete images; leave out --init-image or use --method ar")
        if init not in INITS:
            raise UserError(f"init '{init}' is unknown; use {' or '.join(INITS)}")
        if method == "clip-guided" and s.guided_optimizer == "jacobi" and not s.guided_prior_weight > 0:
            raise UserError(
                "--guided-optimizer jacobi moves along the transformer's predictions, and the prior weight is "
                f"{s.guided_prior_weight}; give --guided-prior-weight above 0 or use --guided-optimizer adam"
            )
        if init == "random" and (method != "clip-guided" or init_image is not None):
            raise UserError(
                "--init random starts CLIP-guided generation from random codes; use it with "
                "--method clip-guided and without --init-image"
            )
        if init == "random" and not refines_by_jacobi(s, init):  # nothing is sampled, and no prior is read
            for flag, value in (("--guidance-scale", guidance_scale), ("--guidance-until", guidance_until)):
                if value is not None:
                    raise UserError(
                        f"{flag} guides the transformer's predictions, which refinement of random codes by Adam "
                        "(--guided-prior-weight 0 or --guided-optimizer adam) never reads; leave it out"
                    )
        prime = self._prime(init_image, keep_rows)
        keep_rows = 0 if prime is None else prime.shape[1] // self.grid[1]
        parts = [self._parts(p, method) for p in prompts]
        if method == "clip-guided" and reads_contrast(s):  # a prompt with no contrast, before any sampling
            for prompt_parts in parts:
                self.contrast_captions(max(prompt_parts, key=lambda part: part[1])[0])

        h, w = self.grid
        bar = _Bar.over(len(prompts) * s.candidates * h * w, "sample", progress, should_stop)
        results = []
        with bar:
            for i, (prompt, prompt_parts) in enumerate(zip(prompts, parts)):
                bar.set_description(f"prompt {i + 1}/{len(prompts)}")
                generator = torch.Generator().manual_seed(s.seed + i)
                if init == "random":
                    from .guided import random_codes

                    ids = random_codes(self.image_tokenizer.codebook_size, s.num_images, h, w, generator)
                    ids, images, scores = self._refine(ids, prompt_parts, s, generator, 0, progress, init)
                    _warn_repeats(prompt, images)
                    results.append(self._results(prompt, s.seed + i, ids, images, scores))
                    continue
                draw = functools.partial(self.candidates, prompt_parts, s, generator, prime, bar, method)
                ids, images, scores, tiers = self._distinct(prompt, draw, s, bar)
                order = ranked(scores, tiers)
                if method == "clip-guided":
                    ids, images, scores = self._refine_distinct(
                        prompt, ids.view(-1, h, w)[order], prompt_parts, s, generator, keep_rows, progress
                    )
                else:
                    keep = kept_order(order, s.num_images)
                    ids, images = ids[keep].view(-1, h, w), images[keep]
                    scores = None if scores is None else scores[keep]
                results.append(self._results(prompt, s.seed + i, ids, images, scores))
        return results

    def _distinct(self, prompt: str, draw, s: SampleConfig, bar, again=None, exclude=None):
        """The (ids, images, scores, tiers) of `draw()` (one round of candidates) with identical images counted
        once (the first in sample order kept): identical code sequences, and also different codes that decode to
        the same pixels (a background cell has several).

        While fewer than `s.num_images` are distinct, another round is drawn by `again()` (None: `draw()`; the
        same generator, so new samples), up to MAX_EXTRA_ROUNDS; a warning names `prompt` when that was not enough.
        exclude: images (r, 3, H, W) that do not count as new (a variation's source as the tokenizer draws it):
        rounds are drawn until `s.num_images` others differ, and a copy of one is kept only when too few others
        came. tiers, for `ranked`: 0 a first-round candidate, 1 an extra round's, 2 a copy. The extra rounds only
        fill places: the first image is the first round's best whatever `s.num_images` asks for.
        """
        rounds = [draw()]
        while True:
            ids, images = torch.cat([r[0] for r in rounds]), torch.cat([r[1] for r in rounds])
            first = distinct_first(images)
            copies = torch.zeros(len(first), dtype=torch.bool)  # which of first are copies of an excluded image
            if exclude is not None:
                new = distinct_first(torch.cat([exclude, images])) - len(exclude)
                copies = ~torch.isin(first, new)
            enough = len(first) - int(copies.sum()) >= s.num_images
            if enough or len(rounds) > MAX_EXTRA_ROUNDS:
                break
            if bar is not None:
                bar.total += s.candidates * ids.shape[1]
            rounds.append((again or draw)())
        if enough:  # the copies are not needed
            first, copies = first[~copies], copies[~copies]
        if len(first) < s.num_images:
            images_word = "image" if len(first) == 1 else "images"
            warnings.warn(
                f"prompt '{prompt}' gave only {len(first)} distinct {images_word} in {len(ids)} samples; "
                f"some of its {s.num_images} images repeat (raise --temperature or lower --num-images)",
                stacklevel=3,
            )
        extra = torch.cat([torch.full((len(r[0]),), k > 0) for k, r in enumerate(rounds)])[first]
        tiers = extra.long() + 2 * copies.long()
        scores = None if rounds[0][2] is None else torch.cat([r[2] for r in rounds])[first]
        return ids[first], images[first], scores, tiers

    def _prime(self, init_image, keep_rows: int | None) -> torch.Tensor | None:
        """The kept codes (1, keep_rows * w) of the init image (keep_rows None: half its rows), or None."""
        h, w = self.grid
        if init_image is None:
            if keep_rows is not None:
                raise UserError("--keep-rows needs an image to complete; pass --init-image PNG or leave it out")
            return None
        keep_rows = h // 2 if keep_rows is None else keep_rows
        if not 1 <= keep_rows < h:
            raise UserError(f"--keep-rows is {keep_rows}, outside this model's grid of {h} rows; pass 1 to {h - 1}")
        return self.encode_image(init_image).reshape(1, h * w)[:, : keep_rows * w]

    @staticmethod
    def _parts(prompt: str, method: str) -> list[tuple[str, float]]:
        if method == "clip-guided":
            from .guided import parse_weighted_prompt

            return parse_weighted_prompt(prompt)
        return [(prompt, 1.0)]  # a plain prompt is taken literally, '|' and ':' included

    def _score(self, images: torch.Tensor, parts: list[tuple[str, float]]) -> torch.Tensor | None:
        if self.clip is None:
            return None
        if len(parts) == 1 and parts[0][1] == 1.0:
            return self.clip.score(images, parts[0][0])
        from .guided import weighted_score

        return weighted_score(self.clip, images, parts)

    def prior(self, prompt: str):
        """Code weights (b, n, K_1 + .. + K_G) -> the transformer's mean log-likelihood of them given `prompt`
        (b,): refinement's prior term (`guided.refine`)."""
        text = self.encode_prompt(prompt)  # (1, t)

        def log_likelihood(weights: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.transformer.code_log_likelihood(text.expand(weights.shape[0], -1), weights.to(self.device))

        return log_likelihood

    def cell_log_probs(self, prompt: str, guidance_scale: float = 1.0, guidance_until: float = 1.0, first: int = 0):
        """Image ids (b, n) -> the transformer's log-probabilities (b, n, image_vocab) of every code at every
        cell given `prompt` and the cells before it, twice: with classifier-free guidance on the first
        guidance_until of the cells from `first` on (the kept cells before it are not drawn) as sampling has it
        (1: off), which refinement's Jacobi updates move by, and without, which its prior term reads
        (`guided.refine`); the same tensor when unguided."""
        text = self.encode_prompt(prompt)  # (1, t)
        null = self.text_tokenizer.null_ids()[None].to(self.device)  # (1, t)
        n = self.transformer.cfg.image_len
        cells = torch.arange(n, device=self.device)
        guided = (cells >= first) & (cells < guided_stop(first, n, guidance_until))  # (n,), as `generate` counts

        def log_probs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids = ids.to(self.device)
            with self._autocast():
                cond = self.transformer.cell_log_probs(text.expand(ids.shape[0], -1), ids)
                if guidance_scale == 1:
                    return cond, cond
                uncond = self.transformer.cell_log_probs(null.expand(ids.shape[0], -1), ids)
            mixed = (uncond + guidance_scale * (cond - uncond)).log_softmax(dim=-1)
            return torch.where(guided[:, None], mixed, cond), cond

        return log_probs

    def refine(
        self, ids, parts, s: SampleConfig, generator, keep_rows: int = 0, progress: bool = False, init="samples"
    ):
        """CLIP-guided refinement (`guided.refine`) of codes (m, h, w) with the settings' steps, lr, cutouts,
        prior weight, contrast and optimiser (the prior and the contrast captions of the top-weighted part):
        (ids, images, CLIP scores), in the starts' order. init: what the codes are, "samples" or "random" (the
        "auto" optimiser's choice). The jacobi optimiser needs the prior; with a prior weight of 0 refinement is
        CLIP's alone, by Adam, as published."""
        from .guided import refine

        prompt = max(parts, key=lambda part: part[1])[0]
        use_prior = s.guided_prior_weight > 0
        jacobi = refines_by_jacobi(s, init)
        return refine(
            self.image_tokenizer,
            self.clip,
            parts,
            ids,
            steps=s.guided_steps,
            lr=s.guided_jacobi_lr if jacobi else s.guided_lr,
            cutouts=s.guided_cutouts,
            generator=generator,
            keep_rows=keep_rows,
            progress=progress,
            prior=self.prior(prompt) if use_prior else None,
            prior_weight=s.guided_prior_weight,
            optimizer="jacobi" if jacobi else "adam",
            cell_log_probs=self.cell_log_probs(prompt, s.guidance_scale, s.guidance_until, keep_rows * self.grid[1])
            if jacobi
            else None,
            contrast=self.contrast_captions(prompt) if reads_contrast(s) else (),
            contrast_weight=s.guided_contrast_weight,
            contrast_guard=s.guided_contrast_guard,
            flips=self.mirrors_keep([text for text, _ in parts]),
        )

    def mirrors_keep(self, texts: Sequence[str]) -> bool:
        """Whether a mirror image keeps every text true, so that refinement's cutouts may be flipped: none mentions
        left or right, and none is a caption the bundle's `data.encode_flip_exclude` keeps from mirror images
        (emoji-styles: `letter j`, `keycap 5`, `man walking facing right`), matched as the text tokenizer reads it."""
        from ..data.streams import caption_regex
        from .guided import mentions_sides

        exclude = caption_regex(self.cfg.data, "encode_flip_exclude")
        read = [t.lower() if self.cfg.text.lowercase else t for t in texts]
        return not mentions_sides(texts) and not (exclude and any(exclude.search(t) for t in read))

    def contrast_captions(self, prompt: str) -> list[str]:
        """The captions clip-guided refinement contrasts `prompt` with (`sample.guided_contrast_weight`): on shapes
        every one-word edit of it (`shapes.negatives.every_edit`), elsewhere the prompt with its phrase of
        `clip.swap_phrases` swapped for each other one (emoji-styles: its style for every other style)."""
        from ..clip.negatives import every_swap
        from ..shapes.negatives import every_edit

        shapes = self.cfg.data.source == "shapes"
        made = every_edit(prompt) if shapes else every_swap(prompt, self.cfg.clip.swap_phrases)
        if not made:
            what = "no word a shapes caption can edit" if shapes else "none of the bundle's clip.swap_phrases"
            raise UserError(
                f"the prompt '{prompt}' has {what}, so clip-guided refinement has no caption to contrast it with; "
                "set --guided-contrast-weight to 0 (and sample.guided_contrast_guard to false) or name what the "
                "bundle's captions name"
            )
        return made

    def _refine(self, ids, parts, s: SampleConfig, generator, keep_rows: int, progress: bool, init="samples"):
        """`refine`, best CLIP score first."""
        ids, images, scores = self.refine(ids, parts, s, generator, keep_rows, progress, init)
        order = scores.sort(descending=True, stable=True)[1]
        return ids[order], images[order], scores[order]

    def _refine_distinct(self, prompt: str, ranked, parts, s: SampleConfig, generator, keep_rows: int, progress: bool):
        """`_refine` of the best `s.num_images` of `ranked` (distinct candidates' codes (m, h, w), best first).
        Refinement can lead several starts to one image: each image that repeats an earlier one gives way to the
        refinement of the next candidate while any remain; then, the last resort, `kept_order`'s repeats and a
        warning naming `prompt`."""
        ids, images, scores = self.refine(ranked[: s.num_images], parts, s, generator, keep_rows, progress)
        used = min(s.num_images, len(ranked))
        while True:
            first = distinct_first(images)
            ids, images, scores = ids[first], images[first], scores[first]
            missing = s.num_images - len(first)
            if missing <= 0 or used == len(ranked):
                break
            more = self.refine(ranked[used : used + missing], parts, s, generator, keep_rows, progress)
            used = min(used + missing, len(ranked))
            ids, images, scores = (torch.cat([a, b]) for a, b in zip((ids, images, scores), more))
        if len(first) < min(s.num_images, len(ranked)):  # fewer candidates than that: _distinct said so already
            images_word = "image" if len(first) == 1 else "images"
            warnings.warn(
                f"prompt '{prompt}': CLIP-guided refinement of {used} candidates gave only {len(first)} distinct "
                f"{images_word}, so some of its {s.num_images} images repeat "
                "(raise --candidates or lower --num-images)",
                stacklevel=3,
            )
        keep = kept_order(scores.sort(descending=True, stable=True)[1], s.num_images)
        return ids[keep], images[keep], scores[keep]

    # -- editing: redraw the masked cells of an image -------------------------------------------------

    def edit(
        self,
        prompts: Sequence[str] | str,
        image: str | os.PathLike | Image.Image,
        mask: str | os.PathLike | Image.Image,
        *,
        likelihood_weight: float | None = None,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
        **overrides,
    ) -> list[list[Result]]:
        """For each prompt, `image` with the cells under `mask`'s white part redrawn (inpainting; outpainting
        with `edit.extend_canvas`): its best `num_images` of `candidates`, best first. mask: an image of the
        image's size, white (>= 128) where to redraw; a cell of the code grid is redrawn when any of its pixels
        is white, the others keep the image's codes and, in the result, its exact pixels.

        The transformer samples the redrawn cells in raster order, each seeing the kept cells before it (the
        kept ones forced). A redrawn cell cannot see the kept cells after it, so candidates are ranked by CLIP
        plus likelihood_weight (None: the bundle's sample.edit_likelihood_weight) times the transformer's mean
        log-likelihood of those later kept cells given the rest: a region that agrees with what follows it.
        Result.clip_score is CLIP's part. overrides: sampling settings as in `generate` (not decode speculative).
        should_stop: as `generate`'s.
        """
        prompts = check_prompts(prompts)
        s = self.settings(edit_likelihood_weight=likelihood_weight, **overrides)
        if s.decode == "speculative":
            raise UserError("editing samples the masked cells one pass at a time; use --decode cached, not speculative")
        source = self.edit_source(image, mask)
        h, w = self.grid
        bar = _Bar.over(len(prompts) * s.candidates * h * w, "edit", progress, should_stop)
        results = []
        with bar:
            for i, prompt in enumerate(prompts):
                bar.set_description(f"edit {i + 1}/{len(prompts)}")
                generator = torch.Generator().manual_seed(s.seed + i)
                draw = functools.partial(self.edit_candidates, prompt, source, s, generator, bar)
                ids, images, terms, tiers = self._distinct(prompt, draw, s, bar)
                keep = kept_order(ranked(terms[:, 0] + s.edit_likelihood_weight * terms[:, 1], tiers), s.num_images)
                clip = None if self.clip is None else terms[keep, 0]
                results.append(self._results(prompt, s.seed + i, ids[keep].view(-1, h, w), images[keep], clip))
        return results

    def edit_source(self, image, mask) -> EditSource:
        """The image at the model's resolution, its codes and the cells the mask redraws (`EditSource`)."""
        from ..clip.uses import open_image
        from .edit import mask_cells

        pil = open_image(image, "image")
        cells = mask_cells(open_image(mask, "mask"), pil, self.cfg.data.image_size, self.grid)
        pixels = prepare_image(pil, self.cfg.data.image_size)
        return EditSource(pixels, self._encode_pixels(pixels).reshape(1, -1), cells)

    def edit_candidates(self, prompt: str, source: EditSource, s: SampleConfig, generator, bar=None):
        """One round of `s.candidates` edits of `source`, its redrawn cells sampled: ids (m, n), images
        (m, 3, S, S) with the source pasted over the kept cells, and the ranking's two terms (m, 2): CLIP's
        score (0 without CLIP) and the transformer's mean log-likelihood of the kept cells after the first
        redrawn one given the prompt (0 when there is none)."""
        from .edit import later_log_likelihood, paste_kept

        text = self.encode_prompt(prompt)
        cells = source.cells.reshape(-1)
        ids = self.sample_ids(text, s, generator, bar=bar, keep=source.ids, redraw=cells)  # (m, n)
        images = paste_kept(self.decode(ids), source.pixels, source.cells)
        terms = torch.zeros(len(ids), 2)
        if self.clip is not None:
            terms[:, 0] = self.clip.score(images, prompt)
        with torch.inference_mode(), self._autocast():
            terms[:, 1] = later_log_likelihood(self.transformer, text.expand(len(ids), -1), ids.to(self.device), cells)
        return ids, images, terms

    # -- unCLIP (DALL-E 2): images from CLIP image embeddings ------------------------------------------

    def require_unclip(self, what: str, prior: bool = False) -> None:
        parts = (("unclip", self.unclip), ("prior", self.unclip_prior if prior else 0))
        missing = [name for name, part in parts if part is None]
        if self.clip is None:
            missing.append("clip")
        if missing:
            files = " and ".join(FILES[name] for name in missing)
            raise UserError(
                f"{what} needs unCLIP's parts, and this bundle has no {files}; train them with "
                "`python -m train.unclip` and `python -m train.prior`, or use a bundle that has them (shapes)"
            )

    def prior_embeddings(
        self,
        prompt: str,
        n: int,
        generator: torch.Generator,
        text: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        samples: int | None = None,
    ) -> torch.Tensor:
        """n CLIP image embeddings (n, e) the prior draws for a prompt, on the CPU; text: the prompt's ids (1, t)
        when the caller has them. guidance_scale: on the prior; samples: embeddings drawn per one returned, the
        one nearest the prompt's text embedding kept (DALL-E 2 draws 2); None: the bundle's
        sample.prior_guidance_scale and sample.prior_samples."""
        scale = self.cfg.sample.prior_guidance_scale if guidance_scale is None else guidance_scale
        k = self.cfg.sample.prior_samples if samples is None else samples
        text = (self.encode_prompt(prompt) if text is None else text).expand(n * k, -1)
        text_emb = self.clip.embed_texts([prompt]).to(self.device)  # (1, e)
        drawn = self.unclip_prior.sample(text, text_emb.expand(n * k, -1), generator=generator, guidance_scale=scale)
        drawn = drawn.view(k, n, -1)  # sample j of candidate i at [j, i]: k = 1 draws what it always drew
        best = (drawn @ text_emb[0].to(drawn.dtype)).argmax(dim=0)  # (n,)
        return drawn[best, torch.arange(n)].cpu()

    @staticmethod
    def _image_list(images) -> list:
        """`images` as a list: one image (a path, a PIL image, an array) is a list of itself, as one prompt is."""
        if images is None or isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            return [] if images is None else [images]
        return list(images)

    def _read_images(self, images: Sequence[str | os.PathLike | Image.Image]) -> torch.Tensor:
        """Image files or PIL images as pixels (m, 3, S, S) in [0, 1] at the model's resolution."""
        images = self._image_list(images)
        if not images:
            raise UserError("no image was given; pass at least one PNG or JPEG file")
        from ..clip.uses import read_image

        return torch.stack([read_image(im, self.cfg.data.image_size) for im in images])

    def image_embeddings(self, images: Sequence[str | os.PathLike | Image.Image]) -> torch.Tensor:
        """CLIP image embeddings (m, e) of image files or PIL images, at the model's resolution."""
        return self.clip.embed_images(self._read_images(images))

    def as_drawn(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (m, 3, S, S) in [0, 1] as the image tokenizer draws them (encode, decode; eval emoji's
        `reconstructed`): what the unCLIP decoder reads of a source. Its training embeddings are of images drawn so
        (`train.embed`), and CLIP's features of a source drawn another way (hard edges, another palette) read to the
        decoder as another image. Candidates are still ranked against the source as given: against its drawn self,
        the source's own codes would always win."""
        ids = []
        for chunk in pixels.split(max(1, self.cfg.sample.batch_size)):  # as `decode`, in batches
            with torch.inference_mode(), self._autocast():
                ids.append(self.image_tokenizer.encode(chunk.to(self.device)).cpu())
        return self.decode(torch.cat(ids))

    def decoder_input(self, embeddings: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """What the unCLIP decoder reads for CLIP image embeddings (m, e): the embeddings, and with `unclip.grid`
        CLIP's spatial features after them (m, G); grid None: zeros, the dropped grid (every use but variations)."""
        side = self.cfg.unclip.grid
        if not side:
            return embeddings
        if grid is None:
            grid = embeddings.new_zeros(embeddings.shape[0], self.clip.grid_dim(side))
        return torch.cat([embeddings, grid.to(embeddings.dtype)], dim=1)

    def _from_embedding(self, cond: torch.Tensor, targets: torch.Tensor, s: SampleConfig, generator, bar):
        """One round of `s.candidates` images drawn by the decoder from one input cond (`decoder_input`), without a
        caption: (ids, images, scores), the score of an image its best CLIP image similarity to the rows of targets
        (r, e)."""
        null = self.text_tokenizer.null_ids()[None].to(self.device)
        ids = self.sample_ids(null, s, generator, bar=bar, cond=cond[None].expand(s.candidates, -1))
        images = self.decode(ids)
        scores = (self.clip.embed_images(images) @ targets.T).max(dim=1).values
        return ids, images, scores

    def _kept(
        self, label: str, seed: int, cond, targets, s: SampleConfig, generator, bar, t=None, source=None
    ) -> list[Result]:
        """The best `s.num_images` distinct images the decoder draws from the embedding cond (`_from_embedding`),
        best first. When a round gives fewer distinct images (an embedding can pin a simple image down), the
        extra rounds draw looser, at temperatures 1, 1.25, 1.5, 1.75 (or the settings' own, if higher): a variation is
        a new image, not the same one again, and CLIP's ranking keeps the looser draws only where needed.
        source: a variation's source as the tokenizer draws it (1, 3, H, W); a candidate identical to it is no
        variation and is left out."""
        draw = functools.partial(self._from_embedding, cond, targets, s, generator, bar)
        temperatures = iter(max(1.0, s.temperature) + 0.25 * j for j in range(MAX_EXTRA_ROUNDS))

        def again():
            looser = dataclasses.replace(s, temperature=next(temperatures))
            return self._from_embedding(cond, targets, looser, generator, bar)

        ids, images, scores, tiers = self._distinct(label, draw, s, bar, again, exclude=source)
        keep = kept_order(ranked(scores, tiers), s.num_images)
        h, w = self.grid
        results = self._results(label, seed, ids[keep].view(-1, h, w), images[keep], scores[keep])
        for r in results:
            r.t = t
        return results

    def _embedding_settings(self, what: str, overrides: dict) -> SampleConfig:
        self.require_unclip(what)
        return self.settings(**overrides)

    def variations(
        self,
        images: Sequence[str | os.PathLike | Image.Image],
        *,
        text_diff: tuple[str, str] | None = None,
        text_diff_scale: float | None = None,
        progress: bool = True,
        **overrides,
    ) -> list[list[Result]]:
        """For each image, `num_images` new images drawn from its CLIP embedding (unCLIP's variations), the best
        of `candidates` by CLIP image similarity to that embedding, best first. Image i uses seed + i. The
        embedding is of the image as the image tokenizer draws it (`as_drawn`), as in the decoder's training.

        text_diff=(a, b): a text diff (DALL-E 2, section 3.3): the image's embedding is first turned toward the
        difference of the captions' text embeddings, slerp(image, normalise(text(b) - text(a)), text_diff_scale)
        (None: the bundle's `sample.text_diff_scale`), and the images are drawn from and ranked by that.
        overrides: sampling settings as in `generate` (num_images, candidates, guidance_scale, temperature, seed ..);
        without a guidance_scale, variations (not text diffs) are guided by `sample.variation_guidance_scale`.
        """
        own = self.cfg.sample.variation_guidance_scale
        if overrides.get("guidance_scale") is None and text_diff is None and own > 0:
            overrides = overrides | {"guidance_scale": own}
        s = self._embedding_settings("--variations", overrides | {"text_diff_scale": text_diff_scale})
        images = self._image_list(images)  # once: a generator is read only once
        given = self._read_images(images)
        pixels = self.as_drawn(given)
        # with unclip.grid, a variation keeps where things are: the decoder reads the source's spatial features too;
        # a text diff changes what the grid shows (a color, a shape), so it reads the embedding alone
        if self.cfg.unclip.grid and text_diff is None:
            sources, grid = self.clip.embed_images_and_grid(pixels, self.cfg.unclip.grid)
        else:
            sources, grid = self.clip.embed_images(pixels), None
        if text_diff is not None:
            if any(not str(c).strip() for c in text_diff):
                raise UserError("--text-diff needs two non-empty captions, from and to: 'a red circle' 'a blue circle'")
            from ..model.prior import slerp

            a, b = self.clip.embed_texts(list(text_diff))
            sources = slerp(sources, torch.nn.functional.normalize(b - a, dim=-1).expand_as(sources), s.text_diff_scale)
        # what candidates are ranked by: the source as given (text diffs: the moved embedding)
        targets = sources if text_diff is not None else self.clip.embed_images(given)
        names = [getattr(im, "filename", None) or (im if not isinstance(im, Image.Image) else f"image {i + 1}")
                 for i, im in enumerate(images)]  # fmt: skip
        h, w = self.grid
        bar = tqdm(
            total=len(names) * s.candidates * h * w, unit="tok", desc="variations", disable=None if progress else True
        )
        out = []
        with bar:
            conds = self.decoder_input(sources, grid)
            for i, (name, target, cond) in enumerate(zip(names, targets, conds)):
                generator = torch.Generator().manual_seed(s.seed + i)
                label = f"variation of {Path(str(name)).name}"
                out.append(
                    self._kept(label, s.seed + i, cond, target[None], s, generator, bar, source=pixels[i : i + 1])
                )
        return out

    def interpolate(
        self,
        first: str | os.PathLike | Image.Image,
        second: str | os.PathLike | Image.Image,
        steps: int = 5,
        *,
        progress: bool = True,
        **overrides,
    ) -> list[list[Result]]:
        """Images drawn from `steps` embeddings on the spherical path between two images' CLIP embeddings (of the
        images as the tokenizer draws them, `as_drawn`; unCLIP's interpolations), t = 0 .. 1 evenly; per step the
        best `num_images` of `candidates` by CLIP image similarity to the nearer end (both ends at the middle).
        Step k uses seed + k."""
        s = self._embedding_settings("--interpolate", overrides)
        if steps < 2:
            raise UserError(f"--steps is {steps}; an interpolation needs at least 2 (its two ends)")
        given = self._read_images([first, second])
        ends, targets = self.clip.embed_images(self.as_drawn(given)), self.clip.embed_images(given)
        from ..model.prior import slerp

        h, w = self.grid
        bar = tqdm(
            total=steps * s.candidates * h * w, unit="tok", desc="interpolate", disable=None if progress else True
        )
        out = []
        with bar:
            for k in range(steps):
                t = k / (steps - 1)
                cond = self.decoder_input(slerp(ends[0], ends[1], t)[None])[0]
                nearer = targets[:1] if t < 0.5 else targets[1:] if t > 0.5 else targets
                generator = torch.Generator().manual_seed(s.seed + k)
                label = f"interpolation t={t:.2f}"
                out.append(self._kept(label, s.seed + k, cond, nearer, s, generator, bar, t=t))
        return out

    @staticmethod
    def _results(prompt: str, seed: int, ids, images, scores) -> list[Result]:
        return [
            Result(
                prompt=prompt,
                image=to_pil(images[j]),
                rank=j + 1,
                clip_score=None if scores is None else float(scores[j]),
                seed=seed,
                ids=ids[j].clone(),
            )
            for j in range(images.shape[0])
        ]


__all__ = [
    "DTYPES",
    "INITS",
    "METHODS",
    "EditSource",
    "Pipeline",
    "Result",
    "Stopped",
    "check_prompts",
    "check_seed",
    "check_settings",
    "kept_order",
]
