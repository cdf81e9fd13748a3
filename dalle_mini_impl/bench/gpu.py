"""The GPU check: `PYTHONPATH=. python -m dalle_mini_impl.bench.gpu` on one GPU, no network.

Runs the benchmark (`python -m dalle_mini_impl.bench`, each phase in its own process) at DALL-E's
256 px geometry, preset dalle256 (64 text + 1024 image tokens, dim 1024, depth 12, 16 heads x 64,
8,192 codes, 16,384 text ids): the measured bf16 matmul peak, bf16 training at batch 8 eager and
through torch.compile (tokens/s, MFU), sampling 16 prompts x 1024 image tokens with the KV cache, and
guided sampling at batches 64 and 256, with peak memory, each eager and with the compiled decoding step
(CUDA graphs; the targets take the faster). It then checks the targets of `--figures` (default
anchor.json beside this file: the anchor's H200 training and sampling rates at this geometry, and the
bounds on each) and prints one JSON object: {"bench": ..., "targets": ...}. Other arguments go to the
benchmark (e.g. --steps 5). Needs only torch, einops and safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from ..errors import UserError, run_cli
from .anchor import read_figures, target_entry
from .speed import run as run_bench

PRESET = "dalle256"


def fastest(sample: dict[str, Any], *modes: str) -> float | None:
    """The best image tokens/s among the sampling modes that ran (eager, compiled decoding step)."""
    rates = [sample[m]["image_tokens_per_s"] for m in modes if m in sample]
    return max(rates, default=None)


def check(bench: dict[str, Any], figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GPU targets of `figures` (default: anchor.json), read from a benchmark result of preset dalle256."""
    figures = figures or read_figures()
    anchor, bounds = figures["h200_dalle256"], figures["gpu_targets"]
    preset = bench.get("presets", {}).get(PRESET, {})
    train, sample = preset.get("train", {}), preset.get("sample", {})
    best = max((train[k] for k in ("bf16", "bf16_compiled") if k in train), key=lambda r: r["tokens_per_s"], default={})
    tokens_per_s = best.get("tokens_per_s")
    sample_tps = fastest(sample, "cached", "cached_compiled")
    values = {
        "train_mfu": best.get("mfu"),
        "train_vs_anchor": tokens_per_s and round(tokens_per_s / anchor["train_tokens_per_s"], 2),
        "sample_16x1024_image_tokens_per_s": sample_tps,
        "sample_vs_anchor": sample_tps and round(sample_tps / anchor["sample_16x1024_image_tokens_per_s"], 2),
        "guided_batch256_image_tokens_per_s": fastest(sample, "guided_batch256", "guided_batch256_compiled"),
    }
    return {name: target_entry(values.get(name), op, bound) for name, (op, bound) in bounds.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dalle_mini_impl.bench.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--figures", default=None, help="targets and anchor figures (default: bench/anchor.json)")
    args, extra = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if any(a == "--device" or a.startswith("--device=") for a in extra):
        raise UserError("python -m dalle_mini_impl.bench.gpu runs on the GPU alone; leave out --device")
    if not torch.cuda.is_available():  # its advice to add --device cpu ran the GPU preset on a CPU for minutes
        raise UserError(
            "python -m dalle_mini_impl.bench.gpu needs a GPU and torch sees none; on a CPU run python -m "
            "dalle_mini_impl.bench"
        )
    figures = read_figures(args.figures)  # a bad file stops before minutes of GPU work
    bench = run_bench(["--device", "cuda", "--dtype", "bf16", "--compile", "--preset", PRESET, *extra])
    print(json.dumps({"bench": bench, "targets": check(bench, figures)}), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
