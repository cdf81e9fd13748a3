"""CLIP embeddings beside the token shards, for unCLIP's stages: computed once, read by `train.unclip` and
`train.prior` (which compute them when they are missing), or ahead of them:

    python -m train.embed --config configs/shapes.toml --out RUN      # data.split and data.val_split

    RUN/tokens/<split>/clip.safetensors   image (N, e), text (N, e): l2-normalised float32, one row per
                                          shard row in `read_shards` order; with `unclip.grid` > 0 also grid
                                          (N, G) float16, CLIP's spatial features (`CLIP.image_grid`); metadata:
                                          the CLIP's fingerprint, the rows' digest and the grid's side

The image embedding is of the row's image as the run's image tokenizer decodes its ids: what the decoder can
draw, and all a token shard keeps. The text embedding is of its caption. A file made by another CLIP (another
fingerprint) or of other rows (a digest of the shards' ids and captions and of the image tokenizer's weights:
re-encoded shards, a retrained tokenizer) is recomputed; an interrupted write leaves only a temporary file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from dalle_mini_impl.clip.uses import state_fingerprint
from dalle_mini_impl.data.tokens import check_encoded, check_shards_tokenizer, read_shards, tokenizer_digest, tokens_dir
from dalle_mini_impl.pipeline.bundle import load_clip, load_vae, part_path, save_state_dict
from train.common import process_state, progress_bar, require_parts

FILE = "clip.safetensors"


def rows_digest(ids: torch.Tensor, captions: list[str], vae) -> str:
    """What a split's embeddings are of: its shards' ids (N, n) and captions, and the image tokenizer that decodes
    the ids into the images CLIP embeds."""
    weights = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    return state_fingerprint({"ids": ids, **weights}, {"captions": captions})


def _read(path, fingerprint: str, rows: int, grid: int, digest: str) -> dict[str, torch.Tensor] | None:
    """The file's embeddings when it was made by this CLIP for `rows` rows of this `digest` (`rows_digest`) with a
    grid of side `grid`, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            made = (meta.get("clip"), int(meta.get("rows", -1)), int(meta.get("grid", 0)), meta.get("data"))
            if made != (fingerprint, rows, grid, digest):
                return None
            found = {k: f.get_tensor(k) for k in ("image", "text", "grid") if k != "grid" or grid}
    except Exception:  # noqa: BLE001 - unreadable: recompute it
        return None
    # a file whose tensors a hand or bit rot changed under intact metadata: one row each, finite, the two
    # embeddings of one width (else a NaN embedding stopped training as a non-finite loss, blaming the lr)
    if any(t.dim() != 2 or t.shape[0] != rows or not torch.isfinite(t.float()).all() for t in found.values()):
        return None
    return found if found["image"].shape[1] == found["text"].shape[1] else None


def clip_embeddings(
    run_dir, split: str, device: torch.device, batch_size: int = 256, grid: int = 0
) -> dict[str, torch.Tensor]:
    """{"image": (N, e), "text": (N, e)} for the token shards of `split` in the run folder, computed once; with
    grid > 0 also "grid" (N, G), CLIP's spatial features pooled to grid x grid (`CLIP.image_grid`)."""
    require_parts(run_dir, "vae", "clip")  # naming the stage to run first
    folder = tokens_dir(run_dir, split)
    check_encoded(folder)
    ids, captions = read_shards(folder)  # a missing split is a one-sentence error
    check_shards_tokenizer(folder, tokenizer_digest(part_path(run_dir, "vae")))  # the images are the VAE's drawings
    clip, vae = load_clip(run_dir, device=device), load_vae(run_dir).to(device)
    path = folder / FILE
    digest = rows_digest(ids, captions, vae)
    found = _read(path, clip.fingerprint(), len(captions), grid, digest)
    if found is not None:
        return found
    out = {"image": [], "text": [], "grid": []}
    for start in progress_bar(True, iterable=range(0, len(captions), batch_size), desc=f"CLIP embeddings {split}"):
        with torch.inference_mode():
            pixels = vae.decode(ids[start : start + batch_size].to(device)).float()
        if grid:  # float16: 64,000 rows of a 4 x 4 grid of width 128 take 262 MB
            image, spatial = clip.embed_images_and_grid(pixels, grid)
            out["image"].append(image)
            out["grid"].append(spatial.half())
        else:
            out["image"].append(clip.embed_images(pixels))
        out["text"].append(clip.embed_texts(captions[start : start + batch_size]))
    out = {k: torch.cat(v).cpu() for k, v in out.items() if v}  # on the CPU, as a read file gives them
    meta = {"clip": clip.fingerprint(), "rows": str(len(captions)), "grid": str(grid), "data": digest}
    save_state_dict(out, path, metadata=meta | {"source": json.dumps(str(run_dir))})
    return out


def shared_embeddings(run_dir, split: str, accelerator, grid: int = 0) -> dict[str, torch.Tensor]:
    """`clip_embeddings` computed by the main process while the others wait, then read by the others."""
    found = clip_embeddings(run_dir, split, accelerator.device, grid=grid) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return found if found is not None else clip_embeddings(run_dir, split, accelerator.device, grid=grid)


def main(argv: list[str] | None = None) -> int:
    """The embeddings (and with `unclip.grid` the grids) of RUN's token shards of the training and validation
    splits, computed unless a file made by RUN's CLIP for them is there; prints one JSON line: rows and file."""
    import argparse

    from dalle_mini_impl.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args(argv))
    state = process_state()  # the main process computes, the others wait (`shared_embeddings`)
    splits = {}
    for split in (cfg.data.split, cfg.data.val_split):
        found = shared_embeddings(cfg.out_dir, split, state, cfg.unclip.grid)
        splits[split] = {"rows": len(found["image"]), "file": str(tokens_dir(cfg.out_dir, split) / FILE)}
    if state.is_main_process:
        print(json.dumps({"run": str(Path(cfg.out_dir)), "grid": cfg.unclip.grid, "splits": splits}))
    return 0


__all__ = ["FILE", "clip_embeddings", "main", "shared_embeddings"]


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
