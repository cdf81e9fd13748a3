"""`eval runs A B`: tiny VQ and CLIP runs compared, the same (again from nothing, or stopped and resumed) or not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dalle_mini_impl.errors import UserError
from dalle_mini_impl.eval import runs as eval_runs
from tests.test_train import args_for, copy_run, encoded_run, tokenizer_run
from train import clip as train_clip
from train import tokenizer as train_tokenizer
from train import vae as train_vae

pytestmark = pytest.mark.usefixtures("one_thread")

VQ = ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]", "train.vae.checkpoint_every=2"]


def vq_run(run, steps: int, *extra: str):
    train_vae.main(args_for(run, *VQ, f"train.vae.steps={steps}", *extra))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four runs of a 4-step VQ: `a` from nothing; `resumed` stopped after 2 steps and run again to 4; `seed1`
    from nothing with another seed; `redone` first as `a`, then its checkpoints deleted and trained again from
    nothing with seed 1 into the same folder (its logs hold both runs' numbers)."""
    root = tmp_path_factory.mktemp("runs")
    base = root / "base"
    train_tokenizer.main(args_for(base))
    out = {"a": vq_run(tokenizer_run(base, root / "a"), 4)}
    out["resumed"] = vq_run(vq_run(tokenizer_run(base, root / "resumed"), 2), 4)
    out["seed1"] = vq_run(tokenizer_run(base, root / "seed1"), 4, "seed=1")
    redone = vq_run(tokenizer_run(base, root / "redone"), 4)
    shutil.rmtree(redone / "checkpoints")
    out["redone"] = vq_run(redone, 4, "seed=1")
    return out


def compare(a, b, capsys) -> dict:
    capsys.readouterr()
    assert eval_runs.main([str(a), str(b)]) == 0

    def invalid(constant: str):  # NaN and Infinity are not JSON
        raise AssertionError(f"{constant} in the output")

    return json.loads(capsys.readouterr().out, parse_constant=invalid)


def test_a_run_stopped_and_resumed_is_the_same_run_as_one_from_nothing(runs, capsys):
    result = compare(runs["a"], runs["resumed"], capsys)
    assert result["same"] is True and result["first_difference"] is None and result["text_model"] is True
    files = result["files"]
    for name in ("vae.safetensors", "checkpoints/vae/step_00000002/model.safetensors"):
        assert files[name]["tensors"] > 0 and files[name]["equal"] == files[name]["tensors"], name
        assert files[name]["max_abs_diff"] == 0.0
    loss = result["logs"]["vae"]["vae/loss"]
    assert loss == {"steps": 4, "equal": 4, "first_differ": None, "max_rel_diff": 0.0}
    # throughput is the machine's, not the run's: never compared
    assert not [tag for tag in result["logs"]["vae"] if tag.endswith("_per_s")]


def test_another_seed_parts_at_the_first_step(runs, capsys):
    result = compare(runs["a"], runs["seed1"], capsys)
    assert result["same"] is False
    assert result["first_difference"]["stage"] == "vae" and result["first_difference"]["step"] == 1
    weights = result["files"]["vae.safetensors"]
    assert weights["equal"] < weights["tensors"] and weights["max_abs_diff"] > 0
    loss = result["logs"]["vae"]["vae/loss"]
    assert loss["first_differ"] == 1 and loss["equal"] < loss["steps"] == 4 and loss["max_rel_diff"] > 0


def test_a_step_logged_twice_counts_as_last_written(runs, capsys):
    # `redone` logged seed 0's steps 1-4, then seed 1's: it is seed1's run, and not a's
    assert compare(runs["seed1"], runs["redone"], capsys)["same"] is True
    assert compare(runs["a"], runs["redone"], capsys)["same"] is False


