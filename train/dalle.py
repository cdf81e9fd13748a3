"""Train the DALL-E transformer: `accelerate launch -m train.dalle --config configs/shapes.toml`.

Needs the text tokenizer (`python -m train.tokenizer`) and the image tokenizer (`train.vae`) in the
run folder. Trains on the token shards of `python -m train.encode` when they exist (LlamaGen's way:
pixels are encoded once), and otherwise encodes each batch on the fly with the frozen image
tokenizer. Caption dropout (the empty caption with probability `transformer.caption_dropout`)
teaches the unconditional model that classifier-free guidance needs.

`--init-from BUNDLE_OR_RUN` starts from that model's transformer instead of random weights (fine-tuning;
a run folder without the tokenizers gets the source's copied in), and `train.dalle.freeze` leaves parameter
groups untrained: embeddings, condition (unCLIP's decoder), blocks or blocks.N, norm, head (train.finetune).

Writes RUN/transformer.safetensors (+ transformer.json, the model config), checkpoints under
RUN/checkpoints/dalle/, and TensorBoard logs under RUN/logs/dalle/ (text and image losses, LR,
gradient norm, tokens/s, validation loss, and sample grids for fixed prompts).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from dalle_mini_impl.config import RunConfig, config_to_dict
from dalle_mini_impl.data.images import make_grid
from dalle_mini_impl.data.tokens import (
    TokenStream,
    check_encoded,
    check_shards_tokenizer,
    list_shards,
    tokenizer_digest,
    tokens_dir,
)
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.files import write_atomic
from dalle_mini_impl.model.generate import generate
from dalle_mini_impl.model.transformer import DALLE, resolve_config
from dalle_mini_impl.pipeline.bundle import FILES, load_text_tokenizer, load_vae, part_path, save_state_dict
from train import finetune, loop
from train.common import (
    adamw,
    check_run_settings,
    example_batches,
    require_parts,
    seed_everything,
)

# the unCLIP decoder's weights a transformer has not: the CLIP embedding's projection and position vectors
DECODER_OWN = ("cond_proj.weight", "cond_pos.weight", "cond_token_proj.weight")
# the prompts whose samples the stage logs on shapes; on other data, the first validation captions (as many)
SHAPES_PROMPTS = [
    "a large red circle in the center",
    "a small blue square in the top left corner",
    "a green triangle at the bottom",
    "a yellow circle to the left of a purple square",
]


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


def token_batches(
    cfg: RunConfig, split: str, batch_size: int, *, train: bool, accelerator, image_tokenizer, extra=None
):
    """Token batches of a split: from its shards, else encoded on the fly. `extra` (per-row tensors beside the
    shards, keyed as the batches will carry them) needs the shards."""
    folder = tokens_dir(cfg.out_dir, split)
    check_encoded(folder)  # shards an encode is writing are not the split yet
    if list_shards(folder):
        weights = Path(cfg.out_dir) / FILES["vae"]
        if weights.is_file():  # ids of another tokenizer would name other codes: refused, not trained on
            check_shards_tokenizer(folder, tokenizer_digest(weights))
        stream = TokenStream(
            folder,
            batch_size,
            train=train,
            seed=cfg.seed,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            extra=extra,
        )
        # an id past the codebook (a hand edit, bit rot, a shard without a digest) was an IndexError at a step
        top = int(stream.image_ids.max())
        if image_tokenizer is not None and top >= image_tokenizer.codebook_size:
            raise UserError(
                f"token shards in '{folder}' hold the image id {top}, past the image tokenizer's "
                f"{image_tokenizer.codebook_size} codes; delete them and rerun train.encode"
            )
        return stream
    if extra:
        raise UserError(f"no token shards in '{folder}'; run `python -m train.encode` with the same config first")
    batches = example_batches(cfg, split, batch_size, train=train, accelerator=accelerator)
    return EncodedOnTheFly(batches, image_tokenizer, accelerator.device)


def build_model(cfg: RunConfig, text_tokenizer, image_tokenizer, cond_dim: int = 0) -> DALLE:
    """The run's transformer; with cond_dim > 0, unCLIP's decoder: the same size, fed CLIP embeddings of
    cond_dim numbers as `unclip.cond_len` prefix positions, trained with the `unclip` section's dropouts."""
    h, w = image_tokenizer.grid(cfg.data.image_size)
    tcfg = cfg.transformer
    if cond_dim:
        u = cfg.unclip
        cells = u.grid**2 if u.grid_tokens else 0  # the grid's cells as positions of their own, after cond_len
        tcfg = dataclasses.replace(
            tcfg,
            cond_dim=cond_dim,
            cond_len=u.cond_len + cells,
            cond_tokens=cells,
            cond_token_dim=(cond_dim - cfg.clip.embed_dim) // cells if cells else 0,
            cond_dropout=u.embedding_dropout,
            caption_dropout=u.caption_dropout,
        )
    mcfg = resolve_config(
        tcfg,
        text_vocab=text_tokenizer.vocab_size,
        image_vocab=image_tokenizer.codebook_size,
        image_factors=image_tokenizer.group_sizes,
        text_len=cfg.text.text_len,
        grid_h=h,
        grid_w=w,
        pad_id=text_tokenizer.pad_id,
    )
    return DALLE(mcfg)


