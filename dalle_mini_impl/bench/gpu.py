"""The scale-out issue's GPU check: `PYTHONPATH=. python -m dalle_mini_impl.bench.gpu` on one GPU, no network.

Runs the benchmark (`python -m dalle_mini_impl.bench`, each phase in its own process) at DALL-E's
256 px geometry, preset dalle256 (64 text + 1024 image tokens, dim 1024, depth 12, 16 heads x 64,
8,192 codes, 16,384 text ids): the measured bf16 matmul peak, bf16 training at batch 8 eager and
through torch.compile (tokens/s, MFU), sampling 16 prompts x 1024 image tokens with the KV cache, and
guided sampling at batches 64 and 256, with peak memory, each eager and with the compiled decoding step
(CUDA graphs; the targets take the faster). It then checks the issue's targets against
the anchor numbers the issue measured on an H200 (dalle-pytorch 1.6.6: 47,500 training tokens/s,
327 image tokens/s from `generate_images`) and prints one JSON object: {"bench": ..., "targets": ...}.
Sized to finish in a few minutes on an H100 or H200; needs only torch, einops and safetensors.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ..errors import run_cli
from .anchor import target_entry
from .speed import run as run_bench

PRESET = "dalle256"
ANCHOR_TRAIN_TOKENS_PER_S = 47_500  # dalle-pytorch 1.6.6, bf16, batch 8, on an H200 (the baseline)
ANCHOR_SAMPLE_TOKENS_PER_S = 327  # its generate_images, 16 images x 1024 tokens, same machine


def fastest(sample: dict[str, Any], *modes: str) -> float | None:
    """The best image tokens/s among the sampling modes that ran (eager, compiled decoding step)."""
    rates = [sample[m]["image_tokens_per_s"] for m in modes if m in sample]
    return max(rates, default=None)


def check(bench: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, read from a benchmark result of preset dalle256 on a GPU."""
    preset = bench.get("presets", {}).get(PRESET, {})
    train, sample = preset.get("train", {}), preset.get("sample", {})
    best = max((train[k] for k in ("bf16", "bf16_compiled") if k in train), key=lambda r: r["tokens_per_s"], default={})
    tokens_per_s = best.get("tokens_per_s")
    sample_tps = fastest(sample, "cached", "cached_compiled")
    guided_tps = fastest(sample, "guided_batch256", "guided_batch256_compiled")
    return {
        "train_mfu": target_entry(best.get("mfu"), ">=", 0.50),
        "train_vs_anchor": target_entry(tokens_per_s and round(tokens_per_s / ANCHOR_TRAIN_TOKENS_PER_S, 2), ">=", 4.0),
        "sample_16x1024_image_tokens_per_s": target_entry(sample_tps, ">=", 6_500),
        "sample_vs_anchor": target_entry(sample_tps and round(sample_tps / ANCHOR_SAMPLE_TOKENS_PER_S, 2), ">=", 20.0),
        "guided_batch256_image_tokens_per_s": target_entry(guided_tps, ">=", 50_000),
    }


def main(argv: list[str] | None = None) -> int:
    """Extra arguments go to the benchmark (e.g. --steps 5)."""
    extra = list(sys.argv[1:] if argv is None else argv)
    bench = run_bench(["--device", "cuda", "--dtype", "bf16", "--compile", "--preset", PRESET, *extra])
    print(json.dumps({"bench": bench, "targets": check(bench)}), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
