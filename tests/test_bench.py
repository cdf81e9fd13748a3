"""The benchmark module: one tiny configuration per phase runs in seconds and prints valid JSON; the MFU helper.

Run with `pytest tests/test_bench.py`. Speed is not checked here (the machine is shared); only that every
phase runs, prints one JSON object on its last stdout line, and carries the keys the comparison reads.
"""

import json
import math
import re
import sys

import pytest
import torch

from dalle_mini_impl.bench import speed as bench
from dalle_mini_impl.errors import UserError, run_cli
from tests.bundle_factory import make_tiny_bundle

# a 1-layer, 32-wide model on a 2 x 2 grid: every phase in well under a second of compute
TINY = ["--preset", "anchor-tiny", "--set", "dim=32", "--set", "depth=1", "--set", "heads=2", "--set", "head_dim=16"]
GRID = ["--set", "grid_h=2", "--set", "grid_w=2"]


@pytest.fixture(autouse=True)
def keep_threads():
    # bench.main sets torch's thread count (2 by default, as the anchor): give the other tests theirs back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_json(argv, capsys):
    assert bench.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return json.loads(lines[-1])


def test_mfu_hand_checked():
    # 6 * 1e6 FLOPs per token at 1,000 tokens/s is 6e9 FLOP/s; against a 1.2e10 FLOP/s peak that is half
    assert bench.mfu(6e6, 1000.0, 1.2e10) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bench.mfu(1.0, 1.0, 0.0)


def test_mfu_matches_the_model_formula():
    # anchor-tiny at 1 step/s of batch 16: flops_per_token = 6 N + 12 L T d, with T the 79 positions read
    from dalle_mini_impl.model.transformer import DALLE, preset_config

    model = DALLE(preset_config("anchor-tiny"))
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * 4 * 79 * 256
    assert bench.mfu(model.flops_per_token(), 16 * 79, 1e11) == pytest.approx(model.flops_per_token() * 1264 / 1e11)


def test_train_phase_prints_json_with_mfu(capsys):
    out = run_json(["--only", "train", *TINY, "--steps", "2", "--warmup", "0", "--matmul-n", "128"], capsys)
    assert {"torch", "threads", "cpu", "date_utc"} <= set(out["meta"])
    train = out["presets"]["anchor-tiny"]["train"]
    assert train["peak"]["fp32_flops"] > 0
    fp32 = train["fp32"]
    assert fp32["tokens_per_s"] > 0 and fp32["steps"] == 2
    assert fp32["mfu"] == pytest.approx(
        out["presets"]["anchor-tiny"]["config"]["flops_per_token"]
        * fp32["positions_per_s"]
        / train["peak"]["fp32_flops"],
        rel=1e-3,
    )
    assert fp32["peak_mem_mb"] > 0
    assert train["fp32_with_encode"]["tokens_per_s"] > 0
    assert train["tokens_per_sample"] == 16 + 64


def test_train_phase_bf16_reports_speedup(capsys):
    argv = ["--only", "train", *TINY, *GRID, "--steps", "1", "--warmup", "0", "--dtype", "bf16", "--no-encode"]
    out = run_json([*argv, "--matmul-n", "64", "--matmul-reps", "2"], capsys)
    train = out["presets"]["anchor-tiny"]["train"]
    assert train["peak"]["bf16_flops"] > 0
    assert train["bf16"]["tokens_per_s"] > 0 and train["bf16_speedup"] > 0
    assert "fp32_with_encode" not in train


@pytest.mark.slow
def test_train_phase_compiled_reports_its_speedup(capsys):
    argv = ["--only", "train", *TINY, *GRID, "--steps", "1", "--warmup", "0", "--no-encode", "--compile"]
    train = run_json(argv, capsys)["presets"]["anchor-tiny"]["train"]
    assert train["fp32_compiled"]["tokens_per_s"] > 0 and train["fp32_compile_speedup"] > 0
    assert math.isfinite(train["fp32_compiled"]["final_loss"])


