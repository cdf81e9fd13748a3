"""Run configuration: one typed dataclass per stage, nested in `RunConfig`.

A run is configured by a TOML preset (`configs/*.toml`; one may name another as its `base` and state only
what differs from it), then by dotted overrides on the command line
(`--set train.dalle.steps=500 --set data.image_size=64`, after minGPT), then by the shortcuts
`--data SOURCE` and `--split NAME`. Every key must exist and every value must have the field's type;
anything else stops with one sentence naming the key and what is allowed. The resolved config is
saved as JSON in every run folder and bundle (`save_config`), and read back by `config_from_dict`.

Usage:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import file_above, read_json_object, unwritable, write_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ----------------------------------------------------------------------------------------------
# Stage configs
# ----------------------------------------------------------------------------------------------


@dataclass
class ShapesConfig:
    """The procedural `shapes` data set (docs/shapes.md)."""

    seed: int = 0  # the training stream's seed; validation uses seed + 1_000_003
    train_size: int = 0  # 0: an endless stream; N: a fixed set of N examples
    val_size: int = 1000
    two_object_p: float = 1 / 3  # fraction of two-object scenes
    # color-shape combinations never drawn in training (measured as generalisation)
    held_out: list[str] = field(default_factory=lambda: ["purple triangle", "yellow square"])
    omit_p: float = 0.3  # probability that a caption leaves out each optional attribute (a two-object one: each size)


@dataclass
class DataConfig:
    """Where (image, caption) pairs come from and how images are prepared."""

    source: str = "shapes"  # shapes | a folder (imagefolder) | *.parquet | *.tar | a hub name
    split: str = "train"
    val_split: str = "validation"
    image_size: int = 32
    image_column: str = "image"
    caption_column: str = "text"
    streaming: bool = False  # stream from disk/hub instead of loading into memory
    random_crop: bool = False  # random instead of center crop after the resize
    shuffle_buffer: int = 1000  # streaming shuffle buffer
    max_image_pixels: int = 40_000_000  # larger images are skipped as decompression bombs
    max_caption_chars: int = 2000  # longer captions are cut to this many characters
    # keep only the examples whose caption matches `include` and does not match `exclude` (Python regular
    # expressions, searched anywhere in the caption; empty: off), e.g. exclude = ", openmoji style$"
    include: str = ""
    exclude: str = ""
    max_examples: int = 0  # examples of the train split that train.encode encodes (0: all; set it for endless sources)
    encode_shard_size: int = 10_000  # rows per token shard
    # train.encode also writes each image of the train split mirrored left to right, as one more row with the same
    # caption (LlamaGen's flips of pre-extracted codes): twice the drawings for the transformer. Not for captions
    # that `encode_flip_exclude` (a regular expression, searched anywhere) matches: a mirror makes them false
    encode_flip: bool = False
    encode_flip_exclude: str = r"\b(left|right)"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class TextConfig:
    """The sentencepiece text tokenizer."""

    vocab_size: int = 1000
    text_len: int = 32  # ids per caption, bos and eos included
    model_type: str = "bpe"  # bpe | unigram
    lowercase: bool = True
    max_train_captions: int = 200_000  # captions read to train the tokenizer


@dataclass
class VAEConfig:
    """The image tokenizer: DALL-E's dVAE (`dvae`) or a VQGAN-style quantiser (`vq`)."""

    kind: str = "dvae"  # dvae | vq
    codebook_size: int = 512
    factor: int = 4  # downsampling: 4, 8 or 16
    hidden: int = 64  # channels of the first stage; doubled at each downsampling (capped at 4x)
    res_blocks: int = 1  # ResNet blocks per resolution
    code_dim: int = 256  # dvae: codebook vector width; vq: width before the factorised lookup
    recon_loss: str = "mse"  # mse | l1 | logit_laplace
    # dvae: Gumbel-softmax temperature and KL-to-uniform weight schedules (cosine, by step)
    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temperature_steps: int = 5000
    kl_weight: float = 1e-4
    kl_warmup_steps: int = 2000
    # dvae: weight of the KL of the batch-averaged code distribution to uniform (wav2vec 2.0's diversity loss)
    diversity_weight: float = 0.01
    straight_through: bool = False
    # dvae product codes (wav2vec 2.0's quantiser): each cell picks one code in each group of these sizes,
    # whose product must be codebook_size; the transformer then embeds and predicts the groups separately
    group_sizes: list[int] = field(default_factory=list)  # empty: one group of codebook_size
    group_dropout: float = 0.0  # with several groups: per cell, drop the later groups (nested dropout) this often
    # with several groups, what each group's encoder reads: 'rgb' or 'ink' (1 - min(R, G, B): where things are
    # drawn, not in which color); empty: all rgb. ['rgb', 'ink'] splits a cell's code into color and layout
    group_inputs: list[str] = field(default_factory=list)
    # vq
    lookup_dim: int = 8  # low-dimensional, l2-normalised codes (factorised lookup)
    ema: bool = True  # EMA codebook updates (else a codebook loss)
    ema_decay: float = 0.95
    commitment_weight: float = 0.25
    dead_code_steps: int = 50  # a code unused this many steps is restarted from recent encoder outputs
    disc_start: int = -1  # step that switches on the patch discriminator; -1: never
    disc_weight: float = 0.1  # the GAN term's pull on the decoder's last layer, as a share of reconstruction's (VQGAN)
    usage_window: int = 100  # codebook usage is logged over this many recent batches


