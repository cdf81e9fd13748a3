"""What a trained CLIP is for: reranking samples, zero-shot labels, CLIPScore, and image search.

`ClipScorer` is the one scoring interface. `BundleClipScorer` is one over the CLIP trained here
(`clip/model.py`; `pipeline.bundle.load_clip(bundle)` loads it); `clip/openclip.py` gives one over
pretrained OpenAI / open_clip weights. Everything else (`sample`'s reranking, `classify`, `clip_score`,
the index) takes any `ClipScorer`.

Images are float tensors (m, 3, H, W) in [0, 1]; a scorer resizes them to its own input size
(shortest side, then a center crop), so any size works.

    scorer = load_clip("runs/shapes")                                      # from dalle_mini_impl.pipeline.bundle
    keep = scorer.score(candidates, "a red circle").topk(4).indices        # rerank: best 4 of M
    probs = scorer.classify(images, ["circle", "square", "triangle"])     # (b, 3), rows sum to 1
    build_index(scorer, "photos/", "photos.index"); search(scorer, "photos.index", "a red circle", k=5)

Zero-shot classification with prompt templates and template ensembling follows Radford et al. 2021
(section 3.1.4): a label's embedding is the renormalised mean of its normalised embeddings under
every template. CLIPScore follows Hessel et al. 2021 with w = 1 (as torchmetrics does): 100 * max(cos, 0),
on a 0..100 scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ..data.images import prepare_image
from ..errors import UserError
from ..files import write_atomic
from .model import CLIP

DEFAULT_TEMPLATES: tuple[str, ...] = ("{}", "a {}", "an image of a {}", "a picture of a {}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_FILES = ("embeddings.npy", "files.json", "meta.json")


# ----------------------------------------------------------------------------------------------
# The scoring interface
# ----------------------------------------------------------------------------------------------


def _fit(images: torch.Tensor, size: int) -> torch.Tensor:
    """(m, 3, H, W) -> (m, 3, size, size): resize the shortest side to `size`, then a center crop."""
    h, w = images.shape[-2:]
    if h == w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    images = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top : top + size, left : left + size].clamp(0, 1)


def _check_templates(templates: Sequence[str]) -> None:
    if not templates:
        raise UserError("no prompt templates were given; pass at least one, e.g. 'a {}'")
    for t in templates:
        if "{}" not in t:
            raise UserError(f"prompt template '{t}' has no '{{}}' for the label; write it like 'a photo of a {{}}'")


def _texts(texts: Sequence[str] | str, what: str) -> list[str]:
    """`texts` as a list of str (one str is a list of itself, not of its characters); any other item: one sentence
    (str() of a list scored the text "['a red circle']")."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UserError(f"{what} {i + 1} is a {type(t).__name__}, not text; give each as a str")
    return texts


def _check_images(images: torch.Tensor) -> None:
    """Images must be a float tensor (m, 3, H, W) in [0, 1]: uint8 pixels, a PIL image or 0..255 floats were read
    as they came, scored as other images than they are."""
    if not isinstance(images, torch.Tensor):
        raise UserError(
            f"images are a {type(images).__name__}; give a float tensor (m, 3, H, W) in [0, 1] (files and PIL images: "
            "clip.uses.read_image)"
        )
    if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        raise UserError(
            f"images are a {images.dtype} tensor of shape {tuple(images.shape)}; give floats (m, 3, H, W) in [0, 1] "
            "(uint8 pixels: divide by 255)"
        )
    if images.numel() and float(images.max()) > 2:
        raise UserError(
            f"images hold values up to {float(images.max()):g}; give them in [0, 1] (0..255 pixels: divide by 255)"
        )


def _check_labels(labels: Sequence[str]) -> None:
    if isinstance(labels, str):
        raise UserError(f"the labels are one string, '{labels}'; give a list of labels, e.g. ['circle', 'square']")
    if not labels or any(not str(label).strip() for label in labels):
        raise UserError("the labels are empty; pass them comma-separated, e.g. --labels circle,square,triangle")
    repeated = next((label for i, label in enumerate(labels) if label in labels[:i]), None)
    if repeated is not None:  # named alone: a long list echoed whole is no sentence
        raise UserError(f"the label '{repeated}' is given twice; give each label once")