def check_unclip(cfg: RunConfig) -> None:
    """What unCLIP's decoder needs of the `unclip` section beyond types (CLIP checks the grid against its patches)."""
    u = cfg.unclip
    if u.cond_len < 1:  # once named as the transformer's 'cond_len', after the transformer had trained
        raise UserError(f"config key 'unclip.cond_len' is {u.cond_len}; give the embedding 1 or more positions, e.g. 4")
    if u.grid < 0:
        raise UserError(f"config key 'unclip.grid' is {u.grid}; set it to 0 (the embedding alone) or a grid side")
    if u.grid_tokens and not u.grid:
        raise UserError("config key 'unclip.grid_tokens' is true with unclip.grid 0; set unclip.grid to a grid side")
    for key in ("embedding_dropout", "caption_dropout", "grid_dropout"):
        if not 0 <= getattr(u, key) <= 1:
            raise UserError(f"config key 'unclip.{key}' is {getattr(u, key)}; set it between 0 and 1")


def widen_to_grid(state: dict[str, torch.Tensor], model: DALLE) -> dict[str, torch.Tensor]:
    """A decoder's weights for `model` when it reads CLIP's spatial features (`unclip.grid`) and they do not: the
    projection's new input rows start at zero, so the widened decoder draws exactly what the source drew
    until training teaches it to read the grid. With the grid's cells as positions of their own
    (`unclip.grid_tokens`), the source's positions come first and the cells' positions and projection are
    `model`'s own initialisation (new positions change what the decoder draws: not exactly the source's). Any
    other state is returned as it is."""
    ours, changes = model.state_dict(), {}
    name = "cond_proj.weight"  # (in, out): an input per row
    theirs, mine = state.get(name), ours.get(name)
    if theirs is not None and mine is not None and theirs.shape[1] == mine.shape[1] and theirs.shape[0] < mine.shape[0]:
        changes[name] = torch.cat([theirs, theirs.new_zeros(mine.shape[0] - theirs.shape[0], mine.shape[1])])
    name = "cond_pos.weight"
    theirs, mine = state.get(name), ours.get(name)
    if theirs is not None and mine is not None and theirs.shape[0] < mine.shape[0] and "cond_token_proj.weight" in ours:
        changes[name] = torch.cat([theirs, mine[theirs.shape[0] :].to(theirs.dtype)])
        if "cond_token_proj.weight" not in state:
            changes["cond_token_proj.weight"] = ours["cond_token_proj.weight"].to(theirs.dtype)
    return state | changes if changes else state


def start_from_transformer(decoder: DALLE, run: Path) -> None:
    """Load the run's trained transformer into unCLIP's decoder in place: every weight but the embedding's own
    (its projection and position vectors, which keep their initialisation). A checkpoint resumed later wins."""
    if not (run / FILES["transformer"]).is_file():
        raise UserError(
            f"run folder '{run}' has no {FILES['transformer']} to start unCLIP's decoder from; run python -m "
            "train.dalle with the same --config and --out first, or set unclip.init_from_transformer=false"
        )
    finetune.load_weights(
        decoder,
        part_path(run, "transformer"),
        "unCLIP decoder",
        keep_own=DECODER_OWN,
        fix="set unclip.init_from_transformer=false or train the transformer with this config",
    )