@dataclass
class TransformerConfig:
    """The decoder-only transformer: the run's `[transformer]` section and the bundle's transformer.json.

    Size: `preset` names an entry of `dalle_mini_impl.model.transformer.PRESETS`; dim, depth, heads and
    head_dim above 0 override it. Geometry (vocabularies, text length, grid, pad id) belongs to the
    tokenizers: `train.dalle` fills it from them, so a preset leaves it 0 (a value set there must agree
    with the tokenizers). `model.transformer.resolve_config` fills both and checks every field.
    """

    preset: str = "tiny"
    dim: int = 0
    depth: int = 0
    heads: int = 0
    head_dim: int = 0  # 0: dim // heads
    mlp: str = "swiglu"  # gelu | swiglu; both with hidden width mlp_ratio * dim (SwiGLU gated, like GEGLU)
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    norm: str = "layer"  # layer (LayerNorm) | rms (RMSNorm)
    pos_2d: str = "embed"  # embed (row + column embeddings) | rope (2-D rotary)
    text_pad: str = "per_position"  # per_position (DALL-E's pad tokens) | mask (pads masked from attention)
    pads_in_loss: bool = False  # per_position only: whether predicting a pad counts in the text loss
    attn_patterns: list[str] = field(default_factory=lambda: ["full"])  # full | row | column | conv, cycled
    conv_kernel: int = 5  # odd side of the conv pattern's window
    # training: dropout of the embeddings, each residual branch's output and the MLP's; attn_dropout drops
    # attention probabilities, which on a CPU sends attention off its fused kernel (2.7x a tiny step in bf16)
    dropout: float = 0.0
    attn_dropout: float = 0.0
    text_loss_weight: float = 1 / 8  # loss = w * text CE + (1 - w) * image CE
    caption_dropout: float = 0.1  # training: probability of the empty caption (what guidance contrasts with)
    # unCLIP's decoder (DALL-E 2): a CLIP image embedding of cond_dim numbers, projected to cond_len positions
    # before the text; 0 and 0: no embedding (the DALL-E transformer). The zero vector is the dropped embedding.
    # train.unclip sets these five from the `unclip` section (UNCLIP_DECODER_KEYS); a config leaves them be
    cond_dim: int = 0
    cond_len: int = 0
    # of the cond_len positions, the last cond_tokens are one each of the last cond_tokens slices of cond_token_dim
    # numbers (unCLIP's grid cells with `unclip.grid_tokens`), through one shared projection; 0: all cond_len from
    # one projection of the whole embedding
    cond_tokens: int = 0
    cond_token_dim: int = 0
    cond_dropout: float = 0.1  # training: probability of the dropped (zero) embedding
    # geometry, from the tokenizers
    text_vocab: int = 0  # text ids the tokenizer emits, pad/bos/eos included
    image_vocab: int = 0  # the image tokenizer's codebook size
    image_factors: list[int] = field(default_factory=list)  # product codes' group sizes; empty: [image_vocab]
    text_len: int = 0  # text ids per caption, bos and eos included
    grid_h: int = 0
    grid_w: int = 0
    pad_id: int = 0  # the text tokenizer's pad id

    @property
    def image_len(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def prefix_len(self) -> int:
        """Positions before the first image token: the embedding's (unCLIP) and the text's."""
        return self.cond_len + self.text_len

    @property
    def seq_len(self) -> int:
        """Positions the model reads: the prefix and every image token but the last."""
        return self.prefix_len + self.image_len - 1

    @property
    def vocab(self) -> int:
        """Output ids: text ids first, then image ids."""
        return self.text_vocab + self.image_vocab

    @property
    def image_rows(self) -> int:
        """Rows of the image embedding table and image columns of the head: every factor's codes."""
        return sum(self.image_factors)

    def pattern(self, layer: int) -> str:
        return self.attn_patterns[layer % len(self.attn_patterns)]


@dataclass
class CLIPConfig:
    """The CLIP model trained here: ViT (or ResNet) image encoder + transformer text encoder."""

    patch_size: int = 4
    # "vit", or "resnet": residual convolutions, one stride-2 block per halving of patch_size (a power of two),
    # image_depth more blocks at the last resolution, CLIP's attention pooling with image_heads (clip.model)
    image_tower: str = "vit"
    # how pixels become a ViT's patch tokens: "patch", one strided convolution (ViT's patchify); "conv",
    # a stack of 3x3 stride-2 convolutions, one per halving (patch_size a power of two), then a 1x1
    # (Xiao et al. 2021, "Early Convolutions Help Transformers See Better": steadier, faster to fit)
    stem: str = "patch"
    image_width: int = 192
    image_depth: int = 4
    image_heads: int = 4
    text_width: int = 192
    text_depth: int = 4
    text_heads: int = 4
    embed_dim: int = 128
    pool: str = "eot"  # eot | mean
    # what a ViT image tower's embedding reads: "cls", its class token (CLIP's); "mean", the mean of its patch
    # tokens after the last block (global average pooling, Beyer et al. 2022, "Better plain ViT baselines")
    image_pool: str = "cls"
    # stochastic depth in a ViT image tower's blocks (Huang et al. 2016; DeiT trains its ViTs with 0.1): in
    # training each block's branches are skipped per image, the last block's with this probability, the first's never
    drop_path: float = 0.0
    init_temperature: float = 1 / 0.07  # the logit scale starts here ...
    max_logit_scale: float = 100.0  # ... and is clamped here
    crop_scale_min: float = 0.85  # random resized crop keeps at least this fraction of the side
    # a shift of whole pixels, up to this fraction of the side each way, and a left-right flip with this
    # probability (clip.model.clip_augment); off on shapes, whose captions name places and sides
    shift_max: float = 0.0
    flip_p: float = 0.0
    # CLIP's own shapes captions: each optional attribute left out with this probability (< 0: use
    # data.shapes.omit_p, which the transformer trains on)
    shapes_omit_p: float = -1.0
    # NegCLIP hard negatives: each caption made false in one place is an extra negative text for every
    # image. On shapes one word is made false by the caption grammar (a spatial word flipped, a size, color
    # or shape swapped: dalle_mini_impl.shapes.negatives); on other data a caption holding one of
    # `swap_phrases` has it replaced by another of them (emoji-styles: its styles, ", noto style", ...)
    hard_negatives: bool = False
    swap_phrases: list[str] = field(default_factory=list)
    # how many other swap_phrases each caption's phrase is swapped for, one negative each (1 .. phrases - 1); on
    # shapes how many edits of each caption, each of another kind (relation, size, color, shape) while there is one
    swaps_per_caption: int = 1
    # that many more negatives per caption the other way round: its phrase kept, the rest taken from another
    # caption of the batch (emoji-styles: the same style, another name; dalle_mini_impl.clip.negatives)
    rest_swaps: int = 0
    # swap only to captions that some image of the training split has (read once from its caption column before
    # training): a caption that appears only as a false one teaches the text tower that it matches no image, and a
    # held-out cell's is one (dalle_mini_impl.clip.negatives). Only on data other than shapes, whose negatives never
    # name a held-out pair anyway
    swaps_seen_only: bool = False


@dataclass
class TrainConfig:
    """One stage's optimisation and bookkeeping."""

    steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size * processes * grad_accum
    lr: float = 1e-3
    scale_lr: bool = False  # multiply lr by processes * grad_accum (linear scaling)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0  # the largest gradient norm a step takes (0 or less: no clipping)
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_checkpointing: bool = False
    compile: bool = False
    # fp32 matmuls and convolutions on a CUDA GPU in TensorFloat-32 (Ampere and later: 10 mantissa bits, several
    # times the fp32 rate; nanoGPT's setting); false keeps IEEE fp32. Ignored on other devices; bf16/fp16 autocast
    # regions are unaffected
    tf32: bool = True
    # the attention kernel of training steps: auto (PyTorch's choice) | math (matmul and softmax, forward and
    # backward: faster on the CPU for CLIP's short sequences, slower for the emoji transformer's; docs/RESULTS.md)
    attention: str = "auto"
    ema_decay: float = 0.0  # 0: no EMA weights
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # the newest this many; 0: every one
    log_every: int = 25
    image_every: int = 500  # image grids in TensorBoard
    eval_every: int = 500
    eval_batches: int = 8
    max_bad_steps: int = 20  # non-finite steps in a row before the run stops
    num_workers: int = 0
    # parameter groups not trained (requires_grad off, left out of the optimizer), e.g. ["embeddings", "blocks.0"];
    # each model's group names are in train/finetune.py and docs/TRAINING.md
    freeze: list[str] = field(default_factory=list)


@dataclass
class PriorConfig:
    """unCLIP's prior: a caption (its text ids and CLIP text embedding) -> a CLIP image embedding."""

    kind: str = "diffusion"  # diffusion (predicts the clean embedding, DALL-E 2) | regression (one deterministic guess)
    dim: int = 256
    depth: int = 4
    heads: int = 4
    timesteps: int = 1000  # diffusion: noise levels in training (cosine schedule)
    sample_steps: int = 64  # diffusion: DDIM steps when sampling
    # classifier-free guidance on the prior (`sample.prior_guidance_scale`): the caption (ids and text embedding)
    # dropped this often in training
    text_dropout: float = 0.1


@dataclass
class UnclipConfig:
    """DALL-E 2's recipe (Ramesh et al. 2022): a prior from captions to CLIP image embeddings and a decoder from
    them, the decoder being this project's transformer (the `transformer` section's size) with the embedding as
    a prefix. `train.unclip` and `train.prior` build them; `train.all` runs both when `enabled`."""

    enabled: bool = False
    cond_len: int = 4  # decoder positions the embedding is projected to
    # the decoder starts from the run's trained transformer (RUN/transformer.safetensors, the same size): it can
    # already draw from captions and learns to read the embedding; false: from random weights
    init_from_transformer: bool = True
    embedding_dropout: float = 0.1  # the paper: the embedding dropped 10% of the time ...
    caption_dropout: float = 0.5  # ... and the caption 50%
    # > 0: the decoder also reads CLIP's spatial features, the image tower's patch tokens pooled to grid x grid
    # (`CLIP.image_grid`), after the embedding in the same projection; variations give their source's, every other
    # use (the prior's embeddings, interpolations, text diffs) zeros, and training drops them `grid_dropout` of the
    # time so the decoder draws from the embedding alone too. 0: the embedding alone, as DALL-E 2's decoder
    grid: int = 0
    grid_dropout: float = 0.5
    # true: each of the grid's grid x grid cells is a decoder position of its own (one shared projection of a cell's
    # features, a learned vector per position), after the embedding's cond_len: image cells attend to where in the
    # source a feature was (IP-Adapter-Plus's tokens); false: the grid joins the embedding's projection
    grid_tokens: bool = False
    prior: PriorConfig = field(default_factory=PriorConfig)


@dataclass
class TrainSection:
    vae: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, lr=1e-3, warmup_steps=100))
    # a second phase of train.vae, after `vae`'s steps: a VQ's decoder alone, its encoder and codebook frozen, so
    # every image's codes stay those of the first phase (0 steps: none)
    vae_decoder: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=0, lr=5e-4, warmup_steps=50, weight_decay=0.0)
    )
    dalle: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=3000, lr=1e-3, warmup_steps=200, weight_decay=0.05)
    )
    clip: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=2000, batch_size=128, lr=1e-3, weight_decay=0.1)
    )
    unclip: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=3000, lr=1e-3, warmup_steps=200, weight_decay=0.05)
    )
    prior: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=2000, batch_size=128, lr=5e-4, warmup_steps=100, weight_decay=0.05)
    )


