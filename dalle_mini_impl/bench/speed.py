"""Speed benchmark of the transformer (training, sampling) and the dVAE (training), printed as one JSON object.

    python -m dalle_mini_impl.bench                          # every CPU preset, every phase
    python -m dalle_mini_impl.bench --preset anchor-tiny --only sample
    python -m dalle_mini_impl.bench --dtype bf16             # adds bf16-autocast training and its speed-up
    python -m dalle_mini_impl.bench --device cuda            # adds the dalle256 preset (1024 image tokens)
    python -m dalle_mini_impl.bench --device cuda --compile  # also training through torch.compile
    python -m dalle_mini_impl.bench --only train --set dim=32 --set depth=1 --steps 2   # a quick smoke run

The last line of stdout is one JSON object; progress goes to stderr. Phases:
  peak    the best dense matmul FLOP/s this machine reaches (fp32 2048^3 on CPU; 8192^3 on GPU, in bf16 and
          fp32), measured first: the denominator of the model-FLOPs utilisation (MFU).
  train   per preset: fwd + bwd + AdamW step on random token ids (the transformer trains on pre-encoded
          ids); tokens/s counted as batch * (text_len + image_len) per step, the anchor's convention; MFU =
          flops_per_token * positions/s / peak (PaLM / nanoGPT); for transparency also the same step with a
          dVAE encode of random pixels in it (what the anchor times, as it re-encodes pixels every step);
          with --dtype bf16 (default on GPU) also bf16 autocast and its speed-up over fp32.
  sample  per preset: `generate` for 8 prompts with the KV cache, without it (decode uncached) and with
          classifier-free guidance (scale 3): wall seconds, image tokens/s, guided / unguided cost, and guidance
          of the first `--guidance-until` of the image only (`guided_until`, `guidance_until_cost`); on the
          CPU the cached and guided runs again from a bf16 copy of the weights (`cached_bf16`,
          `guided_bf16`, `bf16_speedup`: what `python -m sample --dtype bf16` does); on GPU the weights are
          cast to --dtype, and at dalle256 batches 64 and 256 with guidance are timed too. With --compile
          also the torch.compile'd decoding step (`cached_compiled`, `guided_compiled`, their first run
          with the compile apart, `compiled_speedup`; CUDA graphs on GPUs: `python -m sample --compile`).
          Then, under "decode", plain cached against speculative decoding on the trained bundles of
          `--decode-models` (default: the shipped shapes and emoji) with their own sampling settings, at one
          candidate, at the default command's candidates and at `--decode-batches`: tokens/s, sequential
          passes, `speedup`; at the
          candidates also unguided (`unguided`) and the bundle's guidance against none (`guidance_cost`).
  vae     dVAE training images/s at 32 px, batch 32: a configuration with the constructor arguments of the
          anchor's tiny dVAE (512 codes, code width 256, two stride-2 levels, hidden 64, no res-blocks),
          the same with the hidden width that matches the anchor's parameter count, and the shapes
          preset's (hidden 64, one res-block); parameter counts beside each.
  cli     the whole default `python -m sample` command, end to end, against a bare `import torch`.
Without --only each (phase, preset) runs in its own child process, so that peak memory (ru_maxrss on CPU)
is that phase's own; on GPU it is torch.cuda.max_memory_allocated, reset before each measurement.

The anchor-* presets reproduce the configurations of dalle-pytorch 1.6.6 that its own timing script
times (batch 16 training, 8 prompts x 64 image tokens, top 10% of ids kept as its filter_thres=0.9 does);
`python -m dalle_mini_impl.bench.anchor` runs both side by side. Weights are random: speed, not quality,
is measured. On a CPU shared with other jobs use --threads 1 (see `bench/anchor.py`: at 2 threads an
oversubscribed machine times its scheduler, not the code).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import vae as vae_lib

from ..config import apply_overrides, load_config
from ..errors import UserError, run_cli
from ..model.generate import generate
from ..model.transformer import DALLE, GEOMETRY, PRESETS, TransformerConfig, resolve_config
from ..pipeline.pipeline import DTYPES
from .anchor import read_figures

CPU_PRESETS = ["anchor-tiny", "anchor-medium", "tiny"]
GPU_PRESETS = ["dalle256"]
PHASES = ("peak", "train", "sample", "vae", "cli")
SEED = 0

# Per-preset workload: batch sizes and step counts (the anchor's for the anchor-* presets), and the dVAE
# that would tokenize the preset's images (the anchor's constructor arguments, translated), used only for the
# "with encode" training number.
WORKLOADS: dict[str, dict[str, Any]] = {
    "anchor-tiny": dict(
        train_batch=16,
        train_steps=20,
        warmup=2,
        sample_batch=8,
        image_size=32,
        vae=dict(codebook_size=512, factor=4, hidden=64, res_blocks=0, code_dim=256),
    ),
    "anchor-medium": dict(
        train_batch=16,
        train_steps=8,
        warmup=2,
        sample_batch=8,
        image_size=64,
        vae=dict(codebook_size=1024, factor=8, hidden=128, res_blocks=1, code_dim=256),
    ),
    "tiny": dict(
        train_batch=16,
        train_steps=10,
        warmup=2,
        sample_batch=8,
        image_size=32,
        vae=dict(codebook_size=512, factor=4, hidden=64, res_blocks=1, code_dim=256),
    ),
    "dalle256": dict(
        train_batch=8,
        train_steps=10,
        warmup=3,
        sample_batch=16,  # the anchor's 16 images of 1024 tokens
        guided_batches=[64, 256],
        image_size=256,
        vae=dict(codebook_size=8192, factor=8, hidden=128, res_blocks=1, code_dim=512),
    ),
}
DEFAULT_WORKLOAD = WORKLOADS["tiny"]

# The dVAE phase: 32 px, batch 32, as the anchor's tiny config. The parameter count of the anchor's tiny
# DiscreteVAE (num_tokens 512, codebook_dim 256, num_layers 2, hidden_dim 64, no res-blocks) is read from
# `--figures` (bench.anchor reads the live number from the anchor's own output). Three of ours are timed:
# the anchor's constructor arguments translated, the one without res-blocks whose parameter count is
# nearest the anchor's (equal parameters; found at run time, so it follows changes to vae/), and the
# shapes preset's.
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "anchor-tiny-args": dict(codebook_size=512, factor=4, hidden=64, res_blocks=0, code_dim=256),
}
VAE_IMAGE_SIZE = 32
VAE_BATCH = 32
VAE_STEPS, VAE_WARMUP = 30, 2

SAMPLE_GUIDANCE_SCALE = 3.0
SAMPLE_KEEP = 0.1  # the anchor's filter_thres 0.9 keeps the top 10% of ids


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Small helpers: MFU, timing, memory, machine description
# ----------------------------------------------------------------------------------------------


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model-FLOPs utilisation: the fraction of the measured peak that the model's own FLOPs use.

    flops_per_token: training FLOPs per position (forward + backward, `DALLE.flops_per_token`);
    tokens_per_s: positions processed per second; peak_flops: the measured matmul FLOP/s.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return flops_per_token * tokens_per_s / peak_flops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Wall seconds of fn(), with the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """GPU: the allocator's peak since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return {
            "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_mem_kind": "cuda_max_allocated",
        }
    return {
        "peak_mem_mb": round(peak_rss_bytes() / 2**20, 1),
        "peak_mem_kind": "ru_maxrss",
    }


