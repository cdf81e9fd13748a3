"""Train CLIP from scratch: `accelerate launch -m train.clip --config configs/shapes.toml`.

Needs the text tokenizer in the run folder (`python -m train.tokenizer`). Images get a mild random
resized crop that keeps the caption true (no color jitter: captions name colors); where captions
name no places (emoji-styles), `clip.shift_max` and `clip.flip_p` add whole-pixel shifts and
left-right flips (a flip makes a few captions false, `left arrow`; the judge still gained from them).
With `clip.hard_negatives`, each caption made false in one place is an extra negative text for every
image (NegCLIP): on shapes one word, by the caption grammar (`dalle_mini_impl.shapes.negatives`), once or
`clip.swaps_per_caption` times with another kind of edit each; elsewhere one of `clip.swap_phrases` for
another, or for `clip.swaps_per_caption` others (`dalle_mini_impl.clip.negatives`); `clip.rest_swaps` adds
negatives that keep a caption's phrase and take the rest from another caption of the batch (the same style,
another name); `clip.swaps_seen_only` keeps both to captions that some training image has, read once from
the split's captions before the first step.
With several processes, features are gathered so every row sees the global batch as negatives
(dalle_mini_impl.clip.model.contrastive_loss). `--init-from BUNDLE_OR_RUN` starts from that model's CLIP and
text tokenizer instead of random weights, and `train.clip.freeze` leaves parameter groups untrained:
image_tower, text_tower, projections, logit_scale (train.finetune).

Evaluates during training on the held-out split: text->image and image->text recall@1/5/10 (any
retrieved item with the query's caption counts as a hit) and, on shapes, zero-shot accuracy on color,
shape and position. Writes RUN/clip.safetensors, checkpoints under RUN/checkpoints/clip/ and
TensorBoard logs under RUN/logs/clip/.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import numpy as np
import torch

from dalle_mini_impl.clip.model import check_clip_config, clip_augment, clip_from_config
from dalle_mini_impl.clip.negatives import rest_swapped_captions, swapped_captions
from dalle_mini_impl.clip.uses import BundleClipScorer
from dalle_mini_impl.config import RunConfig
from dalle_mini_impl.data.images import make_grid
from dalle_mini_impl.data.streams import iter_captions
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.eval.clip import one_object_scenes, retrieval_metrics, zero_shot_shapes
from dalle_mini_impl.pipeline.bundle import load_text_tokenizer, save_state_dict
from dalle_mini_impl.shapes.negatives import perturbations
from train import finetune, loop
from train.common import (
    adamw,
    check_run_settings,
    example_batches,
    require_parts,
    seed_everything,
)


def clip_data(cfg: RunConfig) -> RunConfig:
    """The config CLIP's training stream reads: shapes captions omit attributes at `clip.shapes_omit_p`."""
    p = cfg.clip.shapes_omit_p
    if p < 0:
        return cfg
    if p > 1:
        raise UserError(f"config key 'clip.shapes_omit_p' is {p}; set it in [0, 1], or < 0 for data.shapes.omit_p")
    shapes = dataclasses.replace(cfg.data.shapes, omit_p=p)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shapes=shapes))


def main(argv: list[str] | None = None) -> int:
    cfg, args = loop.parse_args(argv, __doc__)
    train_clip(cfg, args)
    return 0


