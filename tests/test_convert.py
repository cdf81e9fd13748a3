"""The importers of the field's pretrained tokenizers (`python -m vae.convert`) against the originals.

Each fixture under tests/fixtures/convert/ was written by the original implementation (the scripts
beside it say how): a checkpoint in the original format with small random weights, a batch of images,
and the original's codes and reconstructions. Here each checkpoint is converted with our converter,
loaded back through safetensors alone, and must give the same codes and reconstructions within 1e-5.
The restricted unpickler is checked to run no code a pickle names.
"""

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vae
from vae import convert
from vae.unpickle import Inert, RestrictedUnpickler, load_untrusted

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "convert"
# name -> (source, the original files in the order the command takes them, the original's outputs)
CASES = {
    "openai": ("openai", ["openai/encoder.pkl", "openai/decoder.pkl"], "openai/expected.safetensors"),
    "taming_vq_f16": (
        "taming",
        ["taming/vq_f16/last.ckpt", "taming/vq_f16/model.yaml"],
        "taming/vq_f16/expected.safetensors",
    ),
    "taming_gumbel_f8": (
        "taming",
        ["taming/gumbel_f8/last.ckpt", "taming/gumbel_f8/model.yaml"],
        "taming/gumbel_f8/expected.safetensors",
    ),
    "llamagen_ds8": ("llamagen", ["llamagen/vq_ds8.pt"], "llamagen/expected.safetensors"),
}
LOGIT_CASES = {"openai", "taming_gumbel_f8"}  # tokenizers whose codes are the argmax of logits
TOLERANCE = 1e-5