# how CLIP-guided refinement moves (`sample.guided_optimizer`, dalle_mini_impl.pipeline.guided); "auto": jacobi
# from random codes with the prior on, adam otherwise
GUIDED_OPTIMIZERS = ("auto", "adam", "jacobi")


@dataclass
class SampleConfig:
    """Defaults of `python -m sample`."""

    num_images: int = 4
    candidates: int = 16
    batch_size: int = 64
    guidance_scale: float = 3.0  # classifier-free guidance on the logits (1: off)
    guidance_until: float = 1.0  # the fraction of the drawn image tokens guided, from the first (1: all)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    # how a decoding step runs: cached (eager, KV cache), static, compiled (torch.compile), speculative
    # (speculative Jacobi decoding: same distribution, fewer passes; dalle_mini_impl.model.generate)
    decode: str = "cached"
    # speculative decoding's relaxed test (LANTERN, Jang et al. 2025): each draft is tested together with its
    # nearest codes in the image tokenizer's latent space (at most speculative_neighbours) while their probability
    # sums to at most speculative_relax, which draws every token within that total variation of the model's
    # distribution in fewer passes (0: exact; docs/RESULTS.md)
    speculative_relax: float = 0.0
    speculative_neighbours: int = 128
    # clip-guided refinement (VQGAN+CLIP)
    guided_steps: int = 60
    guided_lr: float = 0.1
    guided_cutouts: int = 16
    # the transformer's log-likelihood of the refined codes given the prompt, times this, joins CLIP's
    # similarity in the objective (0: CLIP alone, VQGAN+CLIP as published)
    guided_prior_weight: float = 0.0
    # CLIP's pull is toward the prompt's text embedding minus this times the mean of its contrast captions' (the prompt
    # with one part made false: on shapes every one-word edit, elsewhere its clip.swap_phrases phrase swapped for each
    # other one, e.g. its style for every other style), rescaled to the prompt's length: what tells the prompt from
    # its near misses, not what it shares with them (0: the prompt alone)
    guided_contrast_weight: float = 0.0
    # clip-guided: return a refined image only if CLIP's margin of the prompt over its nearest contrast caption
    # (guided_contrast_weight's captions) is at least its start's; with the prior it changed nothing on 130 emoji
    # validation captions (docs/RESULTS.md, "a guard on the margin over the other styles"), so it is off
    guided_contrast_guard: bool = False
    # how refinement moves: "adam" (Adam on the latents, VQGAN+CLIP as published), "jacobi" (every cell to the
    # prior's most likely code given the cells before it, tilted by guided_jacobi_lr times CLIP's gradient;
    # needs guided_prior_weight above 0) or "auto": jacobi from random codes, adam from samples, each where it
    # was measured best (docs/RESULTS.md#2026-12-04-vqganclip-from-random-codes-by-jacobi-steps-of-the-prior)
    guided_optimizer: str = "auto"
    guided_jacobi_lr: float = 10.0
    # unCLIP's --text-diff: how far (0 .. 1, a spherical interpolation) the image's embedding turns toward the
    # difference of the two captions' embeddings
    text_diff_scale: float = 0.3
    prior_guidance_scale: float = 1.0  # --method unclip: classifier-free guidance on unCLIP's prior (1: off)
    # --variations without --text-diff: classifier-free guidance on unCLIP's decoder (0: sample.guidance_scale); a
    # decoder that reads the source's grid (unclip.grid) follows it best unguided (docs/RESULTS.md)
    variation_guidance_scale: float = 0.0
    prior_samples: int = 1  # --method unclip: prior embeddings per candidate, the one nearest the caption's kept
    # editing (--mask): candidates are ranked by CLIP plus this times the transformer's mean log-likelihood of
    # the kept cells after the first redrawn one (a redrawn region should agree with what follows it)
    edit_likelihood_weight: float = 0.0