def test_sample_phase_prints_json(capsys, tmp_path):
    bundle = str(make_tiny_bundle(tmp_path / "bundle"))
    argv = ["--only", "sample", *TINY, *GRID, "--sample-reps", "2", "--uncached-reps", "1", "--decode-models", bundle]
    out = run_json([*argv, "--relax", "0.3", "--decode-batches", "2"], capsys)
    # cached against speculative decoding on a trained bundle, its candidates (4, guided: 8 rows) and one
    decode = out["decode"][bundle]
    assert decode["image_tokens_per_sample"] == 16 and decode["prompts"] == 4
    assert decode["prompt_set"] == "shapes"  # the prompts of the bundle's preset, by its name ("tiny": none of its own)
    for key in ("fp32_batch1", "fp32_batch4", "bf16_batch1", "bf16_batch4"):
        assert decode[key]["speedup"] > 0
        assert decode[key]["cached"]["passes"] == 16 and decode[key]["cached"]["image_tokens_per_s"] > 0
    assert decode["fp32_batch1"]["speculative"]["window"] == 1  # fp32 on the CPU decodes plainly
    for key in ("fp32_batch4", "bf16_batch4"):  # the bundle guides: at its candidates, what guidance costs
        assert decode[key]["unguided"]["passes"] == 16 and decode[key]["guidance_cost"] > 0
    assert "unguided" not in decode["fp32_batch1"]
    # the window each run used: 32 positions over 4 rows (--decode-batches 2, guided) 8 cells, over 8 rows 4, under
    # the 8 that pay: plain; at one row 16, cut to the 15 cells after the first
    assert decode["bf16_batch2"]["speculative"]["window"] == 8 and decode["bf16_batch4"]["speculative"]["window"] == 1
    assert decode["bf16_batch1"]["speculative"]["window"] == 15 and decode["bf16_batch2"]["speedup"] > 0
    assert 1 < decode["bf16_batch1"]["speculative"]["passes"] < 16
    for key in ("passes_random_drafts", "passes_independent_redraft"):
        assert 1 < decode["bf16_batch1"]["speculative"][key] < 16
    relaxed = decode["bf16_batch1"]["relaxed"]  # the relaxed test, at one candidate only
    assert relaxed["relax"] == 0.3 and 1 < relaxed["passes"] < 16 and decode["bf16_batch1"]["relaxed_speedup"] > 0
    assert "relaxed" not in decode["bf16_batch4"]
    assert set(decode["fp32_pass_ms"]) == {f"rows{r}_window{w}" for r in (1, 8, 32) for w in (1, 4)}  # 16: no room
    assert all(ms > 0 for ms in decode["bf16_pass_ms"].values())
    sample = out["presets"]["anchor-tiny"]["sample"]
    for mode in ("cached", "guided", "uncached", "guided_until"):
        assert sample[mode]["wall_s"] > 0 and sample[mode]["image_tokens_per_s"] > 0
    assert sample["guidance_cost"] > 0 and sample["cache_speedup"] > 0
    assert sample["guidance_until"] == 0.5 and sample["guidance_until_cost"] > 0
    # on the CPU a bf16 copy of the weights is timed beside fp32
    assert sample["cached_bf16"]["image_tokens_per_s"] > 0 and sample["guided_bf16"]["wall_s"] > 0
    assert sample["bf16_speedup"] > 0 and sample["guidance_cost_bf16"] > 0
    assert sample["cached_equals_uncached"] is True
    assert sample["batch"] == 8 and sample["image_tokens_per_sample"] == 4
    # a 2 x 2 grid has no dVAE at the preset's 32 px, so no decode time is added
    assert "decode" not in sample


@pytest.mark.slow
def test_sample_phase_times_compiled_decoding(capsys):
    argv = ["--only", "sample", *TINY, *GRID, "--sample-reps", "1", "--uncached-reps", "0", "--compile"]
    argv += ["--decode-models"]
    sample = run_json(argv, capsys)["presets"]["anchor-tiny"]["sample"]
    for mode in ("cached_compiled", "guided_compiled"):
        assert sample[mode]["image_tokens_per_s"] > 0 and sample[f"{mode}_first_run_s"] > sample[mode]["wall_s"]
    assert sample["compiled_speedup"] > 0 and sample["guided_compiled_speedup"] > 0
    assert sample["compiled_equals_cached"] is True