class ClipScorer:
    """Embeds images and texts into one normalised space, and scores them against each other.

    Subclasses implement `_encode_images` (images (b, 3, S, S) in [0, 1] at `image_size` -> (b, e)),
    `_encode_texts` (list of str -> (n, e)), `logit_scale` and `fingerprint`; the rest is shared.
    """

    image_size: int  # the side the model reads; other sizes are resized
    source: str  # where the weights came from: a bundle folder or an open_clip model name
    device: torch.device
    batch_size: int = 64

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def logit_scale(self) -> float:
        """The multiplier of cosine similarities before a softmax (CLIP's learned temperature)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash of the weights and config: equal only for the same model."""
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (m, 3, H, W) in [0, 1] -> l2-normalised embeddings (m, e), on the CPU."""
        return self._in_batches(images, lambda x: F.normalize(self._encode_images(x).float(), dim=-1), self.embed_dim())

    def _in_batches(self, images: torch.Tensor, encode, width: int) -> torch.Tensor:
        """encode(images fitted to the model's size) batch by batch: (m, width) float32 on the CPU."""
        _check_images(images)
        out = [
            encode(_fit(chunk.to(self.device, torch.float32), self.image_size)).float().cpu()
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, width)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts (n; one str: n = 1) -> l2-normalised embeddings (n, e), on the CPU."""
        texts = _texts(texts, "text")
        out = [
            F.normalize(self._encode_texts(texts[i : i + self.batch_size]).float(), dim=-1).cpu()
            for i in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim())

    @torch.no_grad()
    def embed_dim(self) -> int:
        return int(self._encode_texts(["a"]).shape[-1])

    def score(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Cosine similarity (m,) of each image to one prompt; `.topk(n)` keeps the best n of m."""
        if not isinstance(prompt, str):
            raise UserError(f"score takes one prompt as a str, not a {type(prompt).__name__}; score each in turn")
        if not prompt.strip():
            raise UserError("the prompt is empty; describe the image to score against, e.g. 'a red circle'")
        return self.embed_images(images) @ self.embed_texts([prompt])[0]

    def embed_labels(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """One embedding per label (n, e): the renormalised mean over the templates (one str: one template) filled
        with it."""
        _check_labels(labels)
        templates = _texts(templates, "prompt template")
        _check_templates(templates)
        prompts = [t.replace("{}", label) for t in templates for label in labels]
        per_template = self.embed_texts(prompts).view(len(templates), len(labels), -1)  # (T, n, e)
        return F.normalize(per_template.mean(0), dim=-1)

    def classify(
        self, images: torch.Tensor, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """Zero-shot label probabilities (b, n) of each image, rows summing to 1."""
        logits = self.logit_scale() * self.embed_images(images) @ self.embed_labels(labels, templates).T
        return logits.softmax(dim=-1)


def state_fingerprint(state: dict[str, torch.Tensor], extra: dict) -> str:
    """sha256 (first 16 hex digits) over the tensors' names and bytes and a JSON-able `extra`."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class BundleClipScorer(ClipScorer):
    """A `ClipScorer` over the CLIP trained here and its sentencepiece tokenizer."""

    def __init__(
        self,
        model: CLIP,
        tokenizer,  # dalle_mini_impl.text.tokenizer.TextTokenizer, or anything with .encode(list[str]) -> (n, t)
        source: str = "",
        device: str | torch.device = "cpu",
        tokenizer_digest: str = "",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_size = model.image_size
        self.source = source
        self._tokenizer_digest = tokenizer_digest  # a different tokenizer means different text embeddings
        self._fingerprint: str | None = None

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    @torch.no_grad()
    def embed_image_grid(self, images: torch.Tensor, side: int) -> torch.Tensor:
        """Images (m, 3, H, W) in [0, 1] -> CLIP's spatial features (m, `grid_dim(side)`), on the CPU
        (`CLIP.image_grid`: unCLIP's decoder reads them beside the embedding when `unclip.grid` is side)."""
        return self._in_batches(images, lambda x: self.model.image_grid(x, side), self.grid_dim(side))

    @torch.no_grad()
    def embed_images_and_grid(self, images: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`embed_images` and `embed_image_grid` of the same images, the same values from one pass of the tower."""

        def encode(x: torch.Tensor) -> torch.Tensor:
            embedding, grid = self.model.image_features(x, side)
            return torch.cat([F.normalize(embedding.float(), dim=-1), grid.float()], dim=1)

        e = self.embed_dim()
        both = self._in_batches(images, encode, e + self.grid_dim(side))
        return both[:, :e], both[:, e:]

    def grid_dim(self, side: int) -> int:
        """The size of `embed_image_grid`'s rows: side * side positions of the image tower's width."""
        return side * side * self.model.cfg.image_width if side else 0

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer.encode(texts).to(self.device))

    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    def logit_scale(self) -> float:
        return float(self.model.scale().detach())

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            extra = {
                "clip": dataclasses.asdict(self.model.cfg),
                "image_size": self.model.image_size,
                "text_len": self.model.text_len,
                "tokenizer": self._tokenizer_digest,
            }
            self._fingerprint = state_fingerprint(self.model.state_dict(), extra)
        return self._fingerprint


def clip_score(scorer: ClipScorer, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """CLIPScore (m,) of each image with its own prompt: 100 * max(cos, 0), from 0 to 100 (w = 1)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"clip_score needs one prompt per image, got {len(prompts)} for {images.shape[0]}")
    cos = (scorer.embed_images(images) * scorer.embed_texts(prompts)).sum(-1)
    return 100 * cos.clamp_min(0)


# ----------------------------------------------------------------------------------------------
# Image files and the search index
# ----------------------------------------------------------------------------------------------


def open_image(image: str | os.PathLike | Image.Image | np.ndarray, what: str = "image") -> Image.Image:
    """A PIL image from a file path (a PIL image as it is, an array as PIL reads it); a missing or unreadable file
    is a UserError naming `what` ("image", "mask" ...)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):  # an (H, W, 3) or (H, W) uint8 array, as PIL reads it
        try:
            return Image.fromarray(image)
        except (TypeError, ValueError) as e:
            raise UserError(
                f"{what} is an array of shape {image.shape} and type {image.dtype}, which is no image ({e}); give "
                "an (H, W, 3) uint8 array, a PIL image or a file"
            ) from None
    if not isinstance(image, (str, os.PathLike)):
        raise UserError(f"{what} is a {type(image).__name__}; give a file path, a PIL image or an (H, W, 3) array")
    path = Path(image)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder; give an image file in it (PNG or JPEG)")
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist; check the path")
    try:
        with Image.open(path) as pil:
            pil.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(_unreadable(what, path, e)) from None
    try:  # a photo taken sideways, upright as the training data and the web app read it
        return ImageOps.exif_transpose(pil)
    except Exception:  # an EXIF block PIL cannot read: the pixels as stored (data.streams.decode_image does so too)
        return pil


def read_image(image: str | os.PathLike | Image.Image, size: int, what: str = "image") -> torch.Tensor:
    """An image file (or PIL image) as (3, size, size) in [0, 1]; a missing or unreadable file is a UserError."""
    pil = open_image(image, what)
    try:
        return prepare_image(pil, size)
    except (OSError, ValueError) as e:
        raise UserError(_unreadable(what, image, e)) from None


def _unreadable(what: str, image, error: Exception) -> str:
    return f"{what} '{image}' is not a readable image ({type(error).__name__}); pass a PNG or JPEG file"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under `folder` (by suffix), sorted; a missing folder is a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder '{folder}' does not exist; pass a folder of images")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def build_index(scorer: ClipScorer, folder: str | os.PathLike, out: str | os.PathLike, batch_size: int = 64) -> dict:
    """Embed every image under `folder` into `out/` (embeddings.npy, files.json, meta.json); returns meta.

    Unreadable files are skipped and listed in meta.json. Embeddings are float16, l2-normalised,
    in the order of files.json (paths relative to `folder`).
    """
    folder, out = Path(folder), Path(out)
    if out.exists() and not out.is_dir():  # before minutes of embedding
        raise UserError(f"--out '{out}' is a file; give a folder for the index (new, or an index to replace)")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"image folder '{folder}' has no images ({', '.join(IMAGE_SUFFIXES)}); point to another")
    kept: list[Path] = []
    skipped: list[str] = []
    feats: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            feats.append(scorer.embed_images(torch.stack(batch)))
            batch.clear()

    for path in tqdm(paths, desc="index", unit="img", disable=None):
        try:
            batch.append(read_image(path, scorer.image_size))
        except UserError:
            skipped.append(path.relative_to(folder).as_posix())
            continue
        kept.append(path)
        if len(batch) == batch_size:
            flush()
    flush()
    if not kept:
        raise UserError(f"no image under '{folder}' could be read; check the files")
    if skipped:
        print(f"skipped {len(skipped)} unreadable files, listed in {out / 'meta.json'}", file=sys.stderr)
    meta = {
        "fingerprint": scorer.fingerprint(),
        "model": scorer.source,
        "image_size": scorer.image_size,
        "n": len(kept),
        "root": str(folder.resolve()),
        "skipped": skipped,
    }
    out.mkdir(parents=True, exist_ok=True)
    vectors = torch.cat(feats).numpy().astype(np.float16)

    def save_vectors(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a handle: np.save given a path would add .npy to the temporary name
            np.save(f, vectors)

    write_atomic(out / "embeddings.npy", save_vectors)
    files = [p.relative_to(folder).as_posix() for p in kept]
    write_atomic(out / "files.json", lambda tmp: tmp.write_text(json.dumps(files, indent=0)))
    # meta.json last: an index without it is incomplete, whatever else is there
    write_atomic(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return meta


def read_index(index_dir: str | os.PathLike) -> tuple[np.ndarray, list[str], dict]:
    """(embeddings (n, e) float32, relative paths, meta) of an index folder; incomplete ones are refused."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise UserError(
            f"index folder '{index_dir}' does not exist; build it with `python -m dalle_mini_impl.clip index`"
        )
    for name in INDEX_FILES:
        if not (index_dir / name).is_file():
            raise UserError(
                f"index folder '{index_dir}' has no {name}; rebuild it with `python -m dalle_mini_impl.clip index`"
            )
    try:
        meta = json.loads((index_dir / "meta.json").read_text())
        files = json.loads((index_dir / "files.json").read_text())
        emb = np.load(index_dir / "embeddings.npy", allow_pickle=False).astype(np.float32)
    except (ValueError, OSError) as e:
        raise UserError(f"index folder '{index_dir}' is corrupted ({type(e).__name__}); rebuild it") from None
    if emb.ndim != 2 or emb.shape[0] != len(files) or "fingerprint" not in meta:
        raise UserError(f"index folder '{index_dir}' is inconsistent (embeddings vs files.json); rebuild it")
    return emb, files, meta


class LoadedIndex(NamedTuple):
    """An index folder read into memory (`load_index`): what a server searches again and again."""

    path: Path
    embeddings: np.ndarray
    files: list[str]
    meta: dict


def load_index(index_dir: str | os.PathLike) -> LoadedIndex:
    return LoadedIndex(Path(index_dir), *read_index(index_dir))


def search(
    scorer: ClipScorer, index: str | os.PathLike | LoadedIndex, query: str, k: int = 5
) -> list[tuple[str, float]]:
    """The k images of an index (a folder, or one `load_index` read: the web app's, read once, not per query)
    closest to a text query: [(path, cosine similarity)], best first."""
    if k < 1:
        raise UserError(f"k is {k}; ask for at least 1 result")
    if not isinstance(query, str):
        raise UserError(f"the search query is a {type(query).__name__}; give one query as a str")
    if not query.strip():
        raise UserError("the search query is empty; describe what to find, e.g. 'a red circle'")
    index_dir, emb, files, meta = index if isinstance(index, LoadedIndex) else load_index(index)
    mine = scorer.fingerprint()
    if meta["fingerprint"] != mine:
        raise UserError(
            f"index '{index_dir}' was built by another CLIP model ('{meta.get('model')}', fingerprint "
            f"{meta['fingerprint']}, not {mine}); pass that --model or rebuild the index with this one"
        )
    sims = torch.from_numpy(emb) @ scorer.embed_texts([query])[0]  # (n,)
    top = sims.topk(min(k, len(files)))
    root = Path(meta.get("root", "."))
    return [(str(root / files[i]), float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]
