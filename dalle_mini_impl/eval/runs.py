"""Two training runs side by side: `python -m dalle_mini_impl.eval runs RUN_A RUN_B`.

Whether two run folders (the `--out` of `train.all` or of a stage) hold the same training. On one machine a run
trained again from nothing with the same config, seed, data and thread count is the same bit for bit, and so is
a run that was stopped and resumed (docs/RELIABILITY.md); on another machine float sums may part, and this says
where. Prints one JSON object:

- `files`: every safetensors file both folders have (each stage's weights, the checkpoints of the steps both
  kept, the token shards), by its path in the folder: how many tensors, how many are equal bit for bit, the
  largest absolute difference, and the tensors of a name or shape only one side has; `only_a` / `only_b`: the files
  one folder lacks. `text_model`: whether the two sentencepiece models are the same bytes.
- `logs`: for each stage and each number both runs logged at the same steps (throughput left out: it is the
  machine's, not the run's), the steps compared, how many are equal, the first step that differs and the largest
  relative difference (NaN in both is equal). A step logged twice (a run that went back to a checkpoint) counts as
  last written.
- `same`: every compared tensor and logged number equal (and something was compared); `first_difference`: the
  logged number of A, among those that differ, that was written first (stage, tag, step), else null.

Optimizer states and RNG states are pickles and are not read.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

import torch

from ..errors import UserError
from ..pipeline.bundle import load_state_dict

# logged numbers that measure the machine (items per second), not the training
MACHINE_TAGS = ("_per_s",)


def compare_files(a: Path, b: Path) -> dict:
    """The safetensors files of two run folders, paired by path: equal tensors and the largest difference."""
    files_a = {p.relative_to(a).as_posix() for p in a.rglob("*.safetensors")}
    files_b = {p.relative_to(b).as_posix() for p in b.rglob("*.safetensors")}
    files = {}
    for name in sorted(files_a & files_b):
        x, y = load_state_dict(a / name), load_state_dict(b / name)
        keys = sorted(x.keys() & y.keys())
        alike = [k for k in keys if x[k].shape == y[k].shape]
        differences = [_largest_difference(x[k], y[k]) for k in alike]
        files[name] = {
            "tensors": len(keys),
            "equal": sum(_same_bits(x[k], y[k]) for k in alike),
            # None where a value is NaN on one side only
            "max_abs_diff": None if None in differences else max(differences, default=0.0),
            "names_differ": sorted(x.keys() ^ y.keys()),
            "shapes_differ": [k for k in keys if k not in alike],
        }
    return {"files": files, "only_a": sorted(files_a - files_b), "only_b": sorted(files_b - files_a)}


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal bit for bit (a NaN equals the same NaN); tensors of two dtypes are compared by value."""
    if x.dtype != y.dtype:
        return torch.equal(x, y)
    return torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def _largest_difference(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """The largest absolute difference, NaN on both sides counting as none; None when one side alone is NaN."""
    if not x.numel():
        return 0.0
    x, y = x.double(), y.double()
    differences = (x - y).abs()[~(x.isnan() & y.isnan())]
    if differences.isnan().any():
        return None
    return float(differences.max()) if differences.numel() else 0.0


def read_logs(run: Path) -> dict[str, dict[str, dict[int, tuple[float, float]]]]:
    """{stage: {tag: {step: (value, wall_time)}}} of every TensorBoard scalar under RUN/logs, the last value
    written for a step that was logged more than once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs: dict[str, dict[str, dict[int, tuple[float, float]]]] = {}
    for path in sorted(glob.glob(str(run / "logs" / "*" / "**" / "events.out.tfevents.*"), recursive=True)):
        stage = Path(path).relative_to(run / "logs").parts[0]
        events = EventAccumulator(path, size_guidance={"scalars": 0, "images": 1, "tensors": 1})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.endswith(MACHINE_TAGS):
                continue
            steps = logs.setdefault(stage, {}).setdefault(tag, {})
            for e in events.Scalars(tag):
                if e.step not in steps or e.wall_time >= steps[e.step][1]:
                    steps[e.step] = (e.value, e.wall_time)
    return logs


def compare_logs(a: Path, b: Path) -> tuple[dict, dict | None]:
    """Each stage's logged numbers at the steps both runs logged, and the first of A's that differs."""
    logs_a, logs_b = read_logs(a), read_logs(b)
    out: dict[str, dict] = {}
    first: tuple[float, dict] | None = None
    for stage in sorted(logs_a.keys() & logs_b.keys()):
        for tag in sorted(logs_a[stage].keys() & logs_b[stage].keys()):
            x, y = logs_a[stage][tag], logs_b[stage][tag]
            steps = sorted(x.keys() & y.keys())
            differ = [s for s in steps if not _same(x[s][0], y[s][0])]
            out.setdefault(stage, {})[tag] = {
                "steps": len(steps),
                "equal": len(steps) - len(differ),
                "first_differ": differ[0] if differ else None,
                "max_rel_diff": max((r for s in differ if (r := _relative(x[s][0], y[s][0])) is not None), default=0.0),
            }
            if differ and (first is None or x[differ[0]][1] < first[0]):
                first = (x[differ[0]][1], {"stage": stage, "tag": tag, "step": differ[0]})
    return out, None if first is None else first[1]


def _same(u: float, v: float) -> bool:
    return u == v or (math.isnan(u) and math.isnan(v))  # a step both logged as NaN is the same step


def _relative(u: float, v: float) -> float | None:
    """|u - v| relative to the larger; None where one of them is NaN and the other is not."""
    if math.isnan(u) or math.isnan(v):
        return None
    return abs(u - v) / max(abs(u), abs(v), 1e-12)


def check_run(path: str) -> Path:
    run = Path(path)
    if not run.is_dir():
        what = "is a file, not a folder" if run.exists() else "does not exist"
        raise UserError(f"run folder '{path}' {what}; pass the --out folder of a training run")
    if not any(run.rglob("*.safetensors")) and not (run / "logs").is_dir():
        raise UserError(f"'{path}' holds no weights and no logs; pass the --out folder of a training run")
    return run


def compare_runs(a: Path, b: Path) -> dict:
    """What `eval runs A B` prints (the module docstring)."""
    files = compare_files(a, b)
    text_a, text_b = a / "text.model", b / "text.model"
    text_model = text_a.read_bytes() == text_b.read_bytes() if text_a.is_file() and text_b.is_file() else None
    logs, first_difference = compare_logs(a, b)
    compared = files["files"] or any(logs.values())
    same = bool(
        compared
        and text_model is not False
        and all(f["equal"] == f["tensors"] and not f["names_differ"] for f in files["files"].values())
        and first_difference is None
    )
    return {**files, "text_model": text_model, "logs": logs, "same": same, "first_difference": first_difference}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle_mini_impl.eval runs", description=__doc__.split("\n")[0])
    p.add_argument("a", help="a run folder (the --out of train.all or of a stage)")
    p.add_argument("b", help="another, e.g. the same command run again")
    args = p.parse_args(argv)
    result = compare_runs(check_run(args.a), check_run(args.b))
    print(json.dumps({"a": args.a, "b": args.b, **result}))
    return 0


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