def check_config(cfg: RunConfig, section: str = "clip") -> None:
    """What CLIP's training needs of the config beyond types, checked before any stage of a run starts; its keys
    named under `section` (`judge.clip` for the judge's)."""
    check_clip_config(cfg.clip, cfg.data.image_size, section)  # the model's own: sizes, choices, augmentation
    if cfg.clip.hard_negatives and cfg.data.source != "shapes" and len(cfg.clip.swap_phrases) < 2:
        raise UserError(
            f"{section}.hard_negatives on data other than shapes needs {section}.swap_phrases, at least two phrases "
            f"a caption may hold (e.g. its styles); set them or set {section}.hard_negatives=false"
        )
    shift, flip = cfg.clip.shift_max, cfg.clip.flip_p
    if not 0 <= shift < 0.5:
        raise UserError(
            f"config key '{section}.shift_max' is {shift}; set it in [0, 0.5), e.g. 0.0625 (4 pixels of 64)"
        )
    if not 0 <= flip <= 1:
        raise UserError(f"config key '{section}.flip_p' is {flip}; set it in [0, 1], e.g. 0.5")
    if cfg.data.source == "shapes" and flip > 0:
        raise UserError(
            f"config key '{section}.flip_p' is {flip}, but shapes captions name left and right, which a flip makes "
            "false: leave it at 0"
        )
    count, phrases = cfg.clip.swaps_per_caption, len(cfg.clip.swap_phrases)
    if not cfg.clip.hard_negatives and count != 1:
        raise UserError(
            f"config key '{section}.swaps_per_caption' is {count}, but {section}.hard_negatives is off and makes no "
            f"negative to swap: set {section}.hard_negatives=true or leave it at 1"
        )
    if cfg.data.source == "shapes" and count < 1:
        raise UserError(
            f"config key '{section}.swaps_per_caption' is {count}; on shapes it is how many edits of a caption are "
            "negatives, each of another kind while there is one: set it to 1 or more, e.g. 4 for every kind"
        )
    if cfg.data.source != "shapes" and cfg.clip.hard_negatives and not 1 <= count <= phrases - 1:
        raise UserError(
            f"config key '{section}.swaps_per_caption' is {count}; a caption's phrase can be swapped for 1 to "
            f"{phrases - 1} others of {section}.swap_phrases: set it in that range"
        )
    if cfg.clip.swaps_seen_only and (cfg.data.source == "shapes" or not cfg.clip.hard_negatives):
        raise UserError(
            f"config key '{section}.swaps_seen_only' is true; it keeps the swaps of {section}.swap_phrases to captions "
            f"of the training data, which needs {section}.hard_negatives=true on data other than shapes (whose "
            "negatives never name a held-out pair anyway): set that, or leave it false"
        )
    rest = cfg.clip.rest_swaps
    if rest < 0:
        raise UserError(f"config key '{section}.rest_swaps' is {rest}; set it to 0 (none) or a count per caption")
    if rest and (cfg.data.source == "shapes" or not cfg.clip.hard_negatives):
        raise UserError(
            f"config key '{section}.rest_swaps' is {rest}; it keeps a caption's phrase of {section}.swap_phrases and "
            f"swaps the rest, which needs {section}.hard_negatives=true on data other than shapes: set that, or leave "
            "it at 0"
        )