def test_vae_phase_prints_json(capsys):
    out = run_json(["--only", "vae", "--steps", "1", "--warmup", "0", "--vae-batch", "4"], capsys)
    vae = out["vae"]
    for name in ("anchor-tiny-args", "param-matched", "shapes"):
        assert vae[name]["images_per_s"] > 0 and vae[name]["params"] > 0
    assert vae["anchor_tiny_params"] == 561091
    # the param-matched dVAE is the nearest to the anchor's count that a multiple-of-8 width gives
    assert abs(vae["param-matched"]["params_vs_anchor_tiny"] - 1) < 0.15


def test_peak_phase_and_bad_override(capsys):
    out = run_json(["--only", "peak", "--matmul-n", "64", "--matmul-reps", "2"], capsys)
    assert out["peak"]["fp32_matmul_n"] == 64
    with pytest.raises(UserError, match="unknown config key .widht.; allowed keys here are: .*depth"):
        bench.main(["--only", "sample", "--set", "widht=3"])


def test_gpu_check_reads_the_targets_and_refuses_a_machine_without_gpu(capsys):
    from dalle_mini_impl.bench import gpu as gpu_check

    train = {
        "bf16": {"tokens_per_s": 150_000.0, "mfu": 0.41},
        "bf16_compiled": {"tokens_per_s": 200_000.0, "mfu": 0.55},
    }
    sample = {
        "cached": {"image_tokens_per_s": 5_000.0},
        "cached_compiled": {"image_tokens_per_s": 7_000.0},  # the faster of eager and compiled counts
        "guided_batch256": {"image_tokens_per_s": 40_000.0},
    }
    targets = gpu_check.check({"presets": {"dalle256": {"train": train, "sample": sample}}})  # bench/anchor.json
    assert targets["train_mfu"] == {"value": 0.55, "target": ">= 0.5", "met": True}  # the faster of the two
    assert targets["train_vs_anchor"]["value"] == round(200_000 / 47_500, 2) and targets["train_vs_anchor"]["met"]
    assert targets["sample_vs_anchor"]["value"] == round(7_000 / 327, 2) and targets["sample_vs_anchor"]["met"]
    assert targets["guided_batch256_image_tokens_per_s"]["met"] is False
    assert not any(t["met"] for t in gpu_check.check({}).values())  # nothing measured: nothing met
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            run_cli(gpu_check.main, [])
        said = capsys.readouterr().err
        # once "run with --device cpu", which ran the GPU preset on the CPU for over ten minutes
        assert e.value.code == 2 and "needs a GPU and torch sees none; on a CPU run python -m dalle_mini_impl" in said
        with pytest.raises(SystemExit) as e:
            run_cli(gpu_check.main, ["--device", "cpu"])
        assert e.value.code == 2 and "runs on the GPU alone; leave out --device" in capsys.readouterr().err


