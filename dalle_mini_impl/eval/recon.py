"""How well an image tokenizer reconstructs a data set: PSNR, SSIM, codebook usage and perplexity.

    python -m dalle_mini_impl.eval recon --model RUN --data DATA/emoji-noto --split validation

Prints one JSON object. PSNR is computed from the mean squared error over the whole split (pixels in
[0, 1]), not averaged per image; SSIM is the mean over images of the Gaussian-window SSIM (Wang et al.
2004: 11x11 window, sigma 1.5, on each RGB channel); usage is the fraction of codes that occur at least
once on the split and perplexity is exp(entropy) of the split's code histogram. On shapes it also reports
`judge_accepts`, the fraction of reconstructions the shapes judge accepts under their captions. Works
on any data source, not only the one the tokenizer was trained on.

`--judge JUDGE` (emoji-styles' `NAME, STYLE style` captions; an evaluation CLIP from `python -m train.judge`, or
`emoji`, the one shipped in the package) also
grades the reconstructions of the whole split as `eval emoji` grades its `reconstructed` reference: style_acc,
name_r1, name_r5, both and CMMD to the real images, under `judged` (`reconstructed`, and `real`: the ceiling).
PSNR says how near each image is drawn back; the judge says whether what makes it that style and that name
survives, which is what a transformer over the tokenizer can at best draw.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dalle_mini_impl.config import apply_overrides, load_config
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.eval import check_counts, check_data_overrides, check_finite
from dalle_mini_impl.eval.emoji import check_judge, judge_reconstructions
from dalle_mini_impl.pipeline.bundle import FILES, bundle_path, load_clip, load_vae, read_bundle_config


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()  # (c, 1, k, k)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image (b,) of images (b, 3, H, W) in [0, 1]; the window shrinks for images under 11 px."""
    size = min(11, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size).to(x)
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def recon_metrics(
    tokenizer, batches: Iterable[dict], device: torch.device | str = "cpu", judge_captions: bool = False
) -> dict[str, float]:
    """PSNR (from the split's total MSE), mean SSIM, usage and perplexity over batches {"image": (b, 3, S, S)}.

    judge_captions: also the fraction of reconstructions the shapes judge accepts under their captions.
    """
    return recon_summary(*recon_sums(tokenizer, batches, device, judge_captions), judge_captions)


def recon_sums(
    tokenizer, batches: Iterable[dict], device: torch.device | str = "cpu", judge_captions: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `recon_summary` reads, as sums that add across processes (training evaluates each process's share):
    float64 (squared error, pixels, SSIM, images, judge accepts) and the code histogram (codebook_size,)."""
    sums = torch.zeros(5, dtype=torch.float64)
    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.long)
    for batch in batches:
        x = batch["image"].to(device).float()
        ids = tokenizer.encode(x)
        y = tokenizer.decode(ids).float()
        accepted = 0
        if judge_captions:
            from dalle_mini_impl.data.images import to_uint8
            from dalle_mini_impl.shapes.judge import judge

            accepted = sum(judge(image, caption).ok for image, caption in zip(to_uint8(y.cpu()), batch["caption"]))
        sums += torch.tensor(
            [float(((y - x) ** 2).sum()), x.numel(), float(ssim(y, x).sum()), x.shape[0], accepted],
            dtype=torch.float64,
        )
        counts += torch.bincount(ids.flatten().cpu(), minlength=tokenizer.codebook_size)
    return sums, counts


def recon_summary(sums: torch.Tensor, counts: torch.Tensor, judge_captions: bool = False) -> dict[str, float]:
    """`recon_metrics`'s numbers from `recon_sums`' (summed over processes, or one process's own)."""
    sq_err, pixels, ssim_sum, n, accepted = sums.tolist()
    if n == 0:
        raise UserError("the evaluation split gave no images; check --data and --split")
    mse = sq_err / pixels
    p = counts.double() / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    out = {
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "mse": mse,
        "ssim": ssim_sum / n,
        "usage": float((counts > 0).sum()) / len(counts),
        "codes_used": int((counts > 0).sum()),
        "perplexity": math.exp(entropy),
        "n": int(n),
    }
    if judge_captions:
        out["judge_accepts"] = accepted / n
    return out


def main(argv: list[str] | None = None) -> int:
    from dalle_mini_impl.data.streams import ExampleStream, batches

    parser = argparse.ArgumentParser(
        prog="python -m dalle_mini_impl.eval recon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a shipped bundle's name, or a run folder or bundle with vae.safetensors + vae.json",
    )
    parser.add_argument("--data", default=None, help="data source (default: the model's own)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--limit", type=int, default=0, help="evaluate at most this many images (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--judge",
        default=None,
        help="an evaluation CLIP (a folder python -m train.judge wrote, or a shipped judge's name: emoji): also "
        "grade the reconstructions as eval emoji does",
    )
    args = parser.parse_args(argv)
    check_counts(limit=(args.limit, 0), batch_size=(args.batch_size, 1))
    if args.judge and args.limit:
        raise UserError("--judge grades every image of the split, and --limit would grade fewer; drop one of them")
    judge, judge_cfg = check_judge(args.judge) if args.judge else (None, None)
    check_data_overrides(args.overrides, "recon")
    tokenizer = load_vae(args.model)
    if (bundle_path(args.model) / FILES["config"]).is_file():  # a broken one is an error, not the defaults
        cfg = read_bundle_config(args.model)
    else:  # a bare tokenizer folder: the project defaults
        cfg = load_config(None)
    apply_overrides(cfg, args.overrides)
    if args.data:
        cfg.data.source = args.data
    if cfg.data.image_size % tokenizer.factor:
        raise UserError(
            f"data.image_size is {cfg.data.image_size}, not a multiple of the image tokenizer's factor "
            f"{tokenizer.factor}; set it to one (the model's own: leave --set data.image_size out)"
        )
    if args.judge and cfg.data.image_size != judge_cfg.data.image_size:  # else judged at one size, labelled another
        raise UserError(
            f"--judge grades the split at its own image size, {judge_cfg.data.image_size} pixels, and this "
            f"evaluation reads it at {cfg.data.image_size}; drop --set data.image_size or --judge"
        )
    stream = ExampleStream(cfg.data, args.split, train=False)
    check_finite(stream, args.limit)
    known = [n for n in (args.limit, stream.length) if n]  # images read: the limit, the split's, or unknown
    bar = tqdm(total=min(known) if known else None, desc="eval recon", unit="img", disable=None)
    with logging_redirect_tqdm(), bar:  # a skipped record's warning above the bar, not glued to its line
        limited = _take(batches(stream, args.batch_size), args.limit, bar)
        result = recon_metrics(tokenizer, limited, judge_captions=cfg.data.source == "shapes")
    result.update(source=cfg.data.source, split=args.split, image_size=cfg.data.image_size, skipped=stream.n_skipped)
    result = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}
    if args.judge:
        judged = judge_reconstructions(
            tokenizer, load_clip(judge), judge_cfg, cfg.data.source, args.split, args.batch_size
        )
        result["judged"] = {**judged, "judge": str(args.judge)}
    print(json.dumps(result))
    return 0


def _take(batch_iter, limit: int, bar=None):
    """The batches, cut after `limit` images (0: all), counted on `bar`."""
    seen = 0
    for batch in batch_iter:
        if limit and seen >= limit:
            return
        if limit:
            batch = {k: v[: limit - seen] for k, v in batch.items()}
        seen += len(batch["image"])
        yield batch
        if bar is not None:  # once the batch is done with
            bar.update(len(batch["image"]))


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
