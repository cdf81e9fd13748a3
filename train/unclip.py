"""Train unCLIP's decoder: `accelerate launch -m train.unclip --config configs/shapes.toml`.

DALL-E 2's decoder (Ramesh et al. 2022), with this project's transformer in place of the paper's diffusion
model: the transformer of `train.dalle` (the `transformer` section's size) that also reads a CLIP image
embedding, projected to `unclip.cond_len` positions before the caption. Trained on the token shards of
`train.encode` with the bundle CLIP's embedding of every row's image beside them (`train.embed`, computed
once), the embedding dropped with probability `unclip.embedding_dropout` and the caption with
`unclip.caption_dropout` (the paper: 10% and 50%), so that classifier-free guidance works on the embedding
and the decoder draws from an embedding alone (variations, interpolations). With
`unclip.init_from_transformer` (the default) it starts from the run's trained transformer, which can already
draw from captions, and learns to read the embedding (fine-tuning, rather than training from nothing).
`--init-from BUNDLE_OR_RUN` starts from that model's decoder instead (or its transformer, when it has no decoder),
and `train.unclip.freeze` leaves parameter groups untrained, as `train.dalle`'s (train.finetune).

Needs the text tokenizer, the image tokenizer, the token shards, CLIP and (to start from it) the transformer in
the run folder. Writes
RUN/unclip.safetensors (+ unclip.json, its TransformerConfig), checkpoints under RUN/checkpoints/unclip/ and
TensorBoard logs under RUN/logs/unclip/ (losses, validation loss, and grids of validation images over their
variations).
"""

from __future__ import annotations

from dalle_mini_impl.errors import run_cli
from train import loop
from train.dalle import train


def main(argv: list[str] | None = None) -> int:
    cfg, args = loop.parse_args(argv, __doc__)
    return train(cfg, args, "unclip")


if __name__ == "__main__":
    run_cli(main)
