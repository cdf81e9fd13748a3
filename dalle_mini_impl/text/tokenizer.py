"""The text tokenizer: a sentencepiece model over captions, framing every caption as fixed-length ids.

    [bos, piece ids ..., eos, pad, pad, ...]   (text_len ids; pad 0, unk 1, bos 2, eos 3)

BPE by default (`text.model_type`; DALL-E used BPE, dalle-mini BART's BPE), with byte fallback so any
Unicode (an emoji, a script the captions never showed) encodes to byte pieces instead of <unk>.
Lower-casing (`text.lowercase`) is sentencepiece's case-folding normalizer (`nmt_nfkc_cf`), chosen at
training time and stored inside the model, so text.model alone decides how any caller's text is
normalised: there is no side file to lose, and training and encoding cannot disagree.

Usage:
    tok = TextTokenizer.train(captions, cfg.text, "runs/shapes/text.model")   # or train.tokenizer
    tok = TextTokenizer.load("runs/shapes/text.model", text_len=16)
    ids = tok.encode(["a red circle"])                  # LongTensor (1, 16)
    tok.decode(ids)                                     # ["a red circle"]
    tok.null_ids()                                      # the empty caption, for classifier-free guidance
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from ..config import TextConfig
from ..errors import UserError
from ..files import write_atomic

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
MAX_VOCAB = 1_000_000  # the largest text vocabulary: far past any caption set's pieces, and a 32-bit count
# below full coverage, characters seen once or twice in a big caption set become byte pieces instead of
# taking vocabulary slots; sentencepiece's recommended default for character-rich languages
CHARACTER_COVERAGE = 0.9995
_REQUIRED_CHARS = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


def _trainer_options(cfg: TextConfig, vocab_size: int) -> dict:
    return {
        "model_type": cfg.model_type,
        "vocab_size": vocab_size,
        # a soft limit: a small caption set (shapes: ~30 words) yields fewer pieces instead of failing
        "hard_vocab_limit": False,
        "byte_fallback": True,
        "character_coverage": CHARACTER_COVERAGE,
        "normalization_rule_name": "nmt_nfkc_cf" if cfg.lowercase else "nmt_nfkc",
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "max_sentence_length": 16384,  # bytes; captions are cut at data.max_caption_chars before this
        "shuffle_input_sentence": True,
        "num_threads": max(1, min(8, os.cpu_count() or 1)),
        "minloglevel": 2,
    }


def _train_bytes(captions: list[str], cfg: TextConfig, vocab_size: int) -> bytes:
    out = _Writer()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=out, **_trainer_options(cfg, vocab_size)
    )
    return out.data


class _Writer:
    """sentencepiece's `model_writer`: anything with write(bytes)."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class TextTokenizer:
    """Captions <-> LongTensor (b, text_len) of sentencepiece ids framed by bos/eos and padded; `encode_with_info`
    also says how many pieces each text lost to truncation. Encoding changes nothing in it (once it kept the last
    call's counts, which a tokenizer the web app's requests share would have mixed up)."""

    def __init__(self, processor: spm.SentencePieceProcessor, text_len: int, name: str = "<memory>"):
        if text_len < 2:
            raise UserError(f"text.text_len is {text_len}; it must be at least 2 (room for bos and eos)")
        self.sp = processor
        self.text_len = text_len
        self.name = name

    # -- creating ------------------------------------------------------------------------------

    @classmethod
    def train(cls, captions: Iterable[str], cfg: TextConfig, path: str | os.PathLike) -> TextTokenizer:
        """Train on `captions` in memory, write the model to `path` (atomically) and return it loaded."""
        if cfg.model_type not in MODEL_TYPES:
            raise UserError(f"text.model_type '{cfg.model_type}' is unknown; use one of: {', '.join(MODEL_TYPES)}")
        if not 1 <= cfg.vocab_size <= MAX_VOCAB:  # sentencepiece reads it as a 32-bit int: a traceback above
            raise UserError(f"text.vocab_size is {cfg.vocab_size}; use a positive size up to {MAX_VOCAB:,}")
        texts = [c for c in captions if isinstance(c, str) and c.strip()]
        if not texts:
            raise UserError(
                "there are no captions to train the text tokenizer on; check data.source and data.caption_column"
            )
        try:
            data = _train_bytes(texts, cfg, cfg.vocab_size)
        except RuntimeError as e:
            match = _REQUIRED_CHARS.search(str(e))
            if match is None:
                raise
            # byte fallback needs 256 byte pieces + 4 specials + the alphabet before anything is learned;
            # a smaller text.vocab_size is read as the number of pieces to learn on top of those
            vocab_size = int(match.group(2)) + cfg.vocab_size
            log.warning(
                "text.vocab_size %d is below the %s pieces byte fallback needs; training with %d",
                cfg.vocab_size,
                match.group(2),
                vocab_size,
            )
            data = _train_bytes(texts, cfg, vocab_size)
        path = Path(path)
        write_atomic(path, lambda tmp: tmp.write_bytes(data))
        return cls(spm.SentencePieceProcessor(model_proto=data), cfg.text_len, name=str(path))

    @classmethod
    def load(cls, path: str | os.PathLike, text_len: int, lowercase: bool | None = None) -> TextTokenizer:
        """Load a model written by `train`; `lowercase`, when given, must match how it was trained."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"text model '{path}' does not exist; train one with python -m train.tokenizer")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception:
            raise UserError(
                f"text model '{path}' is not a valid sentencepiece model; retrain it with python -m train.tokenizer"
            ) from None
        if (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise UserError(
                f"text model '{path}' has other special ids than pad 0, unk 1, bos 2, eos 3; "
                "retrain it with python -m train.tokenizer"
            )
        tok = cls(sp, text_len, name=str(path))
        if lowercase is not None and lowercase != tok.lowercase:
            raise UserError(
                f"text model '{path}' was trained with lowercase={str(tok.lowercase).lower()} but the config "
                f"says text.lowercase={str(lowercase).lower()}; make them agree or retrain the tokenizer"
            )
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to `path` atomically (e.g. into a bundle)."""
        proto = self.sp.serialized_model_proto()
        write_atomic(path, lambda tmp: tmp.write_bytes(proto))

    # -- properties ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def lowercase(self) -> bool:
        """Whether the model folds case (its normalizer was `nmt_nfkc_cf`)."""
        return self.sp.normalize("A") == self.sp.normalize("a")

    # -- encoding ------------------------------------------------------------------------------

    def _frame(self, pieces: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Piece ids -> (b, text_len) with bos, eos and pads; also the pieces each row lost to truncation."""
        room = self.text_len - 2
        out = torch.full((len(pieces), self.text_len), PAD_ID, dtype=torch.long)  # (b, t)
        dropped = []
        for row, ids in enumerate(pieces):
            kept = ids[:room]
            dropped.append(len(ids) - len(kept))
            out[row, : len(kept) + 2] = torch.tensor([BOS_ID, *kept, EOS_ID], dtype=torch.long)
        return out, dropped

    def encode_with_info(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """(ids (b, text_len), pieces dropped per text); a too-long text keeps its start, bos and eos."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode expects a list of strings")
        return self._frame(self.sp.encode(list(texts)) if texts else [])

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """A list of b texts -> LongTensor (b, text_len): [bos, pieces..., eos, pad...]."""
        return self.encode_with_info(texts)[0]

    def null_ids(self) -> torch.Tensor:
        """The empty caption, LongTensor (text_len,): [bos, eos, pad...] (the unconditional row of CFG)."""
        return self._frame([[]])[0][0]

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """ids (b, t) or (t,) -> b texts: bos and pads dropped, each row read up to its first eos."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if rows and not isinstance(rows[0], Iterable):  # one row (t,): a flat list of ids too
            rows = [rows]
        rows = [[int(i) for i in r] for r in rows]
        texts = []
        for row in rows:
            pieces = []
            for i in row:
                if i == EOS_ID:
                    break
                if i not in (PAD_ID, BOS_ID) and 0 <= i < self.vocab_size:
                    pieces.append(int(i))
            texts.append(self.sp.decode(pieces))
        return texts

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, text_len={self.text_len})"


__all__ = ["BOS_ID", "EOS_ID", "MAX_VOCAB", "PAD_ID", "UNK_ID", "TextTokenizer"]