@dataclass
class JudgeConfig:
    """The evaluation CLIP of `python -m train.judge`: a CLIP of its own (tokenizer, seed, size, steps), never
    the reranker, so that reranking cannot simply please the model that grades it."""

    seed: int = 1
    splits: str = "train+validation"  # what it learns from; never the split it grades
    vocab_size: int = 2000
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=3000, batch_size=128, lr=1e-3, weight_decay=0.1)
    )


@dataclass
class RunConfig:
    name: str = "shapes"
    out_dir: str = "runs/shapes"  # the run folder: checkpoints, logs, resolved config, bundle
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleConfig = field(default_factory=SampleConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    unclip: UnclipConfig = field(default_factory=UnclipConfig)


# ----------------------------------------------------------------------------------------------
# Reading, overriding, checking
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        plural = {int: "integers", float: "numbers", bool: "true or false values", str: "strings"}
        return f"a list of {plural.get(inner, _type_name(inner))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


class _SetText(str):
    """A `--set` value as typed, with the TOML literal it parses as (`parsed`; the text itself when none)."""

    parsed: Any


def _set_text(text: str) -> _SetText:
    value = _SetText(text)
    value.parsed = _parse_value(text)
    return value


def _as_typed(value: _SetText, tp: Any) -> Any:
    """The value a `--set` gives a field of type `tp`: a string field keeps the text as typed (2.50 stays '2.50', a
    date or true its text; a quoted one its content), a list of strings a quoted text as one item (else the comma
    shorthand), anything else the TOML literal."""
    parsed, text = value.parsed, str(value)
    if tp is str:
        return parsed if isinstance(parsed, str) else text
    if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        if isinstance(parsed, list):
            return parsed
        return [parsed] if isinstance(parsed, str) and parsed != text else text
    return parsed


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`, converting only where no information is lost."""
    from_set = isinstance(value, _SetText)
    if from_set:
        value = _as_typed(value, tp)
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        given = value
        if isinstance(value, str):  # --set a.b=x,y,z: each item a TOML literal when the list holds no strings
            items = [v.strip() for v in value.split(",") if v.strip()]
            if not from_set:  # a file's "a, b": one item or two? the TOML list says
                example = json.dumps([value]) if inner is str else f"[{', '.join(items)}]"
                raise UserError(
                    f"config key '{key}' must be {_type_name(tp)}, got the string {value!r}; write it as a TOML "
                    f"list, e.g. {key.rpartition('.')[2]} = {example}"
                )
            value = items if inner is str else [_parse_value(v) for v in items]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {given!r}")
        try:
            return [_coerce(v, inner, key) for v in value]
        except UserError:
            raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {given!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # --set key=1, as the text "1" already was
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# keys that have been renamed: a config saved with the old name (an older bundle's config.json, a preset,
# a --set) still loads, with a one-line warning
RENAMED = {"sample.cfg": "sample.guidance_scale"}


def _apply(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Write a nested dict of values into a dataclass tree, checking every key and type."""
    types_ = _field_types(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if key in RENAMED:
            warnings.warn(f"config key '{key}' is now '{RENAMED[key]}'; read it as that", FutureWarning, stacklevel=2)
            key = RENAMED[key]
            name = key.rpartition(".")[2]
        if name not in types_:
            allowed = ", ".join(sorted(types_))
            raise UserError(f"unknown config key '{key}'; allowed keys here are: {allowed}")
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, _SetText):  # --set data={source="shapes"}: an inline table
                value = value.parsed
            if not isinstance(value, dict):
                raise UserError(f"config key '{key}' is a section; set its keys, e.g. '{key}.<name>=...'")
            _apply(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, tp, key))


def _parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal when it parses as one (1e-3, true, [1, 2]), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def available_presets() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR.parent)) for p in CONFIG_DIR.glob("*.toml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A preset path as given, or a bare preset name (`shapes`) looked up in configs/."""
    if not str(path).strip():
        raise UserError(f"--config is empty; give a preset's path or one of: {', '.join(available_presets())}")
    p = Path(path)
    if p.suffix == ".json" and p.is_file():  # a run's or bundle's config.json
        raise UserError(
            f"config '{path}' is a trained model's config.json; --config takes a TOML preset (configs/), and "
            "--init-from starts a run from that model's weights"
        )
    if p.is_file():
        return p
    # a name in configs/, or a path from the project's root (configs/emoji.toml, as the docs write it) anywhere
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.toml", CONFIG_DIR.parent / p):
        if candidate.is_file():
            return candidate
    if p.is_dir():
        if (p / "config.json").is_file():
            raise UserError(
                f"config '{path}' is a run folder or bundle; --config takes a TOML preset (configs/), and "
                "--init-from starts a run from that model's weights"
            )
        raise UserError(f"config '{path}' is a folder; give a preset file (a .toml) in it")
    raise UserError(f"config file '{path}' does not exist; give a path or one of: {', '.join(available_presets())}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file '{path}' is not valid TOML ({e}); fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 text; give a TOML preset (configs/)") from None
    except OSError as e:
        raise UserError(f"config file '{path}' cannot be read ({e.strerror or e}); check its permissions") from None


def _merged(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`base` with `values` written over it, section by section (a key's value, a list too, replaces the base's)."""
    out = dict(base)
    for key, value in values.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_sections else value
    return out


def read_preset(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's values, with those of the preset its top-level `base` names (a path relative to the preset's
    folder, or a preset's name) underneath: `base = "emoji.toml"` and the keys that differ, so that a variant of
    a preset (configs/emoji_gpu.toml) states only what it changes and follows what it does not."""
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise UserError(f"config file '{path}' is its own base ({chain}); remove one of these 'base' keys")
    values = _read_toml(path)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"config file '{path}' has base = {base!r}; give a preset's file name, e.g. 'emoji.toml'")
    base_path = path.parent / base
    if not base_path.is_file():
        try:
            base_path = resolve_config_path(base)
        except UserError:
            raise UserError(
                f"config file '{path}' has base = '{base}', which is neither a file beside it nor one of: "
                f"{', '.join(available_presets())}; fix the name"
            ) from None
    return _merged(read_preset(base_path, (*_seen, path.resolve())), values)


# the `vae` keys that one tokenizer kind alone reads (its constructor's arguments and the dVAE's schedules;
# tests/test_config.py holds them to vae.io's constructors)
VAE_KIND_KEYS = {
    "dvae": ("temperature_start", "temperature_end", "temperature_steps", "kl_weight", "kl_warmup_steps",
             "diversity_weight", "straight_through", "group_sizes", "group_dropout", "group_inputs"),
    "vq": ("lookup_dim", "ema", "ema_decay", "commitment_weight", "dead_code_steps", "disc_start", "disc_weight"),
}  # fmt: skip


def _only_reader(name: str) -> str | None:
    """The tokenizer kind that alone reads the `vae` key `name` (VAE_KIND_KEYS), or None: both kinds read it."""
    return next((kind for kind, names in VAE_KIND_KEYS.items() if name in names), None)


def check_vae_kind_keys(v: VAEConfig, keys: list[str], where: str) -> None:
    """One sentence for a key of `keys` (dotted) set away from its default that only another tokenizer kind than
    `v.kind` reads: a VQ's critic set on a dVAE run trained no critic, a dVAE's KL schedule on a VQ run changed
    nothing, in silence. Set to its default (`vae.group_sizes=[]`: off) it is no setting."""
    defaults = VAEConfig()
    for key in keys:
        section, _, name = key.partition(".")
        other = _only_reader(name) if section == "vae" else None
        if other not in (None, v.kind) and getattr(v, name) != getattr(defaults, name):
            raise UserError(
                f"config key '{key}' ({where}) is read by the {other} image tokenizer alone, and this run's vae.kind "
                f"is '{v.kind}'; remove it, or set vae.kind={other}"
            )


# the `transformer` keys of unCLIP's decoder, which train.unclip sets from the `unclip` section (and the CLIP's
# embedding width): set in a config they build nothing (train.dalle's transformer reads no embedding)
UNCLIP_DECODER_KEYS = {
    "cond_dim": "the CLIP's embedding width",
    "cond_len": "unclip.cond_len",
    "cond_tokens": "unclip.grid and unclip.grid_tokens",
    "cond_token_dim": "unclip.grid and unclip.grid_tokens",
    "cond_dropout": "unclip.embedding_dropout",
}


def warn_of_unread_preset_vae_keys(v: VAEConfig, keys: list[str]) -> None:
    """A warning for the preset's `vae` keys (`keys`) that --set vae.kind turned into another kind's: the
    preset's dVAE schedule under `--set vae.kind=vq` is left unread (the product-code keys: refused when the
    tokenizer is built)."""
    defaults = VAEConfig()
    stray = [
        key
        for key in keys
        if _only_reader(name := key.partition(".")[2]) not in (None, v.kind)
        and name not in ("group_sizes", "group_dropout", "group_inputs")
        and getattr(v, name) != getattr(defaults, name)
    ]
    if stray:
        warnings.warn(
            f"the preset's {', '.join(stray)} are not read by the {v.kind} image tokenizer that vae.kind now names; "
            "they do nothing in this run",
            stacklevel=3,
        )


def check_unclip_decoder_keys(t: TransformerConfig, where: str) -> None:
    """One sentence for a `transformer.cond_*` key set away from its default (see UNCLIP_DECODER_KEYS)."""
    defaults = TransformerConfig()
    for name, source in UNCLIP_DECODER_KEYS.items():
        if getattr(t, name) != getattr(defaults, name):
            raise UserError(
                f"config key 'transformer.{name}' ({where}) is {getattr(t, name)}, but train.unclip sets it for "
                f"unCLIP's decoder from {source} and the DALL-E transformer reads no embedding; remove it"
                + (f" and set {source}" if source.startswith("unclip.") else "")
            )


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | str | None = None,
    data: str | None = None,
    split: str | None = None,
) -> RunConfig:
    """Defaults <- TOML preset (over its `base`, `read_preset`) <- `key=value` overrides <- `--data`/`--split`
    shortcuts."""
    cfg = RunConfig()
    vae_keys: list[str] = []
    if path is not None:
        preset_path = resolve_config_path(path)
        preset = read_preset(preset_path)
        _apply(cfg, preset, "")
        vae_keys = [f"vae.{name}" for name in preset.get("vae", {})]
        check_vae_kind_keys(cfg.vae, vae_keys, f"in {preset_path}")
        check_unclip_decoder_keys(cfg.transformer, f"in {preset_path}")
    overrides = [overrides] if isinstance(overrides, str) else overrides or []
    apply_overrides(cfg, overrides)
    set_keys = [item.partition("=")[0].strip() for item in overrides]
    check_vae_kind_keys(cfg.vae, set_keys, "set by --set")
    check_unclip_decoder_keys(cfg.transformer, "set by --set")
    warn_of_unread_preset_vae_keys(cfg.vae, [k for k in vae_keys if k not in set_keys])
    if data is not None:
        cfg.data.source = data
    if split is not None:
        cfg.data.split = split
    for key, seed in (("seed", cfg.seed), ("judge.seed", cfg.judge.seed)):
        if not 0 <= seed < 2**32:  # what torch, numpy and random all take; -1 is not "random" here
            raise UserError(f"config key '{key}' is {seed}; use an integer from 0 to {2**32 - 1}")
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str] | str) -> RunConfig:
    """Apply `key=value` overrides in place (and return cfg); every key and type is checked. One str is one
    override (not one per character)."""
    for item in [overrides] if isinstance(overrides, str) else overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' must look like key=value, e.g. train.dalle.steps=500")
        _apply(cfg, _nest(key.strip(), _set_text(value.strip())), "")
    return cfg


# the sampling settings an evaluation sets itself, and the option that sets each (or why none does)
EVAL_OWN_SETTINGS = {
    "sample.seed": "use --seed",
    "sample.candidates": "use --candidates",
    "sample.num_images": "it grades the candidates and the reranker's pick, not kept images",
}


# the sampling settings that one use of the sampler alone reads: use -> (what it is, its keys)
SAMPLE_USES = {
    "guided": (
        "refine with CLIP guidance (--guided K)",
        ("guided_steps", "guided_lr", "guided_cutouts", "guided_prior_weight", "guided_contrast_weight",
         "guided_contrast_guard", "guided_optimizer", "guided_jacobi_lr"),
    ),
    "unclip": ("sample with unCLIP's prior (--method unclip)", ("prior_guidance_scale", "prior_samples")),
    "variations": ("draw variations of images (eval unclip)", ("variation_guidance_scale",)),
    "text_diff": ("turn images by a text diff (eval unclip)", ("text_diff_scale",)),
    "edit": ("edit images (eval edit)", ("edit_likelihood_weight",)),
}  # fmt: skip


def apply_sample_overrides(
    cfg: RunConfig, overrides: list[str], own: dict[str, str] | None = None, uses: set[str] = frozenset()
) -> RunConfig:
    """An evaluation's `--set sample.KEY=VALUE` on a trained bundle's config: only sampling settings may change,
    none of `own` (key -> what to do instead: those the evaluation sets itself, which a --set would not move), and
    none that only a use of SAMPLE_USES other than `uses` (what this evaluation does) reads."""
    for item in overrides:
        if not item.startswith("sample."):
            raise UserError(f"--set {item}: only sampling settings can change here; give a sample.KEY=VALUE")
        key = item.partition("=")[0].strip()
        if own and key in own:
            raise UserError(f"--set {item}: this evaluation sets {key} itself; {own[key]}")
        name = key.removeprefix("sample.")
        for use, (what, keys) in SAMPLE_USES.items():
            if name in keys and use not in uses:
                raise UserError(f"--set {item}: only what can {what} reads {key}, and this evaluation does not")
    return apply_overrides(cfg, overrides)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict[str, Any], cls: type = RunConfig) -> Any:
    """Rebuild a (possibly older) saved config; unknown keys are errors, missing keys take defaults."""
    cfg = cls()
    _apply(cfg, values, "")
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    text = json.dumps(config_to_dict(cfg), indent=2) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def read_config_json(path: str | os.PathLike) -> RunConfig:
    values = read_json_object(path, "config file", "rewrite or retrain it", "is this a run folder or bundle?")
    try:
        return config_from_dict(values)
    except UserError as e:  # a key or value the file holds: named with the file, which no --set shows
        raise UserError(f"config file '{path}': {e}") from None


# ----------------------------------------------------------------------------------------------
# Command-line glue shared by every command
# ----------------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None = "shapes") -> None:
    parser.add_argument(
        "--config", default=default_config, help="TOML preset: a path or a name in configs/ (default: shapes)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable: --set train.dalle.steps=500 --set data.image_size=64",
    )
    parser.add_argument(
        "--data", default=None, help="data source: shapes, a folder, *.parquet, *.tar files, or a hub name"
    )
    parser.add_argument("--split", default=None, help="split to read (default: data.split)")
    parser.add_argument("--out", default=None, help="run folder (default: out_dir of the config)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's config from `add_config_args`' arguments; --out (or out_dir) must be able to hold a run folder."""
    cfg = load_config(args.config, args.overrides, data=args.data, split=args.split)
    out = getattr(args, "out", None)
    if out is not None:
        if not str(out).strip():
            raise UserError("--out is empty; name the run folder, such as runs/mine")
        cfg.out_dir = out
    check_run_folder(cfg.out_dir)
    return cfg


def check_run_folder(out_dir: str) -> None:
    """One sentence when a run folder cannot be one: it is a file, or a file stands where a folder above it goes."""
    if not str(out_dir).strip():  # `--set out_dir=`: the current folder would become the run folder
        raise UserError("the run folder (out_dir) is empty; name it with --out, such as runs/mine")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"run folder '{out_dir}' is a file; pass --out a folder (new or an earlier run's)")
    above = file_above(path)
    if above is not None:
        raise UserError(f"run folder '{out_dir}' is under '{above}', which is a file; pass --out another folder")
    for kept in ("logs", "checkpoints", "tokens"):  # the folders every run keeps: a file there stopped a stage late
        if (path / kept).exists() and not (path / kept).is_dir():
            raise UserError(f"'{path / kept}' is a file where the run keeps a folder; move it away and rerun")
    blocked = unwritable(path)
    if blocked is not None:
        raise UserError(
            f"run folder '{out_dir}' cannot be written ('{blocked}' is read-only to this user); "
            "pass --out a writable folder"
        )


__all__ = [
    "CLIPConfig",
    "DataConfig",
    "JudgeConfig",
    "PriorConfig",
    "RunConfig",
    "SampleConfig",
    "ShapesConfig",
    "TextConfig",
    "TrainConfig",
    "TrainSection",
    "TransformerConfig",
    "UnclipConfig",
    "VAEConfig",
    "add_config_args",
    "apply_overrides",
    "EVAL_OWN_SETTINGS",
    "apply_sample_overrides",
    "check_run_folder",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_config_json",
    "save_config",
]
