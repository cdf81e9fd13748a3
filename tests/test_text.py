"""The text tokenizer: training on real caption sets, framing, truncation, Unicode, errors, the command."""

from __future__ import annotations

import json

import pytest
import torch

from dalle_mini_impl.config import DataConfig, TextConfig
from dalle_mini_impl.data.streams import iter_captions
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.text.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextTokenizer
from train.tokenizer import main as tokenizer_main

TEXT_LEN = 16


@pytest.fixture(scope="module")
def shapes_captions() -> list[str]:
    return list(iter_captions(DataConfig(source="shapes"), "train", 1500))


@pytest.fixture(scope="module")
def shapes_tok(shapes_captions, tmp_path_factory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "text.model"
    return TextTokenizer.train(shapes_captions, TextConfig(vocab_size=512, text_len=TEXT_LEN), path)


def test_trains_on_shapes_captions_and_round_trips(shapes_tok, shapes_captions):
    assert 260 < shapes_tok.vocab_size <= 512  # 256 byte pieces + specials + what ~30 words need
    assert (shapes_tok.pad_id, shapes_tok.unk_id, shapes_tok.bos_id, shapes_tok.eos_id) == (0, 1, 2, 3)
    pieces = shapes_tok.sp.encode("a small red circle to the left of a large blue square", out_type=str)
    assert pieces == [
        "▁a",
        "▁small",
        "▁red",
        "▁circle",
        "▁to",
        "▁the",
        "▁left",
        "▁of",
        "▁a",
        "▁large",
        "▁blue",
        "▁square",
    ]
    ids, dropped = shapes_tok.encode_with_info(shapes_captions[:200])
    assert ids.shape == (200, TEXT_LEN) and ids.dtype == torch.long
    assert torch.all(ids[:, 0] == BOS_ID)
    assert shapes_tok.decode(ids) == shapes_captions[:200]
    assert dropped == [0] * 200  # every shapes caption fits in 16 ids


def test_trains_on_imagefolder_captions_with_any_unicode(imagefolder, tmp_path):
    captions = list(iter_captions(DataConfig(source=str(imagefolder.root)), "train", 100))
    tok = TextTokenizer.train(captions, TextConfig(vocab_size=1000, text_len=24), tmp_path / "text.model")
    assert tok.lowercase
    assert tok.decode(tok.encode(["A Red Rectangle", "colorful noise, très bruyant"])) == [
        "a red rectangle",
        "colorful noise, très bruyant",
    ]
    ids = tok.encode(["🐱 cat"])
    assert UNK_ID not in ids.tolist()[0]  # the emoji is four byte pieces, not <unk>
    assert tok.decode(ids) == ["🐱 cat"]
    assert tok.decode(tok.encode(["日本語"])) == ["日本語"]  # a script it never saw: nine byte pieces


def test_case_is_kept_when_lowercase_is_off_and_the_model_says_so(tmp_path, shapes_captions):
    path = tmp_path / "cased.model"
    TextTokenizer.train(shapes_captions, TextConfig(vocab_size=400, lowercase=False), path)
    tok = TextTokenizer.load(path, text_len=TEXT_LEN)
    assert not tok.lowercase
    assert tok.decode(tok.encode(["A Red Circle"])) == ["A Red Circle"]
    with pytest.raises(UserError) as e:
        TextTokenizer.load(path, text_len=TEXT_LEN, lowercase=True)
    assert str(e.value) == (
        f"text model '{path}' was trained with lowercase=false but the config says text.lowercase=true; "
        "make them agree or retrain the tokenizer"
    )


def test_a_long_prompt_is_truncated_counted_and_keeps_bos_and_eos(shapes_tok):
    prompt = "a red circle " * 770  # 10,010 characters
    ids, dropped = shapes_tok.encode_with_info([prompt, "a red circle"])
    assert ids.shape == (2, TEXT_LEN)
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID and PAD_ID not in ids[0].tolist()
    assert dropped == [len(shapes_tok.sp.encode(prompt)) - (TEXT_LEN - 2), 0]
    assert shapes_tok.decode(ids[:1]) == [" ".join(["a red circle"] * 4) + " a red"]  # the first 14 pieces


def test_null_ids_is_the_empty_caption(shapes_tok):
    null = shapes_tok.null_ids()
    assert null.shape == (TEXT_LEN,)
    assert null.tolist() == [BOS_ID, EOS_ID] + [PAD_ID] * (TEXT_LEN - 2)
    assert torch.equal(null, shapes_tok.encode([""])[0])
    assert shapes_tok.decode(null) == [""]
    assert shapes_tok.encode_with_info([""])[1] == [0]


def test_decode_stops_at_eos_and_ignores_pads_and_out_of_range_ids(shapes_tok):
    ids = shapes_tok.encode(["a blue square"])[0].tolist()
    end = ids.index(EOS_ID)
    noisy = ids[:end] + [PAD_ID, 10_000] + [EOS_ID] + shapes_tok.encode(["a red circle"])[0].tolist()[1:]
    assert shapes_tok.decode([noisy]) == ["a blue square"]


def test_save_load_and_bad_model_files(shapes_tok, tmp_path):
    shapes_tok.save(tmp_path / "copy.model")
    again = TextTokenizer.load(tmp_path / "copy.model", text_len=TEXT_LEN, lowercase=True)
    assert torch.equal(again.encode(["a small green triangle"]), shapes_tok.encode(["a small green triangle"]))
    with pytest.raises(UserError) as e:
        TextTokenizer.load(tmp_path / "missing.model", text_len=TEXT_LEN)
    assert str(e.value) == (
        f"text model '{tmp_path / 'missing.model'}' does not exist; train one with python -m train.tokenizer"
    )
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="is not a valid sentencepiece model; retrain it"):
        TextTokenizer.load(tmp_path / "junk.model", text_len=TEXT_LEN)
    with pytest.raises(UserError, match="text.text_len is 1; it must be at least 2"):
        TextTokenizer.load(tmp_path / "copy.model", text_len=1)