def start_from_source(model: DALLE, source: Path, cfg: RunConfig, stage: str) -> None:
    """`--init-from`: the source's transformer, or for unCLIP's decoder the source's decoder; from a source
    without one, its transformer, as `unclip.init_from_transformer` starts from the run's."""
    if stage == "dalle":
        finetune.start_from(model, source, "transformer", "transformer", cfg, stage)
    elif (source / FILES["unclip"]).is_file():  # a decoder without the grid starts one with it
        finetune.warn_if_other_clip(source, cfg, "unCLIP decoder")
        finetune.start_from(model, source, "unclip", "unCLIP decoder", cfg, stage, adapt=widen_to_grid)
    else:
        finetune.start_from(model, source, "transformer", "unCLIP decoder", cfg, stage, keep_own=DECODER_OWN)


def main(argv: list[str] | None = None) -> int:
    cfg, args = loop.parse_args(argv, __doc__)
    return train(cfg, args, "dalle")


def train(cfg: RunConfig, args, stage: str) -> int:
    """Train the DALL-E transformer (stage "dalle"), or unCLIP's decoder (stage "unclip", `train.unclip`): the
    same model and loop, the decoder also reading each row's CLIP image embedding (`train.embed`)."""
    tc = getattr(cfg.train, stage)
    accelerator = loop.make_accelerator(tc, key=f"train.{stage}.")
    seed_everything(cfg.seed)
    source = finetune.init_source(cfg, args, stage)
    if source is not None:  # its weights read its tokenizers' ids: the run keeps them
        finetune.adopt_text_tokenizer(source, cfg, accelerator)
        finetune.adopt_image_tokenizer(source, cfg, accelerator)
    require_parts(cfg.out_dir, "text", "vae", *(["clip"] if stage == "unclip" else []))
    check_run_settings(cfg)  # else a model of another text length or grid than config.json says: unloadable
    text_tokenizer = load_text_tokenizer(cfg.out_dir, cfg)
    image_tokenizer = load_vae(cfg.out_dir).to(accelerator.device)
    extra, embed_dim = {}, 0
    if stage == "unclip":
        from train.embed import shared_embeddings

        check_unclip(cfg)
        for split in (cfg.data.split, cfg.data.val_split):
            found = shared_embeddings(cfg.out_dir, split, accelerator, cfg.unclip.grid)
            # the decoder's input: the embedding, then (unclip.grid) the spatial features
            extra[split] = {"embedding": torch.cat([found["image"], found["grid"].float()], 1) if cfg.unclip.grid
                            else found["image"]}  # fmt: skip
            embed_dim = found["image"].shape[1]
    cond_dim = extra[cfg.data.split]["embedding"].shape[1] if extra else 0
    model = build_model(cfg, text_tokenizer, image_tokenizer, cond_dim)
    if source is not None:
        start_from_source(model, source, cfg, stage)
    elif stage == "unclip" and cfg.unclip.init_from_transformer and not finetune.resuming(cfg, args, stage):
        start_from_transformer(model, Path(cfg.out_dir))  # a resumed checkpoint holds the decoder's own weights
    finetune.freeze(model, "transformer", tc.freeze, stage)
    model.gradient_checkpointing = tc.grad_checkpointing
    optimizer = adamw(model.param_groups(tc.weight_decay), tc, accelerator)
    batches = token_batches(
        cfg,
        cfg.data.split,
        tc.batch_size,
        train=True,
        accelerator=accelerator,
        image_tokenizer=image_tokenizer,
        extra=extra.get(cfg.data.split),
    )
    null_caption_p, null_cond_p, null_grid_p = (
        model.cfg.caption_dropout,
        model.cfg.cond_dropout,
        cfg.unclip.grid_dropout,
    )
    rank = accelerator.process_index
    seq_len = model.cfg.seq_len + 1

    def dropped(n: int, draw: tuple[int, int] | None, p: float, which: int) -> np.ndarray:
        """Which of n rows drop their caption (which 0), embedding (1) or grid (2) at a training step's micro-batch
        (draw: (step, micro); None: none)."""
        if draw is None or p <= 0:
            return np.zeros(n, dtype=bool)
        (step, micro) = draw
        # seeded by (seed, step, rank, which, micro) so a resumed run drops the same ones; the first micro-batch's
        # caption draw keeps the seeding the DALL-E stage always had
        key = [cfg.seed, step, rank] + ([which] if which or micro else []) + ([micro] if micro else [])
        return np.random.default_rng(key).random(n) < p

    def text_ids(captions: list[str], draw: tuple[int, int] | None) -> torch.Tensor:
        drop = dropped(len(captions), draw, null_caption_p, 0)
        captions = ["" if d else c for c, d in zip(captions, drop)]
        return text_tokenizer.encode(captions).to(accelerator.device)

    def cond_of(batch: dict, draw: tuple[int, int] | None) -> torch.Tensor | None:
        """The batch's embeddings with the dropped ones zeroed (a dropped embedding drops its grid too; the grid is
        also dropped alone), or None for the DALL-E transformer."""
        if "embedding" not in batch:
            return None
        cond = batch["embedding"].to(accelerator.device)
        keep = torch.from_numpy(~dropped(cond.shape[0], draw, null_cond_p, 1)).to(cond.device)
        cond = cond * keep[:, None].to(cond.dtype)
        if cond.shape[1] > embed_dim:
            keep_grid = torch.from_numpy(~dropped(cond.shape[0], draw, null_grid_p, 2)).to(cond.device)
            cond[:, embed_dim:] *= keep_grid[:, None].to(cond.dtype)
        return cond

    def loss(m, batch, step, micro):
        text = text_ids(batch["caption"], (step, micro))
        image = batch["image_ids"].flatten(1)  # (b, n)
        value, parts = m.loss(text, image, cond_of(batch, (step, micro)))
        return value, {k: v.detach() for k, v in parts.items()}  # read by the loop once the backward is queued

    validation_batches = loop.Replay(
        token_batches(
            cfg,
            cfg.data.val_split,
            tc.batch_size,
            train=False,
            accelerator=accelerator,
            image_tokenizer=image_tokenizer,
            extra=extra.get(cfg.data.val_split),
        ),
        tc.eval_batches,
    )

    @torch.no_grad()
    def evaluate(m, step):
        sums = torch.zeros(4, device=accelerator.device)  # loss, text, image, batches
        for batch in validation_batches():
            image = batch["image_ids"].to(accelerator.device).flatten(1)
            value, parts = m.loss(text_ids(batch["caption"], None), image, cond_of(batch, None))
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

    prompts, sources, cond = SHAPES_PROMPTS if cfg.data.source == "shapes" else None, None, None
    if extra:  # unCLIP: variations of the first validation images (caption dropped), shown above them
        val = next(iter(validation_batches()))
        sources = val["image_ids"][: len(SHAPES_PROMPTS)]
        cond = val["embedding"][: len(sources)].to(accelerator.device)
        prompts = [""] * cond.shape[0]
    elif prompts is None:  # the data's own captions: the first validation ones, their images above their samples
        val = next(iter(validation_batches()))
        sources, prompts = val["image_ids"][: len(SHAPES_PROMPTS)], list(val["caption"][: len(SHAPES_PROMPTS)])

    def log_images(m, step):
        gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
        text = text_tokenizer.encode(prompts).to(accelerator.device)
        null = text_tokenizer.encode([""]).to(accelerator.device)
        ids = generate(
            m, text, cond=cond, null_text=null, guidance_scale=cfg.sample.guidance_scale, top_p=0.95, generator=gen
        )
        h, w = m.cfg.grid_h, m.cfg.grid_w
        if sources is not None:
            ids = torch.cat([sources.to(ids.device).flatten(1), ids])
        with torch.inference_mode():
            images = image_tokenizer.decode(ids.view(-1, h, w)).float().cpu()
        if cond is not None:
            shown = "sources (top) and their variations"
        elif sources is not None:
            shown = "validation images (top) and samples of their captions: " + " | ".join(prompts)
        else:
            shown = " | ".join(prompts)
        return {f"{stage}/samples": make_grid(images, nrow=len(prompts)), f"{stage}/prompts": shown}

    name = "transformer" if stage == "dalle" else "unclip"

    def export(m, state):  # the weights last: they mark the stage done, so a kill between leaves it undone
        out = Path(cfg.out_dir)
        text = json.dumps(config_to_dict(m.cfg), indent=2) + "\n"
        write_atomic(out / f"{name}.json", lambda tmp: tmp.write_text(text))
        save_state_dict(state, out / f"{name}.safetensors")

    stage_ = loop.Stage(
        name=stage,
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
    loop.report(stage, loop.run(cfg, tc, stage_, accelerator, args), accelerator)
    return 0


if __name__ == "__main__":
    run_cli(main)