def test_the_anchor_figures_are_an_input(tmp_path, capsys):
    from dalle_mini_impl.bench import anchor
    from dalle_mini_impl.bench import gpu as gpu_check

    figures = anchor.read_figures()  # the packaged bench/anchor.json
    assert figures["tiny_vae_params"] == 561091 and figures["cpu_targets"]["medium"]["sampling_speedup"] == [">=", 25.0]
    other = {**figures, "h200_dalle256": {"train_tokens_per_s": 100_000, "sample_16x1024_image_tokens_per_s": 1000}}
    train = {"bf16": {"tokens_per_s": 200_000.0, "mfu": 0.3}}
    result = {"presets": {"dalle256": {"train": train, "sample": {}}}}
    assert gpu_check.check(result, other)["train_vs_anchor"] == {"value": 2.0, "target": ">= 4.0", "met": False}
    ratios = anchor.compute_ratios({}, {}, figures["cpu_targets"]["tiny"])
    assert ratios["targets"] == {}  # nothing measured: no target reported as met or missed
    for bad, message in (
        (tmp_path / "none.json", "figures file '.*none.json' does not exist; pass --figures"),
        (tmp_path / "broken.json", "figures file '.*broken.json' is not valid JSON"),
        (tmp_path / "partial.json", "figures file '.*partial.json' has no 'tiny_vae_params'"),
    ):
        if bad.name == "broken.json":
            bad.write_text("{")
        elif bad.name == "partial.json":
            bad.write_text("{}")
        with pytest.raises(UserError, match=message):
            anchor.read_figures(bad)
    (tmp_path / "b.py").write_text("print('{}')\n")
    (tmp_path / "taken").mkdir()
    ours = ["--anchor-bench", str(tmp_path / "b.py")]
    python = ["--anchor-python", sys.executable, *ours]
    for argv, says in (
        (["--anchor-python", str(tmp_path / "nope"), *ours], f"--anchor-python '{tmp_path / 'nope'}' is no program"),
        (["--anchor-python", str(tmp_path), *ours], "is no program \\(missing, a folder"),  # once a PermissionError
        ([*python[:2], "--anchor-bench", str(tmp_path)], "is no file; pass the anchor's timing script"),
        ([*python, "--out", str(tmp_path / "taken")], "--out '.*taken' is a folder"),  # once after the first runs
        ([*python, "--log", str(tmp_path / "taken")], "--log '.*taken' is a folder"),
        ([*python, "--threads", "0"], "--threads is 0; give both sides at least 1 thread"),  # once: exit 0, nothing
        ([*python, "--timeout", "0"], "--timeout is 0.0"),
        ([*python, "--configs", "medium", "--phases", "vae"], "--configs and --phases leave no run"),
    ):
        with pytest.raises(SystemExit) as stop:
            run_cli(anchor.main, argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and re.search(says, err) and err.count("\n") == 1, (argv, err)


def test_each_phase_child_gets_the_commands_settings_and_the_bundles_are_compared_once(monkeypatch):
    """Once: --peak-json and --cli-reps never reached the children, and every preset's sample child compared the
    shipped bundles' decoding again, its result thrown away but the last."""
    import subprocess

    commands = []

    def child(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="{}\n")

    monkeypatch.setattr(bench.subprocess, "run", child)
    args = bench.build_parser().parse_args(["--peak-json", '{"fp32_flops": 1e11}', "--cli-reps", "7"])
    bench.run_children(args, ["tiny", "medium"], {})
    for cmd in commands:
        assert cmd[cmd.index("--peak-json") + 1] == '{"fp32_flops": 1e11}' and cmd[cmd.index("--cli-reps") + 1] == "7"
    samples = [cmd for cmd in commands if cmd[cmd.index("--only") + 1] == "sample"]
    compared = [cmd[cmd.index("--decode-models") + 1 :][:2] for cmd in samples]
    assert len(samples) == 2 and compared[0] == ["shapes", "emoji"] and compared[1][:1] != ["shapes"]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--device", "gpu"], "--device 'gpu' is not a device torch knows; use cpu or cuda"),  # once a RuntimeError
        (["--threads", "0"], "--threads is 0; give at least one torch thread"),  # once a RuntimeError
        (["--train-batch", "-1"], "--train-batch is -1; give at least one row in a training batch"),
        (["--cli-reps", "0"], "--cli-reps is 0"),  # once a StatisticsError: a median of no timings
        (["--matmul-reps", "0"], "--matmul-reps is 0"),  # once min() of nothing
        (["--sample-reps", "0"], "--sample-reps is 0"),  # once a KeyError
        (["--steps", "0"], "--steps is 0; give at least one timed training step \\(leave it out for the default\\)"),
        (["--matmul-n", "0"], "--matmul-n is 0"),  # once measured at 2048 in silence
        (["--warmup", "-1"], "--warmup is -1; give 0 or more untimed steps"),
        (["--uncached-reps", "-1"], "--uncached-reps is -1; give 0 \\(not timed\\) or more"),  # 0 is a use
    ],
)
def test_a_bench_option_no_run_can_take_is_one_sentence_before_anything_runs(argv, says):
    with pytest.raises(UserError, match=f"^{says}"):
        bench.run(["--only", "peak", *argv])