def _convert(case: str, out: Path) -> vae.ImageTokenizer:
    source, inputs, _ = CASES[case]
    assert convert.main([source, *(str(FIXTURES / p) for p in inputs), str(out), "--trust-pickle"]) == 0
    return vae.load_pretrained(out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_tokenizer_matches_the_original(case, tmp_path):
    model = _convert(case, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["vae.json", "vae.safetensors"]
    expected = load_file(str(FIXTURES / CASES[case][2]))
    images = expected["images"]
    assert images.min() >= 0 and images.max() <= 1  # the interface's range; the original maps it inside

    ids = model.encode(images)
    assert ids.shape == expected["codes"].shape == (images.shape[0], *model.grid(images.shape[-1]))
    assert torch.equal(ids, expected["codes"]), f"{(ids != expected['codes']).sum()} codes differ"
    for codes, want in (
        (ids, expected["reconstructions"]),
        (expected["random_codes"], expected["random_reconstructions"]),
    ):
        got = model.decode(codes)
        assert got.shape == want.shape and 0 <= got.min() and got.max() <= 1
        assert (got - want).abs().max() <= TOLERANCE
    assert model.decode(ids.flatten(1)).shape == images.shape  # (b, n) ids as a transformer emits them
    if case in LOGIT_CASES:  # what guidance through the prior reads: one-hot of the codes, differentiable
        free = model.free_latent(images).detach().requires_grad_(True)
        weights = model.code_weights(free)
        assert torch.equal(weights.argmax(dim=1), ids)
        (grad,) = torch.autograd.grad((weights * torch.randn_like(weights)).sum(), free)
        assert grad.abs().sum() > 0
    else:
        with pytest.raises(vae.VAEError, match="gives no code weights"):
            model.code_weights(model.free_latent(images))


def test_fixtures_have_the_structure_of_the_released_files():
    # OpenAI's files are whole pickled modules of the dall_e package
    encoder = load_untrusted(FIXTURES / "openai/encoder.pkl")
    assert isinstance(encoder, Inert) and encoder.name == "dall_e.encoder.Encoder"
    # taming's are Lightning checkpoints: Lightning classes inside, the training-only loss.* tensors beside the model
    checkpoint = load_untrusted(FIXTURES / "taming/gumbel_f8/last.ckpt")
    assert {"state_dict", "callbacks", "optimizer_states", "pytorch-lightning_version"} <= set(checkpoint)
    assert [c.name for c in checkpoint["callbacks"]] == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert any(k.startswith("loss.") for k in checkpoint["state_dict"])
    # LlamaGen's hold {"model": state_dict} with the codebook-usage buffer of training
    assert "quantize.codebook_used" in load_untrusted(FIXTURES / "llamagen/vq_ds8.pt")["model"]


def test_taming_config_as_json_gives_the_same_tokenizer(tmp_path):
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((FIXTURES / "taming/vq_f16/model.yaml").read_text())
    (tmp_path / "model.json").write_text(json.dumps(config))
    checkpoint = str(FIXTURES / "taming/vq_f16/last.ckpt")
    convert.main(["taming", checkpoint, str(tmp_path / "model.json"), str(tmp_path / "tok"), "--trust-pickle"])
    from_json, from_yaml = vae.load_pretrained(tmp_path / "tok"), _convert("taming_vq_f16", tmp_path / "tok2")
    assert vae.read_pretrained_config(tmp_path / "tok") == vae.read_pretrained_config(tmp_path / "tok2")
    images = load_file(str(FIXTURES / "taming/vq_f16/expected.safetensors"))["images"]
    assert torch.equal(from_json.encode(images), from_yaml.encode(images))


def test_taming_config_of_another_model_is_one_sentence(tmp_path, capsys):
    (tmp_path / "transformer.json").write_text(
        json.dumps({"model": {"target": "taming.models.cond_transformer.Net2NetTransformer"}})
    )
    with pytest.raises(SystemExit) as exit_info:
        convert.run(["taming", str(FIXTURES / "taming/vq_f16/last.ckpt"), str(tmp_path / "transformer.json"),
                     str(tmp_path / "tok"), "--trust-pickle"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "describes 'taming.models.cond_transformer.Net2NetTransformer'" in err and len(err.splitlines()) == 1


def test_imported_tokenizer_is_frozen(tmp_path):
    model = _convert("openai", tmp_path / "tok")
    with pytest.raises(vae.VAEError, match="imported and frozen"):
        model(torch.rand(1, 3, 32, 32))


def test_convert_refuses_without_trust_pickle(tmp_path, capsys):
    _, inputs, _ = CASES["openai"]
    with pytest.raises(SystemExit) as exit_info:
        convert.run(["openai", *(str(FIXTURES / p) for p in inputs), str(tmp_path / "tok")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--trust-pickle" in err and "pickle" in err
    assert len(err.splitlines()) == 1 and err.count(". ") == 0  # one sentence, no traceback
    assert not (tmp_path / "tok").exists()


def test_convert_names_a_swapped_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert.run(
            ["openai", str(FIXTURES / "openai/decoder.pkl"), str(FIXTURES / "openai/encoder.pkl"), str(tmp_path),
             "--trust-pickle"]
        )  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "decoder.pkl' holds dall_e.decoder.Decoder, not dall_e.encoder.Encoder" in err


def test_convert_names_a_checkpoint_given_as_the_config_and_a_config_taming_cannot_build(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    checkpoint = str(FIXTURES / "taming/vq_f16/last.ckpt")
    config = yaml.safe_load((FIXTURES / "taming/vq_f16/model.yaml").read_text())
    config["model"]["params"]["ddconfig"]["ch"] = 8  # GroupNorm's 32 groups do not divide 8 channels
    (tmp_path / "ch8.json").write_text(json.dumps(config))
    for argv, says in [
        ([str(FIXTURES / "taming/vq_f16/model.yaml"), checkpoint], "takes CHECKPOINT then CONFIG, in that order"),
        ([checkpoint, str(tmp_path / "ch8.json")], "describes no VQGAN taming's layers can build (num_channels (8)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            convert.run(["taming", *argv, str(tmp_path / "tok"), "--trust-pickle"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1


class _Payload:
    """Pickles as a call that would write `path` (os.system running `touch`) if the loader ran it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _ExecPayload:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').write('ran')",)


def test_restricted_unpickler_runs_no_pickled_call(tmp_path):
    touched, written = tmp_path / "touched", tmp_path / "written"
    path = tmp_path / "evil.ckpt"
    # a torch checkpoint with tensors beside two payloads: the tensors load, the payloads stay records
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "a": _Payload(touched), "b": _ExecPayload(written)}, path)
    loaded = load_untrusted(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    assert isinstance(loaded["a"], Inert) and loaded["a"].name.endswith(".system")
    assert loaded["a"].args == (f"touch {touched}",)
    assert isinstance(loaded["b"], Inert) and loaded["b"].name.endswith(".exec")
    # torch's legacy (pre-zip) format, whose header is read by the pickle module's load
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2), "a": _Payload(touched)}, legacy, _use_new_zipfile_serialization=False)
    loaded = load_untrusted(legacy)
    assert torch.equal(loaded["w"], torch.ones(2)) and isinstance(loaded["a"], Inert)
    # and a plain pickle
    raw = RestrictedUnpickler(io.BytesIO(pickle.dumps([_Payload(touched), _ExecPayload(written)]))).load()
    assert all(isinstance(x, Inert) for x in raw)
    assert not touched.exists() and not written.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # a real archive, written the deprecated way
def test_a_torchscript_archive_is_refused(tmp_path):
    # torch.load would hand it to torch.jit.load, which restores TorchScript code: not for untrusted files
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(vae.VAEError, match="is a TorchScript archive, not a checkpoint"):
        load_untrusted(tmp_path / "scripted.pt")


def test_convert_refuses_a_payload_in_place_of_a_checkpoint(tmp_path, capsys):
    touched = tmp_path / "touched"
    torch.save(_Payload(touched), tmp_path / "encoder.pkl")
    with pytest.raises(SystemExit):
        convert.run(
            ["openai", str(tmp_path / "encoder.pkl"), str(FIXTURES / "openai/decoder.pkl"), str(tmp_path / "out"),
             "--trust-pickle"]
        )  # fmt: skip
    assert "not dall_e.encoder.Encoder" in capsys.readouterr().err
    assert not touched.exists() and not (tmp_path / "out").exists()
