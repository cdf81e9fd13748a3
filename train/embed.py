"""CLIP embeddings beside the token shards, for unCLIP's stages: computed once, read by `train.unclip` and
`train.prior`.

    RUN/tokens/<split>/clip.safetensors   image (N, e), text (N, e): l2-normalised float32, one row per
                                          shard row in `read_shards` order; metadata: the CLIP's fingerprint

The image embedding is of the row's image as the run's image tokenizer decodes its ids: what the decoder can
draw, and all a token shard keeps. The text embedding is of its caption. A file made by another CLIP (another
fingerprint) or for other rows is recomputed; an interrupted write leaves only a temporary file.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from dalle_mini_impl.data.tokens import read_shards, tokens_dir
from dalle_mini_impl.pipeline.bundle import load_clip, load_vae, save_state_dict

FILE = "clip.safetensors"


def _read(path, fingerprint: str, rows: int) -> dict[str, torch.Tensor] | None:
    """The file's embeddings when it was made by this CLIP for `rows` rows, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("clip") != fingerprint or int(meta.get("rows", -1)) != rows:
                return None
            return {k: f.get_tensor(k) for k in ("image", "text")}
    except Exception:  # noqa: BLE001 - unreadable: recompute it
        return None


def clip_embeddings(run_dir, split: str, device: torch.device, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{"image": (N, e), "text": (N, e)} for the token shards of `split` in the run folder, computed once."""
    folder = tokens_dir(run_dir, split)
    ids, captions = read_shards(folder)  # a missing split is a one-sentence error
    clip = load_clip(run_dir, device=device)
    path = folder / FILE
    found = _read(path, clip.fingerprint(), len(captions))
    if found is not None:
        return found
    vae = load_vae(run_dir).to(device)
    images, texts = [], []
    for start in tqdm(range(0, len(captions), batch_size), desc=f"CLIP embeddings {split}", dynamic_ncols=True):
        with torch.inference_mode():
            pixels = vae.decode(ids[start : start + batch_size].to(device)).float()
        images.append(clip.embed_images(pixels))
        texts.append(clip.embed_texts(captions[start : start + batch_size]))
    out = {"image": torch.cat(images).float(), "text": torch.cat(texts).float()}
    meta = {"clip": clip.fingerprint(), "rows": str(len(captions)), "source": json.dumps(str(run_dir))}
    save_state_dict(out, path, metadata=meta)
    return out


def shared_embeddings(run_dir, split: str, accelerator) -> dict[str, torch.Tensor]:
    """`clip_embeddings` computed by the main process while the others wait, then read by every process."""
    if accelerator.is_main_process:
        clip_embeddings(run_dir, split, accelerator.device)
    accelerator.wait_for_everyone()
    return clip_embeddings(run_dir, split, accelerator.device)


__all__ = ["FILE", "clip_embeddings", "shared_embeddings"]
