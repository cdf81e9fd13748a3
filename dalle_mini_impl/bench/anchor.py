"""Run the anchor's benchmark (dalle-pytorch 1.6.6) and ours side by side, and print the ratios.

    python -m dalle_mini_impl.bench.anchor --anchor-python VENV/bin/python --anchor-bench BENCH.py
    python -m dalle_mini_impl.bench.anchor ... --configs tiny --rounds 3 --out runs/compare.json --log runs/compare.log
    python -m dalle_mini_impl.bench.anchor ... --threads 1              # both sides single-threaded

The anchor runs in its own virtual environment (`--anchor-python`; docs/RESULTS.md gives an install that
works beside a CPU torch) through its own timing script (`--anchor-bench`), which prints one JSON line per
run. Each phase of each configuration runs as anchor, ours, anchor, ours, ... (`--rounds` of each), every
run a fresh process at the same thread count, so that a noisy neighbour on a shared machine hits both
sides alike; each side's numbers are the median over its rounds, and the ratios are ratios of those
medians (each round's paired ratio is listed too). The targets each ratio is checked against, and the
anchor figures the GPU check uses, are read from `--figures` (default: anchor.json beside this file).

Configurations and what is compared (anchor key -> ours, in `python -m dalle_mini_impl.bench` output):
  tiny -> preset anchor-tiny, medium -> preset anchor-medium (same width, depth, heads x head size, text
  length and vocabulary, codebook size, 64 image tokens, batch 16 training, 8 prompts sampling).
  sampling speed-up   sample_generate_nocache_wall_s (generate_images, ids + dVAE decode) / our cached
                      `generate` wall + our dVAE decode of its ids. Reported twice: fp32 weights
                      (`sampling_speedup`) and a bf16 copy of the weights (`sampling_speedup_bf16`,
                      `python -m sample --dtype bf16`); the decode stays fp32.
  guidance cost       ours only: guided (scale 3) / unguided cached wall, median of per-run ratios.
  training            our fp32 tokens/s on pre-encoded ids / dalle_train_tokens_per_s_median_step (which
                      re-encodes pixels every step; our number with an encode per step is listed too).
  dVAE training       our images/s for the dVAE whose parameter count is nearest the anchor's /
                      vae_train_images_per_s_median_step, both at 32 px batch 32 (tiny only).
                      Listed beside it: the anchor's constructor arguments translated, and the shapes preset.
The last line of stdout is one JSON object; progress goes to stderr.

On a CPU shared with other jobs (load above the core count) pass --threads 1: with 2 threads every
parallel region waits for whichever thread the scheduler has parked, so both sides would time the
scheduler rather than the code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserError, run_cli
from ..files import check_out_file, read_json_object

REPO = Path(__file__).resolve().parents[2]
FIGURES = Path(__file__).resolve().parent / "anchor.json"

PRESET = {"tiny": "anchor-tiny", "medium": "anchor-medium"}
# (the anchor's phase, ours); the dVAE comparison is made at the tiny configuration only
PHASES = [("vae", "vae"), ("dalle", "train"), ("sample", "sample")]

# the anchor's raw keys that are read, per phase
ANCHOR_KEYS = {
    "vae": ["vae_train_images_per_s_median_step", "vae_train_images_per_s", "vae_params", "vae_peak_rss_mb"],
    "dalle": [
        "dalle_train_tokens_per_s_median_step",
        "dalle_train_tokens_per_s",
        "dalle_params_trainable",
        "dalle_peak_rss_mb",
    ],
    "sample": [
        "sample_generate_nocache_wall_s",
        "sample_generate_use_cache_wall_s",
        "sample_manual_kvcache_wall_s",
        "sample_generate_nocache_image_tokens_per_s",
        "sample_peak_rss_mb",
    ],
}


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def dig(d: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def ours_keys(phase: str, preset: str) -> dict[str, str]:
    """Short name -> dotted path into our bench JSON, per phase."""
    p = f"presets.{preset}"
    if phase == "train":
        return {
            "train_tokens_per_s": f"{p}.train.fp32.tokens_per_s",
            "train_tokens_per_s_total": f"{p}.train.fp32.tokens_per_s_total",
            "train_tokens_per_s_with_encode": f"{p}.train.fp32_with_encode.tokens_per_s",
            "train_mfu": f"{p}.train.fp32.mfu",
            "train_peak_fp32_flops": f"{p}.train.peak.fp32_flops",
            "train_peak_mem_mb": f"{p}.train.fp32.peak_mem_mb",
            "params_non_embedding": f"{p}.config.params_non_embedding",
            "params": f"{p}.config.params",
        }
    if phase == "sample":
        return {
            "sample_cached_wall_s": f"{p}.sample.cached.wall_s",
            "sample_cached_wall_s_with_decode": f"{p}.sample.cached.wall_s_with_decode",
            "sample_guided_wall_s": f"{p}.sample.guided.wall_s",
            "sample_cached_bf16_wall_s_with_decode": f"{p}.sample.cached_bf16.wall_s_with_decode",
            "sample_guidance_cost_bf16": f"{p}.sample.guidance_cost_bf16",
            "sample_uncached_wall_s": f"{p}.sample.uncached.wall_s",
            "sample_decode_wall_s": f"{p}.sample.decode.wall_s",
            "sample_guidance_cost": f"{p}.sample.guidance_cost",
            "sample_cache_speedup": f"{p}.sample.cache_speedup",
            "sample_cached_equals_uncached": f"{p}.sample.cached_equals_uncached",
            "sample_peak_mem_mb": f"{p}.sample.peak_mem_mb",
        }
    return {
        "vae_images_per_s": "vae.param-matched.images_per_s",
        "vae_images_per_s_total": "vae.param-matched.images_per_s_total",
        "vae_params": "vae.param-matched.params",
        "vae_hidden": "vae.param-matched.hidden",
        "vae_peak_mem_mb": "vae.param-matched.peak_mem_mb",
        "vae_anchor_args_images_per_s": "vae.anchor-tiny-args.images_per_s",
        "vae_anchor_args_params": "vae.anchor-tiny-args.params",
        "vae_shapes_images_per_s": "vae.shapes.images_per_s",
        "vae_shapes_params": "vae.shapes.params",
    }


def run_json(cmd: list[str], cwd: Path, log_file, timeout: float) -> tuple[dict[str, Any] | None, float]:
    """Run a command, return the JSON on its last stdout line (None on failure) and its wall seconds."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout:.0f} s: {' '.join(cmd)}")
        return None, time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if log_file is not None:
        log_file.write(f"$ {' '.join(cmd)}\n{proc.stderr}\n{proc.stdout}\n")
        log_file.flush()
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        log(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        return None, wall
    try:
        return json.loads(lines[-1]), wall
    except json.JSONDecodeError:
        log(f"no JSON on the last line of: {' '.join(cmd)}")
        return None, wall


def summarise(values: list[Any]) -> dict[str, Any]:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict[str, Any] = {"runs": values}
    if nums:
        out["median"] = statistics.median(nums)
    elif values and all(isinstance(v, bool) for v in values):
        out["all"] = all(values)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def read_figures(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The anchor's figures and the targets (`--figures`, default anchor.json beside this file)."""
    path = path if path is not None else FIGURES
    figures = read_json_object(
        path, "figures file", "fix it or pass another --figures", f"pass --figures with a JSON file like {FIGURES}"
    )
    missing = [k for k in ("tiny_vae_params", "h200_dalle256", "cpu_targets", "gpu_targets") if k not in figures]
    if missing:
        raise UserError(f"figures file '{path}' has no '{missing[0]}'; compare it with {FIGURES}")
    return figures


def target_entry(value: float | None, op: str, bound: float) -> dict[str, Any]:
    """One target as reported: {"value", "target": "op bound", "met"}; an unmeasured value is not met."""
    met = value is not None and (value >= bound if op == ">=" else value <= bound)
    return {"value": value, "target": f"{op} {bound}", "met": met}


def compute_ratios(anchor: dict[str, Any], ours: dict[str, Any], targets: dict[str, list]) -> dict[str, Any]:
    """Ratios of the medians, each round's paired ratio beside them, and `targets` (name -> [op, bound]) checked."""

    def med(side: dict[str, Any], key: str) -> float | None:
        return side.get(key, {}).get("median")

    def paired(a_key: str, o_key: str, ours_over_anchor: bool) -> list[float | None]:
        a_runs = anchor.get(a_key, {}).get("runs", [])
        o_runs = ours.get(o_key, {}).get("runs", [])
        pairs = zip(a_runs, o_runs)
        return [ratio(o, a) if ours_over_anchor else ratio(a, o) for a, o in pairs]

    r: dict[str, Any] = {}
    if "sample_generate_nocache_wall_s" in anchor:
        a_wall = med(anchor, "sample_generate_nocache_wall_s")
        r["sampling_speedup"] = ratio(a_wall, med(ours, "sample_cached_wall_s_with_decode"))
        r["sampling_speedup_rounds"] = paired(
            "sample_generate_nocache_wall_s", "sample_cached_wall_s_with_decode", False
        )
        r["sampling_speedup_ids_only"] = ratio(a_wall, med(ours, "sample_cached_wall_s"))
        r["sampling_speedup_bf16"] = ratio(a_wall, med(ours, "sample_cached_bf16_wall_s_with_decode"))
        r["sampling_speedup_bf16_rounds"] = paired(
            "sample_generate_nocache_wall_s", "sample_cached_bf16_wall_s_with_decode", False
        )
        r["sampling_speedup_vs_anchor_manual_kvcache"] = ratio(
            med(anchor, "sample_manual_kvcache_wall_s"), med(ours, "sample_cached_wall_s_with_decode")
        )
        r["guidance_cost"] = med(ours, "sample_guidance_cost")
        r["guidance_cost_bf16"] = med(ours, "sample_guidance_cost_bf16")
    if "dalle_train_tokens_per_s_median_step" in anchor:
        a_tps = med(anchor, "dalle_train_tokens_per_s_median_step")
        r["train_tokens_per_s"] = ratio(med(ours, "train_tokens_per_s"), a_tps)
        r["train_tokens_per_s_rounds"] = paired("dalle_train_tokens_per_s_median_step", "train_tokens_per_s", True)
        r["train_tokens_per_s_with_encode"] = ratio(med(ours, "train_tokens_per_s_with_encode"), a_tps)
        r["train_tokens_per_s_total_steps"] = ratio(
            med(ours, "train_tokens_per_s_total"), med(anchor, "dalle_train_tokens_per_s")
        )
    if "vae_train_images_per_s_median_step" in anchor:
        r["vae_images_per_s"] = ratio(med(ours, "vae_images_per_s"), med(anchor, "vae_train_images_per_s_median_step"))
        r["vae_images_per_s_rounds"] = paired("vae_train_images_per_s_median_step", "vae_images_per_s", True)
        r["vae_params"] = ratio(med(ours, "vae_params"), med(anchor, "vae_params"))
        for name in ("anchor_args", "shapes"):
            a_ips = med(anchor, "vae_train_images_per_s_median_step")
            r[f"vae_{name}_images_per_s"] = ratio(med(ours, f"vae_{name}_images_per_s"), a_ips)
            r[f"vae_{name}_params"] = ratio(med(ours, f"vae_{name}_params"), med(anchor, "vae_params"))
    r["targets"] = {
        name: target_entry(r[name], op, bound) for name, (op, bound) in targets.items() if r.get(name) is not None
    }
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dalle_mini_impl.bench.anchor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--anchor-python", required=True, help="the python of the anchor's own virtual environment")
    ap.add_argument("--anchor-bench", required=True, help="the anchor's timing script (prints one JSON line)")
    ap.add_argument("--figures", default=None, help="targets and anchor figures (default: bench/anchor.json)")
    ap.add_argument("--configs", nargs="+", choices=sorted(PRESET), default=["tiny", "medium"])
    ap.add_argument("--phases", nargs="+", choices=[a for a, _ in PHASES], default=[a for a, _ in PHASES])
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, interleaved (2 or more: medians)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides (the anchor's default is 2)")
    ap.add_argument(
        "--uncached-reps", type=int, default=1, help="our uncached reference runs per sample run (slow, not a target)"
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before one run is given up")
    ap.add_argument("--out", default=None, help="also write the JSON here (rewritten after every run)")
    ap.add_argument("--log", default=None, help="append every run's command, stderr and stdout here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise UserError(f"--rounds is {args.rounds}; run each side at least once")
    if args.threads < 1:
        raise UserError(f"--threads is {args.threads}; give both sides at least 1 thread")
    if not args.timeout > 0:
        raise UserError(f"--timeout is {args.timeout}; give each run a positive number of seconds, such as 1800")
    planned = [(cfg, phase) for cfg in args.configs for phase in args.phases if phase != "vae" or cfg == "tiny"]
    if not planned:
        raise UserError("--configs and --phases leave no run (the vae phase is tiny's alone); add tiny or a phase")
    python = Path(args.anchor_python)
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UserError(
            f"--anchor-python '{python}' is no program (missing, a folder, or not executable); install the anchor's "
            "virtual environment (docs/RESULTS.md) and pass its bin/python"
        )
    if not Path(args.anchor_bench).is_file():
        raise UserError(f"--anchor-bench '{args.anchor_bench}' is no file; pass the anchor's timing script")
    check_out_file(args.out, "--out", "anchor.json")  # before an hour of runs, not after the first
    check_out_file(args.log, "--log", "anchor.log")
    targets = read_figures(args.figures)["cpu_targets"]

    t_start = time.perf_counter()
    ours_cmd = [sys.executable, "-m", "dalle_mini_impl.bench", "--threads", str(args.threads)]
    anchor_cmd = [args.anchor_python, str(Path(args.anchor_bench).resolve()), "--threads", str(args.threads)]
    result: dict[str, Any] = {
        "meta": {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "threads": args.threads,
            "rounds": args.rounds,
            "order": "per round, per config, per phase: anchor then ours",
            "anchor_python": args.anchor_python,
            "anchor_bench": str(args.anchor_bench),
            "ours_commit": git_commit(),
            "loadavg_start": loadavg(),
        },
        "anchor_keys_used": ANCHOR_KEYS,
        "configs": {},
    }
    log_file = open(args.log, "a") if args.log else None  # noqa: SIM115

    def flush() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out + ".tmp"
            Path(tmp).write_text(json.dumps(result, indent=1))
            os.replace(tmp, args.out)

    # the peak matmul FLOP/s at the start, for the record (each training run measures its own for its MFU)
    log("ours: peak matmul")
    peak_json, _ = run_json([*ours_cmd, "--only", "peak"], REPO, log_file, args.timeout)
    peak = (peak_json or {}).get("peak")
    result["peak"] = peak
    if peak_json:
        result["meta"].update({k: peak_json["meta"].get(k) for k in ("torch", "cpu", "cpu_count", "python")})

    raw: dict[str, dict[str, dict[str, list[Any]]]] = {
        c: {"anchor": {}, "ours": {}, "anchor_wall_s": {}, "ours_wall_s": {}} for c in args.configs
    }
    for r in range(args.rounds):
        for cfg in args.configs:
            preset = PRESET[cfg]
            for a_phase, o_phase in PHASES:
                if a_phase not in args.phases or (a_phase == "vae" and cfg != "tiny"):
                    continue
                label = f"round {r + 1}/{args.rounds} {cfg} {a_phase}"
                log(f"{label}: anchor (load {loadavg()})")
                a_json, a_wall = run_json(
                    [*anchor_cmd, "--config", cfg, "--only", a_phase], REPO, log_file, args.timeout
                )
                o_cmd = [*ours_cmd, "--only", o_phase, "--preset", preset]
                if o_phase == "sample":
                    o_cmd += ["--uncached-reps", str(args.uncached_reps)]
                log(f"{label}: ours (anchor took {a_wall:.0f} s)")
                o_json, o_wall = run_json(o_cmd, REPO, log_file, args.timeout)
                log(f"{label}: done (ours took {o_wall:.0f} s)")
                side = raw[cfg]
                for key in ANCHOR_KEYS[a_phase]:
                    side["anchor"].setdefault(key, []).append(None if a_json is None else a_json.get(key))
                for key, path in ours_keys(o_phase, preset).items():
                    side["ours"].setdefault(key, []).append(None if o_json is None else dig(o_json, path))
                side["anchor_wall_s"].setdefault(a_phase, []).append(round(a_wall, 1))
                side["ours_wall_s"].setdefault(o_phase, []).append(round(o_wall, 1))
                for c in args.configs:
                    anchor = {k: summarise(v) for k, v in raw[c]["anchor"].items()}
                    ours = {k: summarise(v) for k, v in raw[c]["ours"].items()}
                    result["configs"][c] = {
                        "preset": PRESET[c],
                        "anchor": anchor,
                        "ours": ours,
                        "process_wall_s": {"anchor": raw[c]["anchor_wall_s"], "ours": raw[c]["ours_wall_s"]},
                        "ratios": compute_ratios(anchor, ours, targets.get(c, {})),
                    }
                flush()

    result["meta"]["loadavg_end"] = loadavg()
    result["meta"]["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    result["targets"] = {
        f"{c}.{name}": t for c, entry in result["configs"].items() for name, t in entry["ratios"]["targets"].items()
    }
    flush()
    if log_file is not None:
        log_file.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