def peak_rss_bytes() -> int:
    """The process's peak resident set in bytes: `ru_maxrss` is in KiB on Linux and in bytes on macOS. 0 where
    the `resource` module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def step_stats(times: list[float], work: float, unit: str) -> dict[str, float]:
    """Throughput of `work` units per step, from the median step (robust on a shared machine) and the total."""
    med = statistics.median(times)
    return {
        f"{unit}_per_s": round(work / med, 2),
        f"{unit}_per_s_total": round(work * len(times) / sum(times), 2),
        "step_s_median": round(med, 5),
        "step_s_min": round(min(times), 5),
        "step_s_max": round(max(times), 5),
        "steps": len(times),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def meta(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    m = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seed": SEED,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update({"gpu": p.name, "gpu_mem_total_mb": round(p.total_memory / 2**20), "cuda": torch.version.cuda})
    return m


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------


def measure_peak(device: torch.device, dtype: str, n: int, reps: int, warmup: int = 2) -> dict[str, float]:
    """The best and the median FLOP/s of an (n, n) @ (n, n) matmul in `dtype` (plain, not autocast)."""
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(SEED)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=tdtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=tdtype)
    for _ in range(warmup):
        a @ b
    times = [timed(device, lambda: a @ b) for _ in range(reps)]
    flop = 2 * n**3
    return {
        f"{dtype}_flops": round(flop / min(times)),  # the peak: the best repetition
        f"{dtype}_flops_median": round(flop / statistics.median(times)),
        f"{dtype}_matmul_n": n,
        f"{dtype}_reps": reps,
    }


def phase_peak(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    # on CPU a 2048^3 sgemm is large enough to reach MKL's steady state and short enough to repeat;
    # on GPU 8192^3 fills every SM
    n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    dtypes = ["fp32"] + (["bf16"] if args.dtype == "bf16" else [])
    out: dict[str, Any] = {}
    for d in dtypes:
        log(f"peak: {d} {n}^3 matmul x {args.matmul_reps}")
        out.update(measure_peak(device, d, n, args.matmul_reps))
    return out


def workload(name: str) -> dict[str, Any]:
    return dict(WORKLOADS.get(name, DEFAULT_WORKLOAD))


def build_config(name: str, overrides: list[str]) -> TransformerConfig:
    """Preset `name` with `--set key=value` overrides of its fields, read by the config module's parser.

    A preset that names only a size (tiny, small, ...) is timed at anchor-tiny's geometry.
    """
    cfg = apply_overrides(TransformerConfig(preset=name), overrides)
    for key, value in PRESETS["anchor-tiny"].items():
        if key in GEOMETRY and key not in PRESETS[name] and not getattr(cfg, key):
            setattr(cfg, key, value)
    return resolve_config(cfg)


def random_batch(cfg: TransformerConfig, b: int, g: torch.Generator, device: torch.device):
    # text ids from 1: id 0 is the pad, and a caption of pads would make the text loss empty
    text = torch.randint(1, cfg.text_vocab, (b, cfg.text_len), generator=g).to(device)
    image = torch.randint(0, cfg.image_vocab, (b, cfg.image_len), generator=g).to(device)
    return text, image


def model_summary(model: DALLE) -> dict[str, Any]:
    c = model.cfg
    return {
        "dim": c.dim,
        "depth": c.depth,
        "heads": c.heads,
        "head_dim": c.head_dim,
        "text_len": c.text_len,
        "text_vocab": c.text_vocab,
        "image_vocab": c.image_vocab,
        "image_len": c.image_len,
        "mlp": c.mlp,
        "params": model.num_params(non_embedding=False),
        "params_non_embedding": model.num_params(),
        "flops_per_token": model.flops_per_token(),
    }


def train_run(
    model: DALLE,
    text: torch.Tensor,
    image: torch.Tensor,
    device: torch.device,
    dtype: str,
    steps: int,
    warmup: int,
    encode: Callable[[], torch.Tensor] | None = None,
    compile: bool = False,
) -> tuple[list[float], float]:
    """Step times of fwd + bwd + AdamW on fixed ids; with `encode`, the image ids come from it each step.

    compile: the loss (forward and, through AOTAutograd, backward) runs through torch.compile; its
    compilation happens in the warm-up steps, which are not timed.
    """
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    model.train()
    loss_fn = torch.compile(model.loss) if compile else model.loss

    def step() -> torch.Tensor:
        ids = image if encode is None else encode()
        with autocast(device, dtype):
            loss, _ = loss_fn(text, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    times, loss = [], None
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, float(loss.detach()) if loss is not None else float("nan")


def phase_train(name: str, args: argparse.Namespace, device: torch.device, peak: dict[str, Any]) -> dict[str, Any]:
    w = workload(name)
    cfg = build_config(name, args.overrides)
    b = args.train_batch or w["train_batch"]
    steps = args.steps or w["train_steps"]
    warmup = w["warmup"] if args.warmup is None else args.warmup
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = DALLE(cfg).to(device)
    text, image = random_batch(cfg, b, g, device)
    seq_tokens = cfg.text_len + cfg.image_len  # the anchor's count: every text and image token of a sample
    fpt = model.flops_per_token()
    out: dict[str, Any] = {
        "batch": b,
        "warmup_steps": warmup,
        "tokens_per_sample": seq_tokens,
        "positions_per_sample": cfg.seq_len,
        "optimizer": "AdamW",
    }
    # fp32 always (the anchor comparison); bf16 autocast when asked, with its speed-up; with --compile
    # each again through torch.compile ("fp32_compiled", "bf16_compiled")
    dtypes = ["fp32"] + (["bf16"] if args.dtype == "bf16" else [])
    runs = [(d, False) for d in dtypes] + ([(d, True) for d in dtypes] if args.compile else [])
    for d, compiled in runs:
        key = f"{d}_compiled" if compiled else d
        log(f"train {name} {key}: batch {b}, {steps} steps after {warmup} warm-up")
        reset_memory(device)
        times, loss = train_run(
            model, text, image, device, d, steps, max(warmup, 2) if compiled else warmup, None, compiled
        )
        st = step_stats(times, b * seq_tokens, "tokens")
        positions_per_s = b * cfg.seq_len / st["step_s_median"]
        res = {**st, "positions_per_s": round(positions_per_s, 2), "final_loss": round(loss, 5)}
        peak_key = f"{d}_flops"
        if peak.get(peak_key):
            res["mfu"] = round(mfu(fpt, positions_per_s, peak[peak_key]), 5)
            res["mfu_peak_flops"] = peak[peak_key]
        res.update(peak_memory(device))
        out[key] = res
    if "bf16" in out:
        out["bf16_speedup"] = round(out["fp32"]["step_s_median"] / out["bf16"]["step_s_median"], 3)
    for d in dtypes if args.compile else []:
        out[f"{d}_compile_speedup"] = round(out[d]["step_s_median"] / out[f"{d}_compiled"]["step_s_median"], 3)

    if not args.no_encode:
        # the same step with a dVAE encode of random pixels in it: what the anchor's number includes
        size = w["image_size"]
        torch.manual_seed(SEED)
        tok = vae_lib.build("dvae", **w["vae"]).to(device).eval()
        grid = tok.grid(size)
        if grid != (cfg.grid_h, cfg.grid_w):
            out["with_encode_skipped"] = f"dVAE grid {grid} != model grid {(cfg.grid_h, cfg.grid_w)}"
        else:
            pixels = torch.rand(b, 3, size, size, generator=g).to(device)

            def encode() -> torch.Tensor:
                return tok.encode(pixels).flatten(1)

            enc_steps = max(2, steps // 4)  # for transparency only: a few steps keep the default run short
            log(f"train {name} fp32 with dVAE encode: {enc_steps} steps")
            times, loss = train_run(model, text, image, device, "fp32", enc_steps, min(warmup, 1), encode)
            res = step_stats(times, b * seq_tokens, "tokens")
            res.update(
                {
                    "vae": dict(w["vae"]),
                    "vae_params": sum(p.numel() for p in tok.parameters()),
                    "image_size": size,
                }
            )
            out["fp32_with_encode"] = res
    return out


def sample_once(model, text, null, scale, top_k, decode, seed, device, until=1.0) -> tuple[float, torch.Tensor]:
    """Wall seconds and ids of one `generate` in decode mode `decode`, guided for the first `until` of the image."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    box: list[torch.Tensor] = []

    def run() -> None:
        box.append(
            generate(
                model, text, null_text=null, guidance_scale=scale, guidance_until=until, top_k=top_k, generator=g,
                decode=decode,
            )
        )  # fmt: skip

    return timed(device, run), box[0]