def test_a_vocab_smaller_than_byte_fallback_needs_is_raised(tmp_path, shapes_captions):
    tok = TextTokenizer.train(shapes_captions, TextConfig(vocab_size=64), tmp_path / "small.model")
    assert tok.vocab_size > 256 + 4 + 20  # bytes, specials, the alphabet, then up to 64 learned pieces
    assert tok.decode(tok.encode(["a red circle 🐱"])) == ["a red circle 🐱"]
    with pytest.raises(UserError, match="no captions to train"):
        TextTokenizer.train(["", "   "], TextConfig(), tmp_path / "none.model")


def test_tokenizer_command_writes_model_and_config(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", "shapes", "--set", "text.max_train_captions=400", "--set", "text.vocab_size=512"]
    assert tokenizer_main([*argv, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["captions"] == 400 and summary["path"] == str(out / "text.model")
    config = json.loads((out / "config.json").read_text())
    assert config["out_dir"] == str(out) and config["text"]["vocab_size"] == 512
    tok = TextTokenizer.load(out / "text.model", config["text"]["text_len"], config["text"]["lowercase"])
    assert tok.vocab_size == summary["vocab_size"]
    assert tok.decode(tok.encode(["a large yellow circle at the top"])) == ["a large yellow circle at the top"]


def test_the_tokenizer_command_counts_the_captions_it_leaves_out(tmp_path, capsys):
    """Empty, missing and non-text captions were left out of the tokenizer's training without a word; a list's
    items are captions of their own."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"file_name": "a.png", "text": t} for t in ["a red kite", "", None, "a blue kite", "caf\ufffd"]]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "a.png")
    argv = ["--config", "shapes", "--data", str(folder), "--out", str(tmp_path / "run"), "--set", "text.vocab_size=300"]
    assert tokenizer_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["captions"] == 2
    assert summary["captions_skipped"] == {"bad_caption": 1, "empty_caption": 1, "missing_caption": 1}


def test_a_vocabulary_sentencepiece_cannot_count_is_one_sentence(shapes_captions, tmp_path):
    # once sentencepiece's "cannot parse as int" traceback
    with pytest.raises(UserError, match="text.vocab_size is 3000000000; use a positive size up to 1,000,000"):
        TextTokenizer.train(shapes_captions, TextConfig(vocab_size=3_000_000_000), tmp_path / "t.model")