def train_clip(cfg: RunConfig, args, key: str = "train.clip.", section: str = "clip") -> dict[str, float]:
    """Train CLIP as `cfg` says into `cfg.out_dir` (which holds the text tokenizer); returns the last scalars. Its
    settings are named under `key` (training) and `section` (the model) in what it says: `train.judge`'s as
    `judge.train.` and `judge.clip`."""
    check_config(cfg, section)
    tc = cfg.train.clip
    accelerator = loop.make_accelerator(tc, key=key)  # key: where its settings are set (the judge's: judge.train.)
    seed_everything(cfg.seed)
    source = finetune.init_source(cfg, args, "clip")
    if source is not None:
        finetune.adopt_text_tokenizer(source, cfg, accelerator)
    require_parts(cfg.out_dir, "text")
    check_run_settings(cfg)  # else a model of another text length or grid than config.json says: unloadable
    tokenizer = load_text_tokenizer(cfg.out_dir, cfg)
    model = clip_from_config(cfg, tokenizer)
    if source is not None:
        finetune.start_from(model, source, "clip", "CLIP", cfg, "clip")
    finetune.freeze(model, "clip", tc.freeze, "clip", key)
    if tc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = adamw(_param_groups(model, tc.weight_decay), tc, accelerator)
    batches = example_batches(clip_data(cfg), cfg.data.split, tc.batch_size, train=True, accelerator=accelerator)
    device = accelerator.device
    held_out = cfg.data.shapes.held_out if cfg.data.source == "shapes" else []  # never named, not even as false
    seen = _seen_captions(cfg)

    def augment(images, gen):
        return clip_augment(images, cfg.clip.crop_scale_min, gen, cfg.clip.shift_max, cfg.clip.flip_p)

    @torch.compiler.disable  # seeded generators and string work: eager, also under train.clip.compile
    def inputs(batch, step, micro) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A micro-batch's augmented images, caption ids and hard negatives' ids (None without hard negatives)."""
        # one generator per (seed, step, rank, micro): a resumed run crops exactly as an uninterrupted one
        seed = cfg.seed * 1_000_003 + step * 101 + accelerator.process_index
        if micro:  # the micro-batches after a step's first (grad_accum)
            seed = int(np.random.default_rng([cfg.seed, step, accelerator.process_index, micro]).integers(2**62))
        gen = torch.Generator().manual_seed(seed)
        images = augment(batch["image"], gen)
        ids = tokenizer.encode(batch["caption"]).to(device)
        if not cfg.clip.hard_negatives:
            return images, ids, None
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
        count = cfg.clip.swaps_per_caption
        if cfg.data.source == "shapes":
            false = [f for c in batch["caption"] for f in perturbations(c, rng, count, held_out)]
        else:
            phrases = cfg.clip.swap_phrases
            false = [f for c in batch["caption"] for f in swapped_captions(c, phrases, count, rng, seen)]
            if cfg.clip.rest_swaps:  # drawn after the swaps above: runs without them draw as before
                false += rest_swapped_captions(batch["caption"], phrases, cfg.clip.rest_swaps, rng, seen)
        return images, ids, tokenizer.encode(false).to(device) if false else ids[:0]

    def loss(m, batch, step, micro):
        images, ids, false_ids = inputs(batch, step, micro)
        image_feats, text_feats, scale = m(images, ids)
        negatives = None
        if false_ids is not None:
            negatives = m.encode_text(false_ids) if len(false_ids) else image_feats[:0]
        value = m.loss(image_feats, text_feats, scale, negatives)
        return value, {"logit_scale": scale.detach()}  # read by the loop once the backward is queued

    def after_step(m, batch, step, acc):
        m.clamp_logit_scale_()
        return {}

    validation_batches = loop.Replay(
        example_batches(cfg, cfg.data.val_split, tc.batch_size, train=False, accelerator=accelerator),
        tc.eval_batches,
    )
    zero_shot = None
    if cfg.data.source == "shapes":  # zero-shot color / shape / position on one-object renders
        zero_shot = one_object_scenes(cfg.data.shapes, cfg.data.image_size, cfg.data.val_split, 300)

    @torch.no_grad()
    def evaluate(m, step):
        results = {}
        if zero_shot is not None:
            scorer = BundleClipScorer(m, tokenizer, device=device)
            results.update({f"zero_shot_{k}": v for k, v in zero_shot_shapes(scorer, *zero_shot).items() if k != "n"})
        image_feats, text_feats, captions = [], [], []
        for batch in validation_batches():
            image_feats.append(m.encode_image(batch["image"].to(device)).float())
            text_feats.append(m.encode_text(tokenizer.encode(batch["caption"]).to(device)).float())
            captions += batch["caption"]
        if captions:
            # every process evaluates its own share; the main process's numbers are logged (retrieval over a
            # larger gallery would be another number), the skipped records are everyone's (`loop.evaluate`)
            results.update(retrieval_metrics(torch.cat(image_feats).cpu(), torch.cat(text_feats).cpu(), captions))
        return results | {"data_skipped": float(validation_batches.skipped)}  # warned of once, counted every time

    def log_images(m, step):
        batch = next(validation_batches())
        images = batch["image"][:8]
        gen = torch.Generator().manual_seed(0)
        augmented = augment(images, gen)
        return {"clip/augmented": make_grid(torch.cat([images, augmented]), nrow=8)}

    def export(m, state):
        save_state_dict(state, Path(cfg.out_dir) / "clip.safetensors")

    stage = loop.Stage(
        name="clip",
        model=model,
        optimizer=optimizer,
        batches=batches,
        loss=loss,
        evaluate=evaluate,
        log_images=log_images,
        export=export,
        after_step=after_step,
        settings_key=key,
    )
    result = loop.run(cfg, tc, stage, accelerator, args)
    loop.report("clip", result, accelerator)
    return result


def _seen_captions(cfg: RunConfig) -> set[str] | None:
    """Every caption of the training split(s) when `clip.swaps_seen_only` asks for them (one pass over the caption
    column, no image decoded), else None."""
    if not cfg.clip.swaps_seen_only:  # check_config has refused it on shapes and without hard negatives
        return None
    return set(iter_captions(cfg.data, cfg.data.split, sys.maxsize))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, embeddings, positions or the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        matrix = p.dim() >= 2 and "embed" not in name and "pos" not in name
        (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


if __name__ == "__main__":
    run_cli(main)