def phase_sample(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    w = workload(name)
    cfg = build_config(name, args.overrides)
    b = args.sample_batch or w["sample_batch"]
    torch.manual_seed(SEED)
    model = DALLE(cfg).to(device).eval()
    dtype = args.dtype if device.type == "cuda" else "fp32"
    # half precision samples from weights cast to it, as `Pipeline(dtype=...)` does: decoding reads every
    # weight once per token, so halving their bytes is the win (autocast would recast them every step)
    model = model.to(DTYPES[dtype])
    # on the CPU the fp32 modes are the reference and a bf16 copy of the same weights is timed beside them
    bf16_copy = copy.deepcopy(model).to(torch.bfloat16) if device.type == "cpu" else None
    g = torch.Generator().manual_seed(SEED + 1)
    text = torch.randint(1, cfg.text_vocab, (b, cfg.text_len), generator=g).to(device)
    null = torch.full((1, cfg.text_len), cfg.pad_id, dtype=torch.long, device=device)  # the empty caption
    top_k = max(1, int(SAMPLE_KEEP * cfg.image_vocab))
    n = cfg.image_len
    reps = args.sample_reps
    # uncached decoding at 1024 image tokens is a minute or more per run: once is enough for a reference
    uncached_reps = min(args.uncached_reps, 1) if n > 256 else args.uncached_reps
    out: dict[str, Any] = {
        "batch": b,
        "image_tokens_per_sample": n,
        "top_k": top_k,
        "guidance_scale": SAMPLE_GUIDANCE_SCALE,
        "dtype": dtype,
        "reps": reps,
    }
    modes = {
        "cached": (model, 1.0, "cached"),
        "guided": (model, SAMPLE_GUIDANCE_SCALE, "cached"),
        "uncached": (model, 1.0, "uncached"),
        "guided_until": (model, SAMPLE_GUIDANCE_SCALE, "cached"),  # guidance for the first args.guidance_until only
    }
    until = {"guided_until": args.guidance_until}
    out["guidance_until"] = args.guidance_until
    if bf16_copy is not None:
        modes.update(cached_bf16=(bf16_copy, 1.0, "cached"), guided_bf16=(bf16_copy, SAMPLE_GUIDANCE_SCALE, "cached"))
    if args.compile:  # the torch.compile'd static decoding step (CUDA graphs on GPUs)
        modes.update(
            cached_compiled=(model, 1.0, "compiled"), guided_compiled=(model, SAMPLE_GUIDANCE_SCALE, "compiled")
        )

    reset_memory(device)
    for mode, (m, scale, decode) in modes.items():
        if decode != "uncached":
            log(f"sample {name}: warm-up {mode}")
            dt, _ = sample_once(m, text, null, scale, top_k, decode, SEED, device, until.get(mode, 1.0))
            if decode == "compiled":  # the first run compiles (and captures the graphs): its own number
                out[f"{mode}_first_run_s"] = round(dt, 2)
    times: dict[str, list[float]] = {k: [] for k in modes}
    ids: dict[str, torch.Tensor] = {}
    # interleaved repetitions, so that a noisy neighbour hits every mode alike
    for r in range(reps):
        for mode, (m, scale, decode) in modes.items():
            if mode == "uncached" and r >= uncached_reps:
                continue
            log(f"sample {name}: {mode} rep {r + 1}")
            dt, got = sample_once(m, text, null, scale, top_k, decode, SEED + r, device, until.get(mode, 1.0))
            times[mode].append(dt)
            ids[f"{mode}_{r}"] = got

    # the anchor's generate_images also decodes the ids to pixels: time our dVAE decode of the same ids
    # (the preset's tokenizer geometry, random weights) so that both walls hold the same work
    decode_s = None
    tok = vae_lib.build("dvae", **w["vae"]).to(device).eval()
    if tok.grid(w["image_size"]) == (cfg.grid_h, cfg.grid_w):
        grid_ids = ids["cached_0"].view(b, cfg.grid_h, cfg.grid_w)
        with autocast(device, dtype):
            tok.decode(grid_ids)
            decode_s = statistics.median(timed(device, lambda: tok.decode(grid_ids)) for _ in range(max(3, reps)))
        out["decode"] = {"wall_s": round(decode_s, 4), "vae": dict(w["vae"]), "image_size": w["image_size"]}
    for mode, ts in times.items():
        if not ts:
            continue
        med = statistics.median(ts)
        out[mode] = {
            "wall_s": round(med, 4),
            "wall_s_min": round(min(ts), 4),
            "image_tokens_per_s": round(b * n / med, 2),
            "runs": len(ts),
        }
        if decode_s is not None:
            out[mode]["wall_s_with_decode"] = round(med + decode_s, 4)
    if times["uncached"]:
        out["cache_speedup"] = round(out["uncached"]["wall_s"] / out["cached"]["wall_s"], 3)
        # the cache must not change a token: a free correctness check on the very runs that were timed
        out["cached_equals_uncached"] = bool(torch.equal(ids["cached_0"], ids["uncached_0"]))
    out["guidance_cost"] = round(out["guided"]["wall_s"] / out["cached"]["wall_s"], 3)
    out["guidance_until_cost"] = round(out["guided_until"]["wall_s"] / out["cached"]["wall_s"], 3)
    if args.compile:
        out["compiled_speedup"] = round(out["cached"]["wall_s"] / out["cached_compiled"]["wall_s"], 3)
        out["guided_compiled_speedup"] = round(out["guided"]["wall_s"] / out["guided_compiled"]["wall_s"], 3)
        # the same seeds give the same tokens, compiled or not (up to float reassociation on a GPU)
        out["compiled_equals_cached"] = bool(torch.equal(ids["cached_0"], ids["cached_compiled_0"]))
    if bf16_copy is not None:
        out["bf16_speedup"] = round(out["cached"]["wall_s"] / out["cached_bf16"]["wall_s"], 3)
        out["guidance_cost_bf16"] = round(out["guided_bf16"]["wall_s"] / out["cached_bf16"]["wall_s"], 3)
    out.update(peak_memory(device))

    for gb in w.get("guided_batches", []) if device.type == "cuda" else []:
        gtext = torch.randint(1, cfg.text_vocab, (gb, cfg.text_len), generator=g).to(device)
        for decode in ("cached", "compiled") if args.compile else ("cached",):
            key = f"guided_batch{gb}" + ("_compiled" if decode == "compiled" else "")
            log(f"sample {name}: guided batch {gb}, {decode}")
            if decode == "compiled":  # compile for this batch size first, untimed
                sample_once(model, gtext, null, SAMPLE_GUIDANCE_SCALE, top_k, decode, SEED, device)
            reset_memory(device)
            dt, _ = sample_once(model, gtext, null, SAMPLE_GUIDANCE_SCALE, top_k, decode, SEED, device)
            out[key] = {"wall_s": round(dt, 3), "image_tokens_per_s": round(gb * n / dt, 2), **peak_memory(device)}
    return out


# Prompts of the decoding comparison on trained bundles (`--decode-models`), by the bundle's preset name (a run
# folder of configs/emoji.toml is "emoji" too): the README's for shapes, and held-out name-style cells of
# emoji-styles' test split for emoji; any other bundle gets the shapes ones.
DECODE_PROMPTS = {
    "shapes": [
        "a large red circle in the center",
        "a small blue square in the top left corner",
        "a green triangle at the bottom",
        "a yellow circle to the left of a purple square",
    ],
    "emoji": [
        "pizza, openmoji style",
        "grinning face, noto style",
        "red apple, twemoji style",
        "rocket, fluentui style",
    ],
}


def decode_once(
    model,
    texts,
    null,
    s,
    b: int,
    mode: str,
    seed: int,
    device,
    draft: str = "above",
    redraft: str = "coupled",
    relax: float = 0.0,
    neighbours: torch.Tensor | None = None,
) -> tuple[float, int, int]:
    """Wall seconds, summed sequential passes and the window of sampling b candidates for each prompt's text
    ids (1, t); speculative decoding's test relaxed by `relax` over `neighbours` (`generate`)."""
    passes, window = 0, 1

    def work() -> None:
        nonlocal passes, window
        for i, text in enumerate(texts):
            stats: dict[str, int] = {}
            generate(
                model, text.expand(b, -1), null_text=null, guidance_scale=s.guidance_scale,
                guidance_until=s.guidance_until, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                generator=torch.Generator().manual_seed(seed + i), decode=mode, draft=draft, redraft=redraft,
                relax=relax, neighbours=neighbours, stats=stats,
            )  # fmt: skip
            passes, window = passes + stats["passes"], stats["window"]

    return timed(device, work), passes, window


def _one_pass(model, x: torch.Tensor, start: int, masks: list, cache: list) -> torch.Tensor:
    return model.image_logits(model.transform(x, start, masks, cache))


def pass_costs(model, device: torch.device, reps: int = 20) -> dict[str, float]:
    """Milliseconds (median of `reps`) of one cached forward pass over rows x window positions at mid-image,
    logits included: where a pass stops being bound by its fixed cost, which sets speculative decoding's
    window budget (`generate.WINDOW_TOKENS_CPU` / `_GPU`)."""
    c = model.cfg
    at = max(0, min(c.image_len // 2, c.image_len - 17))  # the first fed cell: mid-image, if 16 cells fit after it
    out: dict[str, float] = {}
    with torch.inference_mode():
        for rows in (1, 8, 32):
            text = torch.full((rows, c.text_len), c.pad_id, dtype=torch.long, device=device)
            masks, cache = model.attn_masks(text), model.new_cache(rows)
            model.transform(model.embed(text, torch.zeros(rows, at, dtype=torch.long, device=device)), 0, masks, cache)
            for width in (w for w in (1, 4, 16) if at + w <= c.image_len - 1):  # fed cells end by n - 2
                x = model.embed_image(torch.zeros(rows, width, dtype=torch.long, device=device), at)
                step = functools.partial(_one_pass, model, x, c.prefix_len + at, masks, cache)
                step()
                ms = 1e3 * statistics.median(timed(device, step) for _ in range(reps))
                out[f"rows{rows}_window{width}"] = round(ms, 3)
    return out


def decode_bundle(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Plain cached against speculative decoding on one trained bundle, with its own sampling settings.

    Per weight dtype (fp32; bf16 on the CPU too, as `--dtype bf16` casts them) and batch (one candidate, and
    the bundle's candidates: the default command's batch): wall seconds for the prompts, image tokens/s,
    `passes` (sequential forward passes per batch, prefill included: what one image waits for), the window
    and `speedup` = cached wall over speculative wall in the same run; runs interleaved, medians of
    `--sample-reps`. Trained weights matter here: how many drafts are accepted depends on how sure the model
    is, which random weights are not. Also per dtype the cost of one pass by rows x window (`pass_costs`),
    and at one candidate the passes with random drafts instead of the row above (`passes_random_drafts`) and
    with the Jacobi step's redrafts drawn afresh instead of coupled (`passes_independent_redraft`); with
    `--relax` above 0, also at one candidate the relaxed test (LANTERN) over the bundle's
    `sample.speculative_neighbours` (`relaxed`, its `relaxed_speedup` over cached; not the same
    distribution: within that total variation per token, `generate`). At
    the candidates, a bundle that guides is timed unguided too (`unguided`, plain cached decoding):
    `guidance_cost` = the median over the repetitions of its cached wall over that, the cost of guidance as
    the default command pays it (one prompt's candidates, the bundle's guidance_until).
    """
    from ..pipeline.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(name, device=device.type)
    s = pipe.cfg.sample
    prompt_set = pipe.cfg.name if pipe.cfg.name in DECODE_PROMPTS else "shapes"
    prompts = DECODE_PROMPTS[prompt_set]
    texts = [pipe.encode_prompt(p) for p in prompts]
    null = pipe.text_tokenizer.null_ids()[None].to(device)
    dtypes = ["fp32", "bf16"] if device.type == "cpu" else [args.dtype]
    models = {d: copy.deepcopy(pipe.transformer).to(DTYPES[d]) for d in dtypes}
    n = pipe.transformer.cfg.image_len
    out: dict[str, Any] = {
        "image_tokens_per_sample": n,
        "guidance_scale": s.guidance_scale,
        "guidance_until": s.guidance_until,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "prompts": len(prompts),
        "prompt_set": prompt_set,
    }
    batches = sorted({1, s.candidates, *args.decode_batches})
    runs = [(d, b, mode) for d in dtypes for b in batches for mode in ("cached", "speculative")]
    neighbours = None
    if args.relax > 0:  # where a window is wide: one candidate
        runs += [(d, 1, "relaxed") for d in dtypes]
        neighbours = pipe.nearest_codes(s.speculative_neighbours)
    if s.guidance_scale != 1.0:  # the default command's batch unguided: what its guidance costs
        runs += [(d, s.candidates, "unguided") for d in dtypes]
    unguided = dataclasses.replace(s, guidance_scale=1.0)

    def once(d: str, b: int, mode: str, seed: int) -> tuple[float, int, int]:
        if mode == "unguided":
            return decode_once(models[d], texts, null, unguided, b, "cached", seed, device)
        if mode == "relaxed":
            relaxed = dict(relax=args.relax, neighbours=neighbours)
            return decode_once(models[d], texts, null, s, b, "speculative", seed, device, **relaxed)
        return decode_once(models[d], texts, null, s, b, mode, seed, device)

    for d, b, mode in runs:  # warm-up: the first pass of each shape pays one-off kernel selection
        log(f"decode {name}: warm-up {d} batch {b} {mode}")
        once(d, b, mode, SEED)
    times: dict[tuple, list[float]] = {run: [] for run in runs}
    passes: dict[tuple, int] = {}
    windows: dict[tuple, int] = {}
    for r in range(args.sample_reps):  # interleaved, so that a noisy neighbour hits every run alike
        for d, b, mode in runs:
            log(f"decode {name}: {d} batch {b} {mode} rep {r + 1}")
            run, seed = (d, b, mode), SEED + 100 * (r + 1)
            dt, passes[run], windows[run] = once(d, b, mode, seed)
            times[run].append(dt)
    for d, b, mode in runs:
        med = statistics.median(times[(d, b, mode)])
        out.setdefault(f"{d}_batch{b}", {})[mode] = {
            "wall_s": round(med, 4),
            "image_tokens_per_s": round(len(prompts) * b * n / med, 1),
            "passes": round(passes[(d, b, mode)] / len(prompts), 1),
            "window": windows[(d, b, mode)],
        }
    for pair in out.values():
        if isinstance(pair, dict):
            pair["speedup"] = round(pair["cached"]["wall_s"] / pair["speculative"]["wall_s"], 3)
            if "relaxed" in pair:
                pair["relaxed"]["relax"] = args.relax
                pair["relaxed_speedup"] = round(pair["cached"]["wall_s"] / pair["relaxed"]["wall_s"], 3)
    for d, b, mode in runs:  # the bundle's guidance against none, plain decoding: the median of the
        if mode == "unguided":  # interleaved repetitions' ratios, which a slow stretch hits alike
            ratios = [g / u for g, u in zip(times[(d, b, "cached")], times[(d, b, mode)])]
            out[f"{d}_batch{b}"]["guidance_cost"] = round(statistics.median(ratios), 3)
    for d in dtypes:
        log(f"decode {name}: {d} pass costs")
        out[f"{d}_pass_ms"] = pass_costs(models[d], device)
        if out[f"{d}_batch1"]["speculative"]["window"] > 1:
            spec = out[f"{d}_batch1"]["speculative"]
            for key, draft, redraft in (
                ("random_drafts", "random", "coupled"),
                ("independent_redraft", "above", "independent"),
            ):
                _, p, _ = decode_once(models[d], texts, null, s, 1, "speculative", SEED + 100, device, draft, redraft)
                spec[f"passes_{key}"] = round(p / len(texts), 1)
    return out


def vae_params(kwargs: dict[str, Any]) -> int:
    return sum(p.numel() for p in vae_lib.build("dvae", **kwargs).parameters())


def param_matched_vae(target: int) -> dict[str, Any]:
    """The anchor-args dVAE with the hidden width (a multiple of 8) whose parameter count is nearest `target`."""
    base = VAE_CONFIGS["anchor-tiny-args"]
    best = min(range(16, 257, 8), key=lambda h: abs(vae_params({**base, "hidden": h}) - target))
    return {**base, "hidden": best}


def shapes_preset_vae() -> dict[str, Any]:
    """The dVAE arguments of configs/shapes.toml, read so that the benchmark follows the preset."""
    return vae_lib.model_kwargs("dvae", dataclasses.asdict(load_config("shapes").vae))


def vae_train_times(
    kwargs: dict[str, Any], b: int, steps: int, warmup: int, device: torch.device
) -> tuple[list[float], float, int]:
    """Step times of one dVAE's training (loss, backward, AdamW) on a fixed batch of random pixels."""
    torch.manual_seed(SEED)
    model = vae_lib.build("dvae", **kwargs).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    images = torch.rand(b, 3, VAE_IMAGE_SIZE, VAE_IMAGE_SIZE, generator=torch.Generator().manual_seed(SEED))
    images = images.to(device)
    # mid-anneal schedule values: the step's cost does not depend on them, only the loss does
    values = vae_lib.schedules.values_at(
        1000,
        temperature_start=1.0,
        temperature_end=1 / 16,
        temperature_steps=5000,
        kl_weight=1e-4,
        kl_warmup_steps=2000,
    )

    def step(i: int) -> torch.Tensor:
        loss, _ = model(images, i, **values)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for i in range(warmup):
        step(i)
    times, loss = [], None
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step(warmup + i)
        sync(device)
        times.append(time.perf_counter() - t0)
    final = float(loss.detach()) if loss is not None else float("nan")
    return times, final, sum(p.numel() for p in model.parameters())


def phase_vae(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    b = args.vae_batch or VAE_BATCH
    steps = args.steps or VAE_STEPS
    warmup = VAE_WARMUP if args.warmup is None else args.warmup
    anchor_params = read_figures(args.figures)["tiny_vae_params"]
    out: dict[str, Any] = {
        "image_size": VAE_IMAGE_SIZE,
        "batch": b,
        "warmup_steps": warmup,
        "optimizer": "AdamW",
        "anchor_tiny_params": anchor_params,
    }
    configs = dict(VAE_CONFIGS)
    configs["shapes"] = shapes_preset_vae()
    configs["param-matched"] = param_matched_vae(anchor_params)
    for name, kwargs in configs.items():
        log(f"vae {name}: batch {b}, {steps} steps after {warmup} warm-up")
        reset_memory(device)
        times, loss, params = vae_train_times(kwargs, b, steps, warmup, device)
        out[name] = {
            **dict(kwargs),
            "params": params,
            "params_vs_anchor_tiny": round(params / anchor_params, 3),
            **step_stats(times, b, "images"),
            "final_loss": round(loss, 5),
            **peak_memory(device),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def phase_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of the whole `python -m sample` command (shipped model, 16 candidates reranked to 4) against
    a bare `python -c "import torch"`, interleaved `--cli-reps` times; medians and their difference."""
    import tempfile

    bare = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {"import_torch_s": [], "sample_command_s": []}
    with tempfile.TemporaryDirectory() as out:
        sample = [sys.executable, "-m", "sample", "a red circle", "--candidates", "16", "--num-images", "4"]
        sample += ["--out", out]
        for _ in range(args.cli_reps):
            for key, cmd in (("import_torch_s", bare), ("sample_command_s", sample)):
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode != 0:
                    raise UserError(f"'{' '.join(cmd[1:3])}' failed: {proc.stderr.strip().splitlines()[-1]}")
                times[key].append(time.perf_counter() - t0)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return {**med, "extra_s": round(med["sample_command_s"] - med["import_torch_s"], 3), "reps": args.cli_reps}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m dalle_mini_impl.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--preset", nargs="+", default=None, help="transformer presets (default: the CPU ones, + dalle256 on GPU)"
    )
    ap.add_argument("--only", choices=PHASES, default=None, help="one phase, in this process")
    ap.add_argument("--cli-reps", type=int, default=3, help="cli phase: interleaved runs of each command")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (train and vae; default per preset)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default per preset)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on CPU, as the anchor)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="bf16 adds autocast runs (default: fp32 on CPU, bf16 on GPU)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="transformer config override for every preset",
    )
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--sample-batch", type=int, default=None)
    ap.add_argument("--sample-reps", type=int, default=3, help="timed repetitions of cached and guided sampling")
    ap.add_argument(
        "--guidance-until", type=float, default=0.5, help="guided_until: the guided fraction of the image (default 0.5)"
    )
    ap.add_argument(
        "--uncached-reps", type=int, default=1, help="timed repetitions of uncached sampling (0: not timed)"
    )
    ap.add_argument(
        "--decode-models",
        nargs="*",
        default=["shapes", "emoji"],
        help="sample phase: trained bundles whose cached and speculative decoding are compared (none: skip)",
    )
    ap.add_argument(
        "--decode-batches",
        nargs="*",
        type=int,
        default=[],
        help="decode: candidates per prompt timed besides one and the bundle's own (speculative decoding's window "
        "narrows with the batch; it must never be slower than plain decoding)",
    )
    ap.add_argument(
        "--relax",
        type=float,
        default=0.0,
        help="decode: also speculative decoding with its test relaxed by this mass at one candidate (0: not run)",
    )
    ap.add_argument("--figures", default=None, help="vae phase: the anchor figures file (default: bench/anchor.json)")
    ap.add_argument("--vae-batch", type=int, default=None)
    ap.add_argument("--no-encode", action="store_true", help="skip the training run with a dVAE encode per step")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time training through torch.compile, and sampling with the compiled decoding step",
    )
    ap.add_argument("--matmul-n", type=int, default=None, help="side of the peak matmul (default 2048 CPU, 8192 GPU)")
    ap.add_argument("--matmul-reps", type=int, default=8)
    ap.add_argument(
        "--peak-json", default=None, help='use this peak instead of measuring it: the JSON of a run\'s "peak"'
    )
    return ap


def run_phase(phase: str, args: argparse.Namespace, device: torch.device, presets: list[str]) -> dict[str, Any]:
    """One phase in this process, for every preset; the result dict in the final JSON's layout."""
    res: dict[str, Any] = {}
    if phase == "peak":
        res["peak"] = phase_peak(args, device)
        return res
    if phase == "vae":
        res["vae"] = phase_vae(args, device)
        return res
    if phase == "cli":
        res["cli"] = phase_cli(args)
        return res
    peak = json.loads(args.peak_json) if args.peak_json else None
    if phase == "train" and peak is None:
        # MFU's denominator, measured in this process just before training: on a shared machine the
        # neighbours' load changes from minute to minute, and a peak from another time would skew it
        peak = phase_peak(args, device)
    res["presets"] = {}
    for name in presets:
        model = DALLE(build_config(name, args.overrides))
        entry = {"config": model_summary(model)}
        del model
        if phase == "train":
            entry["train"] = {"peak": peak, **phase_train(name, args, device, peak)}
        else:
            entry["sample"] = phase_sample(name, args, device)
        res["presets"][name] = entry
    if phase == "sample" and args.decode_models:
        res["decode"] = {name: decode_bundle(name, args, device) for name in args.decode_models}
    return res


def merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def run_children(args: argparse.Namespace, presets: list[str], result: dict[str, Any]) -> None:
    """Each (phase, preset) in a child process: per-phase peak RSS, and no state shared between them."""
    passthrough = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    for flag, value in (
        ("--steps", args.steps),
        ("--warmup", args.warmup),
        ("--train-batch", args.train_batch),
        ("--sample-batch", args.sample_batch),
        ("--vae-batch", args.vae_batch),
        ("--matmul-n", args.matmul_n),
        ("--figures", args.figures),
    ):
        if value is not None:
            passthrough += [flag, str(value)]
    passthrough += ["--sample-reps", str(args.sample_reps), "--uncached-reps", str(args.uncached_reps)]
    passthrough += ["--guidance-until", str(args.guidance_until)]
    passthrough += ["--relax", str(args.relax), "--decode-batches", *map(str, args.decode_batches)]
    passthrough += ["--matmul-reps", str(args.matmul_reps), "--cli-reps", str(args.cli_reps)]
    if args.peak_json:
        passthrough += ["--peak-json", args.peak_json]
    passthrough += [x for item in args.overrides for x in ("--set", item)]
    passthrough += [flag for flag, on in (("--no-encode", args.no_encode), ("--compile", args.compile)) if on]
    jobs: list[tuple[str, list[str]]] = [("peak", [])]
    jobs += [("train", [p]) for p in presets] + [("sample", [p]) for p in presets] + [("vae", []), ("cli", [])]
    for phase, ps in jobs:
        cmd = [sys.executable, "-m", "dalle_mini_impl.bench", "--only", phase, *passthrough]
        if ps:
            cmd += ["--preset", *ps]
        if phase == "sample":  # the bundles' decoding comparison once, beside the first preset's sampling
            cmd += ["--decode-models", *(args.decode_models if ps == [presets[0]] else [])]
        label = f"{phase} {' '.join(ps)}".strip()
        log(f"child: {label}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0 or not lines:
            result.setdefault("errors", {})[label] = f"exit {proc.returncode}"
            continue
        part = json.loads(lines[-1])
        part.pop("meta", None)
        merge(result, part)
        log(f"child: {label} done in {time.perf_counter() - t0:.1f} s")


# the counts that must be 1 or more when given, and what each counts (0 once fell back to a default in silence, or
# to a traceback: a median of no timings)
AT_LEAST_ONE = {
    "steps": "timed training step",
    "threads": "torch thread",
    "train_batch": "row in a training batch",
    "sample_batch": "row in a sampling batch",
    "vae_batch": "image in a VAE batch",
    "cli_reps": "timed run of each command",
    "sample_reps": "timed repetition of sampling",
    "matmul_n": "row of the peak matmul",
    "matmul_reps": "repetition of the peak matmul",
}


def check_args(args: argparse.Namespace) -> None:
    """One sentence for an option no run can take, before anything runs."""
    for key, what in AT_LEAST_ONE.items():
        value = getattr(args, key)
        if value is not None and value < 1:
            option = "--" + key.replace("_", "-")
            default = " (leave it out for the default)" if key in ("steps", "threads") else ""
            raise UserError(f"{option} is {value}; give at least one {what}{default}")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup is {args.warmup}; give 0 or more untimed steps")
    if args.uncached_reps < 0:
        raise UserError(f"--uncached-reps is {args.uncached_reps}; give 0 (not timed) or more repetitions")
    if not 0 <= args.guidance_until <= 1:
        raise UserError(f"--guidance-until is {args.guidance_until}; give the guided fraction of the image, 0 to 1")
    if not 0 <= args.relax < 1:
        raise UserError(f"--relax is {args.relax}; give a mass from 0 (off) to below 1")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device '{args.device}' is not a device torch knows; use cpu or cuda") from None


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run the benchmark, return the result (what `main` prints)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_args(args)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no GPU; run with --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.threads is None and device.type == "cpu":
        args.threads = 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if any(b < 1 for b in args.decode_batches):
        raise UserError(
            f"--decode-batches {' '.join(map(str, args.decode_batches))}: each must be 1 or more candidates"
        )
    presets = args.preset or (CPU_PRESETS + (GPU_PRESETS if device.type == "cuda" else []))
    for p in presets:
        if p not in PRESETS:
            raise UserError(f"preset '{p}' is unknown; use one of: {', '.join(PRESETS)}")
        build_config(p, args.overrides)  # a bad --set stops here, before any phase runs

    result: dict[str, Any] = {"meta": meta(args, device)}
    if args.only:
        merge(result, run_phase(args.only, args, device, presets))
    else:
        run_children(args, presets, result)
    result["total_wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(argv)), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
