"""Train unCLIP's prior: `accelerate launch -m train.prior --config configs/shapes.toml`.

A caption -> a CLIP image embedding (`dalle_mini_impl.model.prior`: a diffusion prior predicting the clean
embedding, or a regression one, `unclip.prior.kind`), trained on the captions of the token shards, their CLIP
text embeddings and their images' CLIP embeddings (`train.embed`, computed once beside the shards). The
caption (ids and text embedding) is dropped with probability `unclip.prior.text_dropout` for classifier-free
guidance.

Needs the text tokenizer, the image tokenizer, the token shards and CLIP in the run folder. Writes
RUN/prior.safetensors (+ prior.json: its config and geometry), checkpoints under RUN/checkpoints/prior/ and
TensorBoard logs under RUN/logs/prior/: the loss, and on the validation split the cosine of a sampled embedding
to the image's own (`val_cosine`) beside the cosine of the caption's text embedding to it (`val_text_cosine`,
what a decoder fed the text embedding directly would get).

`--init-from BUNDLE_OR_RUN` starts from that model's prior and text tokenizer instead of random weights, and
`train.prior.freeze` leaves parameter groups untrained: embeddings, inputs, blocks or blocks.N, norm, head
(train.finetune).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dalle_mini_impl.config import RunConfig, config_to_dict
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.files import write_atomic
from dalle_mini_impl.model.prior import EmbeddingPrior
from dalle_mini_impl.pipeline.bundle import load_text_tokenizer, save_state_dict
from train import finetune, loop
from train.common import adamw, require_parts, seed_everything
from train.dalle import token_batches


def build_prior(cfg: RunConfig, text_tokenizer, embed_dim: int) -> EmbeddingPrior:
    return EmbeddingPrior(
        cfg.unclip.prior,
        embed_dim=embed_dim,
        text_vocab=text_tokenizer.vocab_size,
        text_len=cfg.text.text_len,
        pad_id=text_tokenizer.pad_id,
    )


def prior_geometry(model: EmbeddingPrior) -> dict:
    """What prior.json holds: the prior's config and the numbers its tokenizer and CLIP gave it."""
    return {
        "prior": config_to_dict(model.cfg),
        "embed_dim": model.embed_dim,
        "text_vocab": model.text_emb.num_embeddings,
        "text_len": model.text_len,
        "pad_id": model.pad_id,
    }


def main(argv: list[str] | None = None) -> int:
    from train.embed import shared_embeddings

    cfg, args = loop.parse_args(argv, __doc__)
    tc = cfg.train.prior
    accelerator = loop.make_accelerator(tc, key="train.prior.")
    seed_everything(cfg.seed)
    source = finetune.init_source(cfg, args, "prior")
    if source is not None:
        finetune.adopt_text_tokenizer(source, cfg, accelerator)
    require_parts(cfg.out_dir, "text", "vae", "clip")  # the embeddings are CLIP's of the VAE's drawings
    text_tokenizer = load_text_tokenizer(cfg.out_dir, cfg)
    rank = accelerator.process_index

    def stream(split: str, train: bool, batch_size: int):
        emb = shared_embeddings(cfg.out_dir, split, accelerator, cfg.unclip.grid)  # the decoder's file: one for both
        extra = {"image_emb": emb["image"], "text_emb": emb["text"]}
        return token_batches(
            cfg, split, batch_size, train=train, accelerator=accelerator, image_tokenizer=None, extra=extra
        )

    batches = stream(cfg.data.split, True, tc.batch_size)
    model = build_prior(cfg, text_tokenizer, batches.extra["image_emb"].shape[1])
    if source is not None:
        finetune.warn_if_other_clip(source, cfg, "prior")
        finetune.start_from(model, source, "prior", "unCLIP prior", cfg, "prior")
    finetune.freeze(model, "prior", tc.freeze, "prior")
    if tc.grad_checkpointing:
        raise UserError(
            "train.prior.grad_checkpointing is true, and the prior does not checkpoint its activations; set it to false"
        )
    optimizer = adamw(model.parameters(), tc, accelerator)
    drop_p = cfg.unclip.prior.text_dropout
    device = accelerator.device

    def inputs(batch: dict):
        text = text_tokenizer.encode(batch["caption"]).to(device)
        return text, batch["text_emb"].to(device), batch["image_emb"].to(device)

    def loss(m, batch, step, micro):
        text, text_emb, image_emb = inputs(batch)
        # seeded by (seed, step, rank), and the micro-batch after the first, so a resumed run draws the same noise
        # and drops the same captions
        rng = np.random.default_rng([cfg.seed, step, rank] + ([micro] if micro else []))
        keep = torch.from_numpy(rng.random(len(batch["caption"])) >= drop_p).to(device)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        value, parts = m.loss(text, text_emb, image_emb, generator=gen, keep=keep)
        return value, {k: v.detach() for k, v in parts.items()}  # read by the loop once the backward is queued

    validation_batches = loop.Replay(stream(cfg.data.val_split, False, tc.batch_size), tc.eval_batches)

    @torch.no_grad()
    def evaluate(m, step):
        sums = torch.zeros(4, device=device)  # loss, sampled cosine, text cosine, rows
        gen = torch.Generator().manual_seed(cfg.seed)
        for batch in validation_batches():
            text, text_emb, image_emb = inputs(batch)
            value, _ = m.loss(text, text_emb, image_emb, generator=gen)
            sampled = m.sample(text, text_emb, generator=gen)
            rows = text.shape[0]
            sums += torch.stack(
                [
                    value.float() * rows,
                    F.cosine_similarity(sampled, image_emb.float(), dim=-1).sum(),
                    F.cosine_similarity(text_emb.float(), image_emb.float(), dim=-1).sum(),
                    sums.new_tensor(float(rows)),
                ]
            )
        sums = accelerator.reduce(sums, "sum")
        n = max(float(sums[3]), 1.0)
        return {"val_loss": float(sums[0]) / n, "val_cosine": float(sums[1]) / n, "val_text_cosine": float(sums[2]) / n}

    def export(m, state):  # the weights last: they mark the stage done, so a kill between leaves it undone
        out = Path(cfg.out_dir)
        text = json.dumps(prior_geometry(m), indent=2) + "\n"
        write_atomic(out / "prior.json", lambda tmp: tmp.write_text(text))
        save_state_dict(state, out / "prior.safetensors")

    stage = loop.Stage(
        name="prior",
        model=model,
        optimizer=optimizer,
        batches=batches,
        loss=loss,
        items_per_batch=lambda batch: len(batch["caption"]),
        item_name="captions",
        evaluate=evaluate,
        export=export,
    )
    loop.report("prior", loop.run(cfg, tc, stage, accelerator, args), accelerator)
    return 0


if __name__ == "__main__":
    run_cli(main)