def test_a_checkpoint_one_run_lacks_is_listed_not_compared(runs, capsys, tmp_path):
    fewer = shutil.copytree(runs["a"], tmp_path / "fewer")
    shutil.rmtree(fewer / "checkpoints" / "vae" / "step_00000002")
    result = compare(runs["a"], fewer, capsys)
    assert result["only_a"] == ["checkpoints/vae/step_00000002/model.safetensors"] and result["only_b"] == []
    assert result["same"] is True


def test_what_is_not_a_run_folder_is_one_sentence(runs, tmp_path):
    with pytest.raises(UserError, match="does not exist; pass the --out folder of a training run"):
        eval_runs.main([str(runs["a"]), str(tmp_path / "missing")])
    with pytest.raises(UserError, match="is a file, not a folder; pass the --out folder"):
        eval_runs.main([str(runs["a"] / "vae.safetensors"), str(runs["a"])])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no weights and no logs"):
        eval_runs.main([str(tmp_path / "empty"), str(runs["a"])])


def test_a_clip_stopped_and_resumed_is_the_clip_trained_in_one_go(tmp_path, capsys):
    base = encoded_run(tmp_path / "base")
    straight, resumed = copy_run(base, tmp_path / "straight"), copy_run(base, tmp_path / "resumed")
    clip = ["train.clip.checkpoint_every=2"]
    train_clip.main(args_for(straight, *clip, "train.clip.steps=4"))
    train_clip.main(args_for(resumed, *clip, "train.clip.steps=2"))
    train_clip.main(args_for(resumed, *clip, "train.clip.steps=4"))
    result = compare(straight, resumed, capsys)
    assert result["same"] is True and result["files"]["clip.safetensors"]["max_abs_diff"] == 0.0
    assert result["logs"]["clip"]["clip/loss"]["equal"] == 4


def test_a_nan_both_logged_is_the_same_step_and_a_reshaped_tensor_differs(tmp_path, capsys):
    from safetensors.torch import save_file
    from torch.utils.tensorboard import SummaryWriter

    for name, size in (("a", 2), ("b", 3)):
        run = tmp_path / name
        run.mkdir()
        save_file({"kept": torch.ones(3), "reshaped": torch.zeros(size)}, str(run / "w.safetensors"))
        with SummaryWriter(str(run / "logs" / "stage")) as writer:
            writer.add_scalar("stage/loss", float("nan"), 1)
            writer.add_scalar("stage/loss", 0.5, 2)
    result = compare(tmp_path / "a", tmp_path / "b", capsys)
    weights = result["files"]["w.safetensors"]
    assert weights["shapes_differ"] == ["reshaped"] and weights["equal"] == 1 and weights["tensors"] == 2
    assert result["logs"]["stage"]["stage/loss"] == {"steps": 2, "equal": 2, "first_differ": None, "max_rel_diff": 0.0}
    assert result["same"] is False and result["first_difference"] is None


def test_weights_with_nan_are_compared_bit_for_bit_and_print_as_valid_json(tmp_path, capsys):
    """Once: a folder with a NaN weight differed from itself, and printed max_abs_diff as NaN, which JSON lacks."""
    from safetensors.torch import save_file

    nan = float("nan")
    for name, values in (("a", [1.0, nan, nan]), ("b", [1.0, nan, nan]), ("c", [1.0, nan, 2.0])):
        (tmp_path / name).mkdir()
        save_file({"w": torch.tensor(values)}, str(tmp_path / name / "w.safetensors"))
    same = compare(tmp_path / "a", tmp_path / "b", capsys)
    assert same["same"] and same["files"]["w.safetensors"] | {"names_differ": [], "shapes_differ": []} == {
        "tensors": 1, "equal": 1, "max_abs_diff": 0.0, "names_differ": [], "shapes_differ": [],
    }  # fmt: skip
    other = compare(tmp_path / "a", tmp_path / "c", capsys)  # NaN on one side only: no number for the difference
    assert not other["same"] and other["files"]["w.safetensors"]["max_abs_diff"] is None
