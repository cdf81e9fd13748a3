"""Train the DALL-E transformer: `accelerate launch -m train.dalle --config configs/shapes.toml`.

Needs the text tokenizer (`python -m train.tokenizer`) and the image tokenizer (`train.vae`) in the
run folder. Trains on the token shards of `python -m train.encode` when they exist (LlamaGen's way:
pixels are encoded once), and otherwise encodes each batch on the fly with the frozen image
tokenizer. Caption dropout (the empty caption with probability `transformer.caption_dropout`)
teaches the unconditional model that classifier-free guidance needs.

Writes RUN/transformer.safetensors (+ transformer.json, the model config), checkpoints under
RUN/checkpoints/dalle/, and TensorBoard logs under RUN/logs/dalle/ (text and image losses, LR,
gradient norm, tokens/s, validation loss, and sample grids for fixed prompts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dalle_mini_impl.config import RunConfig, config_to_dict
from dalle_mini_impl.data.images import make_grid
from dalle_mini_impl.data.tokens import TokenStream, list_shards, tokens_dir
from dalle_mini_impl.errors import run_cli
from dalle_mini_impl.model.generate import generate
from dalle_mini_impl.model.transformer import DALLE, resolve_config
from dalle_mini_impl.pipeline.bundle import load_text_tokenizer, load_vae, save_state_dict
from train import loop
from train.common import adamw, example_batches, seed_everything


class EncodedOnTheFly:
    """Token batches from pixels, for when no token shards exist: encode each batch with the frozen VAE."""

    def __init__(self, batches, image_tokenizer, device):
        self.batches, self.vae, self.device = batches, image_tokenizer, device

    def __iter__(self):
        for batch in self.batches:
            # no_grad, not inference_mode: the ids feed an embedding that autograd records
            with torch.no_grad():
                ids = self.vae.encode(batch["image"].to(self.device)).cpu()
            yield {"image_ids": ids, "caption": batch["caption"]}

    @property
    def n_skipped(self) -> int:
        return self.batches.n_skipped

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def token_batches(cfg: RunConfig, split: str, batch_size: int, *, train: bool, accelerator, image_tokenizer):
    folder = tokens_dir(cfg.out_dir, split)
    if list_shards(folder):
        return TokenStream(
            folder,
            batch_size,
            train=train,
            seed=cfg.seed,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
    batches = example_batches(cfg, split, batch_size, train=train, accelerator=accelerator)
    return EncodedOnTheFly(batches, image_tokenizer, accelerator.device)


def build_model(cfg: RunConfig, text_tokenizer, image_tokenizer) -> DALLE:
    h, w = image_tokenizer.grid(cfg.data.image_size)
    mcfg = resolve_config(
        cfg.transformer,
        text_vocab=text_tokenizer.vocab_size,
        image_vocab=image_tokenizer.codebook_size,
        image_factors=image_tokenizer.group_sizes,
        text_len=cfg.text.text_len,
        grid_h=h,
        grid_w=w,
        pad_id=text_tokenizer.pad_id,
    )
    return DALLE(mcfg)


def main(argv: list[str] | None = None) -> int:
    cfg, args = loop.parse_args(argv, __doc__)
    tc = cfg.train.dalle
    accelerator = loop.make_accelerator(tc)
    seed_everything(cfg.seed)
    text_tokenizer = load_text_tokenizer(cfg.out_dir, cfg)
    image_tokenizer = load_vae(cfg.out_dir).to(accelerator.device)
    model = build_model(cfg, text_tokenizer, image_tokenizer)
    model.gradient_checkpointing = tc.grad_checkpointing
    optimizer = adamw(model.param_groups(tc.weight_decay), tc, accelerator)
    batches = token_batches(
        cfg, cfg.data.split, tc.batch_size, train=True, accelerator=accelerator, image_tokenizer=image_tokenizer
    )
    null_caption_p = cfg.transformer.caption_dropout
    rank = accelerator.process_index
    seq_len = model.cfg.text_len + model.cfg.grid_h * model.cfg.grid_w

    def text_ids(captions: list[str], step: int | None) -> torch.Tensor:
        if step is not None and null_caption_p > 0:
            # seeded by (seed, step, rank) so a resumed run drops the same captions
            drop = np.random.default_rng([cfg.seed, step, rank]).random(len(captions)) < null_caption_p
            captions = ["" if d else c for c, d in zip(captions, drop)]
        return text_tokenizer.encode(captions).to(accelerator.device)

    def loss(m, batch, step):
        text = text_ids(batch["caption"], step)
        image = batch["image_ids"].flatten(1)  # (b, n)
        value, parts = m.loss(text, image)
        return value, {k: float(v) for k, v in parts.items()}

    validation_batches = loop.replay(
        token_batches(
            cfg,
            cfg.data.val_split,
            tc.batch_size,
            train=False,
            accelerator=accelerator,
            image_tokenizer=image_tokenizer,
        ),
        tc.eval_batches,
    )

    @torch.no_grad()
    def evaluate(m, step):
        sums = torch.zeros(4, device=accelerator.device)  # loss, text, image, batches
        for batch in validation_batches():
            image = batch["image_ids"].to(accelerator.device).flatten(1)
            value, parts = m.loss(text_ids(batch["caption"], None), image)
            sums += torch.stack(
                [value.float(), parts["text_loss"].float(), parts["image_loss"].float(), sums.new_ones(())]
            )
        sums = accelerator.reduce(sums, "sum")
        n = max(float(sums[3]), 1.0)
        return {
            "val_loss": float(sums[0]) / n,
            "val_text_loss": float(sums[1]) / n,
            "val_image_loss": float(sums[2]) / n,
        }

    prompts = fixed_prompts(cfg)

    def log_images(m, step):
        gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
        text = text_tokenizer.encode(prompts).to(accelerator.device)
        null = text_tokenizer.encode([""]).to(accelerator.device)
        ids = generate(m, text, null_text=null, guidance_scale=cfg.sample.guidance_scale, top_p=0.95, generator=gen)
        h, w = m.cfg.grid_h, m.cfg.grid_w
        with torch.inference_mode():
            images = image_tokenizer.decode(ids.view(-1, h, w)).float().cpu()
        return {"dalle/samples": make_grid(images, nrow=len(prompts)), "dalle/prompts": " | ".join(prompts)}

    def export(m, state):
        out = Path(cfg.out_dir)
        save_state_dict(state, out / "transformer.safetensors")
        (out / "transformer.json").write_text(json.dumps(config_to_dict(m.cfg), indent=2) + "\n")

    stage = loop.Stage(
        name="dalle",
        model=model,
        optimizer=optimizer,
        batches=batches,
        loss=loss,
        items_per_batch=lambda batch: len(batch["caption"]) * seq_len,
        item_name="tokens",
        evaluate=evaluate,
        log_images=log_images,
        export=export,
    )
    loop.report("dalle", loop.run(cfg, tc, stage, accelerator, args), accelerator)
    return 0


def fixed_prompts(cfg: RunConfig) -> list[str]:
    """The prompts whose samples are logged during training."""
    if cfg.data.source == "shapes":
        return [
            "a large red circle in the center",
            "a small blue square in the top left corner",
            "a green triangle at the bottom",
            "a yellow circle to the left of a purple square",
        ]
    return ["a red apple", "a smiling face", "a flag", "a cat"]


if __name__ == "__main__":
    run_cli(main)
