"""Pretrained OpenAI / open_clip weights behind the same `ClipScorer` interface as the CLIP trained here.

For users who have such weights (a local file or an open_clip tag): reranking, zero-shot labels and
search then run on a CLIP trained on web-scale data instead of ours. Needs the optional dependency
`open_clip_torch` (`pip install -e .[openclip]`), imported only when a scorer is built.

    scorer = OpenCLIPScorer("ViT-B-32", pretrained="/models/vit_b_32.bin")     # or "openai"
    scorer.score(images, "a red circle")      # images (m, 3, H, W) in [0, 1], any size

Preprocessing is done in torch as open_clip's transform does it: resize the shortest side to the
model's input size, center crop, normalise with the model's mean and std.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import UserError
from .model import PIXEL_MEAN, PIXEL_STD
from .uses import ClipScorer, state_fingerprint


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise UserError(
            "pretrained CLIP weights need the package open_clip_torch; pip install open_clip_torch "
            "(or pip install -e .[openclip])"
        ) from None
    return open_clip


class PretrainedClipScorer(ClipScorer):
    """A `ClipScorer` over any model with `encode_image(normalised pixels)` and `encode_text(tokens)`.

    `tokenizer(list of str) -> LongTensor (n, t)`; `mean` and `std` are the model's pixel statistics.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        image_size: int,
        mean: Sequence[float] = PIXEL_MEAN,
        std: Sequence[float] = PIXEL_STD,
        source: str = "",
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.source = source
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._fingerprint: str | None = None

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image((images - self.mean) / self.std)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        # open_clip stores the log; CLIP's own paper clamps it at 100
        return min(100.0, float(torch.as_tensor(scale).detach().exp())) if scale is not None else 100.0

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            extra = {"source": self.source, "image_size": self.image_size}
            self._fingerprint = state_fingerprint(self.model.state_dict(), extra)
        return self._fingerprint


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class OpenCLIPScorer(PretrainedClipScorer):
    """An open_clip model (`model_name`, `pretrained` = a weights file or an open_clip tag) as a scorer."""

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
        open_clip = _import_open_clip()
        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(
                f"open_clip could not build '{model_name}' with pretrained={pretrained!r} "
                f"({str(e).splitlines()[0][:100]}); check the name (open_clip.list_models()) and the weights"
            ) from None
        visual = getattr(model, "visual", None)
        super().__init__(
            model,
            open_clip.get_tokenizer(model_name),
            image_size=_image_size(model),
            mean=getattr(visual, "image_mean", None) or PIXEL_MEAN,
            std=getattr(visual, "image_std", None) or PIXEL_STD,
            source=f"open_clip:{model_name}:{pretrained or 'random'}",
            device=device,
        )
