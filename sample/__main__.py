"""`python -m sample PROMPT [PROMPT ...]`: text to images, reranked by CLIP, as PNG files.

    python -m sample "a red circle" "a small blue square on the left" --num-images 4 --candidates 16
    python -m sample "a red circle:1 | a blue square:-0.5" --method clip-guided      # VQGAN+CLIP refinement
    python -m sample "a red circle" --method clip-guided --set sample.guided_steps=10   # a setting with no flag
    python -m sample "a red circle" --method clip-guided --init random --guided-prior-weight 0.3   # from noise
    python -m sample "a green triangle" --init-image half.png --keep-rows 4            # complete an image
    python -m sample "a blue square on the right" --init-image img.png --mask right.png   # redraw the white part
    python -m sample "a red circle to the left of a blue square" --init-image a.png --extend right   # outpaint
    python -m sample "a red circle" --json      # one JSON line per image: prompt, path, rank, clip_score, seed
    python -m sample "pizza, noto style" --model emoji --dtype bf16 --decode speculative --candidates 2 --num-images 2
    python -m sample "a red circle" --method unclip      # DALL-E 2: prior -> CLIP image embedding -> decoder
    python -m sample --variations circle.png --num-images 4                    # images from an image's embedding
    python -m sample --interpolate a.png b.png --steps 5                       # along the path between two
    python -m sample --variations circle.png --text-diff "a red circle" "a blue circle"   # edit by a caption diff

A thin shell over `dalle_mini_impl.pipeline.pipeline.Pipeline` (DALL-E's sample-then-rerank recipe). The model is
a bundle folder (--model; default: the shapes bundle shipped in the package); every sampling default
comes from its `sample` config section. For each prompt the best N images are written to --out
(default samples/) at the model's native resolution as SLUG_sSEED_rRANK.png, plus SLUG_sSEED_grid.png;
the slug is the prompt in ASCII (made unique within a run), the seed is the prompt's own (seed + its
index), so `python -m sample PROMPT --seed S` with a file's S gives that file again. Variations take no
prompt and are written as variation-SLUG_sSEED_rRANK.png (SLUG: the image's file name), an interpolation
as interpolate-SLUG-SLUG_sSEED_stepK_rRANK.png and _stepK_grid.png per step, plus
interpolate-SLUG-SLUG_sSEED_path.png, one grid of every step's best; they need a bundle with
unCLIP's decoder and prior (the shipped shapes bundle has them). Nothing is written anywhere else.
Progress bars and warnings go to stderr; with --json stdout holds only the JSON lines.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

from dalle_mini_impl.errors import UserError, run_cli, show_warning
from dalle_mini_impl.files import write_atomic

MAX_SLUG = 60


def slugify(prompt: str) -> str:
    """A file-name-safe ASCII slug of a prompt ('A Red Circle!' -> 'a-red-circle'); never empty."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:MAX_SLUG].rstrip("-")
    # a prompt with no ASCII letters (an emoji, Japanese) is named by a short hash of itself
    return slug or "prompt-" + hashlib.sha1(prompt.encode()).hexdigest()[:8]


def unique_slugs(prompts: Sequence[str]) -> list[str]:
    """One slug per prompt, with -2, -3 ... added where an earlier prompt already took the slug."""
    seen: set[str] = set()
    out = []
    for prompt in prompts:
        base = slug = slugify(prompt)
        n = 1
        while slug in seen:
            n += 1
            slug = f"{base}-{n}"
        seen.add(slug)
        out.append(slug)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sample", description=__doc__.split("\n")[0])
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="what to draw; any Unicode")
    p.add_argument("--model", default=None, help="a bundle folder, or a shipped bundle's name: shapes (default), emoji")
    p.add_argument("--num-images", type=int, default=None, help="images kept per prompt (default: the bundle's)")
    p.add_argument("--candidates", type=int, default=None, help="samples per prompt that CLIP ranks")
    p.add_argument(
        "--guidance-scale",
        "--cfg",
        dest="guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance scale (1: off; default: the bundle's)",
    )
    p.add_argument(
        "--guidance-until",
        type=float,
        default=None,
        help="the fraction of the drawn cells that is guided, from the first drawn (1: all; default: the bundle's)",
    )
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature, above 0 (at least 1e-6)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest codes (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first prompt; prompt i uses seed + i")
    p.add_argument("--out", default="samples", help="folder for the PNGs (default: samples/)")
    p.add_argument(
        "--method",
        choices=["ar", "clip-guided", "unclip"],
        default="ar",
        help="ar: sample and rerank; clip-guided: then refine with CLIP (prompt may be 'text:1 | other:-0.5'); "
        "unclip: DALL-E 2's prior to CLIP image embeddings and a decoder from them, then rerank",
    )
    p.add_argument(
        "--variations",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="draw new images from each image's CLIP embedding",
    )
    p.add_argument(
        "--interpolate", nargs=2, default=None, metavar=("A", "B"), help="draw images along the path from A to B"
    )
    p.add_argument("--steps", type=int, default=None, help="--interpolate: images along the path, ends included (5)")
    p.add_argument(
        "--text-diff",
        nargs=2,
        default=None,
        metavar=("FROM", "TO"),
        help="--variations: turn each image's embedding toward the difference of two captions' (FROM -> TO)",
    )
    p.add_argument(
        "--text-diff-scale", type=float, default=None, help="--text-diff: how far to turn, in [0, 1] (bundle's default)"
    )
    p.add_argument(
        "--init",
        choices=["samples", "random"],
        default="samples",
        help="clip-guided: start from the kept samples, or from random codes (VQGAN+CLIP as Pixray runs it)",
    )
    p.add_argument(
        "--guided-prior-weight",
        type=float,
        default=None,
        help="clip-guided: add this times the transformer's log-likelihood of the codes to CLIP's objective "
        "(0: CLIP alone; default: the bundle's)",
    )
    p.add_argument(
        "--guided-contrast-weight",
        type=float,
        default=None,
        help="clip-guided: pull toward what tells the prompt from its near misses (its style against the other "
        "styles; on shapes its one-word edits): the prompt's embedding minus this times theirs (0: the prompt "
        "alone; default: the bundle's)",
    )
    p.add_argument(
        "--guided-contrast-guard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip-guided: return a refined image only if CLIP's margin of the prompt over its nearest near miss "
        "(the captions of --guided-contrast-weight) is at least its start's (default: the bundle's)",
    )
    p.add_argument(
        "--guided-optimizer",
        choices=["auto", "adam", "jacobi"],
        default=None,
        help="clip-guided: adam (on the latents, as published), jacobi (the transformer's predictions tilted by "
        "CLIP; needs the prior weight above 0) or auto (jacobi from random codes, adam from samples); default: "
        "the bundle's",
    )
    p.add_argument(
        "--prior-guidance-scale",
        type=float,
        default=None,
        help="--method unclip: classifier-free guidance on the prior's embeddings (1: off; default: the bundle's)",
    )
    p.add_argument("--init-image", default=None, metavar="PNG", help="complete this image from its top rows")
    p.add_argument("--keep-rows", type=int, default=None, help="rows of --init-image's codes to keep (default: half)")
    p.add_argument(
        "--mask",
        default=None,
        metavar="PNG",
        help="redraw the white part of --init-image (a mask of its size; black is kept exactly)",
    )
    p.add_argument(
        "--extend",
        default=None,
        choices=["left", "right", "top", "bottom"],
        help="outpaint: move --init-image by half its size away from this side and draw the new half",
    )
    p.add_argument(
        "--likelihood-weight",
        type=float,
        default=None,
        help="--mask/--extend: rank by CLIP plus this times the transformer's log-likelihood of the kept cells "
        "after the redrawn ones (0: CLIP alone; default: the bundle's)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="bf16/fp16: the transformer samples from weights cast to it and the image tokenizer decodes under "
        "autocast; whether it pays on a CPU depends on its bf16 units and the model's width "
        "(python -m dalle_mini_impl.bench --only sample times both); fp16 needs a GPU",
    )
    p.add_argument(
        "--decode",
        default=None,
        choices=["cached", "static", "compiled", "speculative"],
        help="how a decoding step runs (default: the model's, cached): compiled = torch.compile'd step (CUDA "
        "graphs on GPUs; the first batch pays the compile); speculative = speculative Jacobi decoding, the same "
        "distribution in fewer, wider passes (on the CPU with --dtype bf16; fp32 decodes plainly there)",
    )
    p.add_argument(
        "--relax",
        type=float,
        default=None,
        metavar="MASS",
        help="with --decode speculative: test each draft together with its nearest codes while their probability "
        "sums to at most MASS (LANTERN's relaxed test): fewer passes, every token within that total variation of "
        "the model's distribution (default: the model's, 0: exact)",
    )
    p.add_argument("--compile", action="store_true", help="the same as --decode compiled")
    hint = "a sampling setting with no flag of its own, repeatable: --set sample.guided_steps=10 (batch_size, ...)"
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="sample.KEY=VALUE", help=hint)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per ranked image (prompt, path, rank, clip_score, seed; a variation's source, "
        "an interpolation's sources, step and t), nothing else; the grids are not listed",
    )
    return p


# the sampling settings a flag of this command sets: --set names the flag instead (two ways to say one thing)
FLAGGED = {
    "num_images": "--num-images", "candidates": "--candidates", "guidance_scale": "--guidance-scale",
    "guidance_until": "--guidance-until", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
    "seed": "--seed", "decode": "--decode", "speculative_relax": "--relax", "text_diff_scale": "--text-diff-scale",
    "guided_prior_weight": "--guided-prior-weight", "guided_contrast_weight": "--guided-contrast-weight",
    "guided_contrast_guard": "--guided-contrast-guard", "guided_optimizer": "--guided-optimizer",
    "prior_guidance_scale": "--prior-guidance-scale", "edit_likelihood_weight": "--likelihood-weight",
}  # fmt: skip


# the uses of config.SAMPLE_USES whose settings only those uses read, and the options of this command that make them
USE_OPTIONS = {
    "guided": "--method clip-guided", "unclip": "--method unclip", "variations": "--variations",
    "text_diff": "--text-diff", "edit": "--mask or --extend",
}  # fmt: skip


def set_sampling(pipe, args: argparse.Namespace) -> None:
    """--set sample.KEY=VALUE on the bundle's sampling settings: one sentence for a key a flag sets, for one this
    command would not read (a use it does not make), and for a value no sampler can use."""
    from dalle_mini_impl.config import SAMPLE_USES, apply_overrides
    from dalle_mini_impl.pipeline.pipeline import check_settings

    made = {
        "guided": args.method == "clip-guided",
        "unclip": args.method == "unclip",
        "variations": bool(args.variations),
        "text_diff": args.text_diff is not None,
        "edit": bool(args.mask or args.extend),
    }
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        name = key.removeprefix("sample.")
        if not key.startswith("sample."):
            raise UserError(f"--set {item}: only sampling settings can change here; give sample.KEY=VALUE")
        if name in FLAGGED:
            raise UserError(f"--set {item}: {FLAGGED[name]} sets {key}; use it")
        for use, (_, keys) in SAMPLE_USES.items():
            if name in keys and not made[use]:
                raise UserError(f"--set {item}: only {USE_OPTIONS[use]} reads {key}; add it or leave the setting out")
    apply_overrides(pipe.cfg, args.overrides)
    if args.overrides:
        check_settings(pipe.cfg.sample, "--set")


def check_uses(args: argparse.Namespace) -> None:
    """The options that pick what to draw agree with each other: one sentence for each way they can clash."""
    unclip_use = "--variations" if args.variations else "--interpolate" if args.interpolate else None
    if args.variations and args.interpolate:
        raise UserError("--variations and --interpolate are two different uses; give one of them")
    if unclip_use and args.prompts:
        raise UserError(f"{unclip_use} draws from images and takes no prompt; leave out {args.prompts[0]!r}")
    if unclip_use and (args.method != "ar" or args.init_image or args.init != "samples" or args.keep_rows is not None):
        raise UserError(f"{unclip_use} cannot go with --method, --init, --init-image or --keep-rows; leave them out")
    if args.text_diff is not None and not args.variations:
        raise UserError("--text-diff edits the images of --variations; give --variations IMAGE too")
    if args.text_diff_scale is not None and args.text_diff is None:
        raise UserError("--text-diff-scale sets how far --text-diff turns an image; give --text-diff FROM TO too")
    if args.steps is not None and not args.interpolate:
        raise UserError("--steps counts the images of --interpolate; give --interpolate A B too")
    edit = "--mask" if args.mask else "--extend" if args.extend else None
    if args.mask and args.extend:
        raise UserError("--mask redraws a painted part and --extend a new half; give one of them")
    if edit and not args.init_image:
        raise UserError(f"{edit} redraws part of an image; give --init-image PNG too")
    if edit and args.keep_rows is not None:
        raise UserError(f"--keep-rows keeps the top rows and {edit} the unmasked cells; give one of them")
    if edit and (args.method != "ar" or args.init != "samples"):
        raise UserError(f"{edit} samples with the transformer and ranks with CLIP; leave out --method and --init")
    if args.likelihood_weight is not None and not edit:
        raise UserError("--likelihood-weight ranks the edits of --mask or --extend; give one of them too")
    refinement = {
        "--guided-prior-weight": args.guided_prior_weight,
        "--guided-contrast-weight": args.guided_contrast_weight,
        "--guided-contrast-guard": args.guided_contrast_guard,
        "--guided-optimizer": args.guided_optimizer,
    }
    refining = [flag for flag, value in refinement.items() if value is not None]
    if refining and args.method != "clip-guided":
        raise UserError(
            f"{refining[0]} tunes the refinement of --method clip-guided; add it or leave {refining[0]} out"
        )
    if args.prior_guidance_scale is not None and args.method != "unclip":
        raise UserError("--prior-guidance-scale guides the prior of --method unclip; add it or leave the scale out")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.compile and args.decode not in (None, "compiled"):
        raise UserError(f"--compile is --decode compiled; it cannot go with --decode {args.decode}")
    decode = "compiled" if args.compile else args.decode
    check_uses(args)
    # imported after argument parsing: --help and argument errors answer without loading torch
    from dalle_mini_impl.pipeline.pipeline import Pipeline, check_prompts

    prompts = [] if args.variations or args.interpolate else check_prompts(args.prompts)
    out = Path(args.out)
    check_out(out)  # before sampling: a bad --out would otherwise fail only after all the work
    settings = dict(
        num_images=args.num_images,
        candidates=args.candidates,
        guidance_scale=args.guidance_scale,
        guidance_until=args.guidance_until,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show_warning  # one line per warning, no source line
        pipe = Pipeline.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, decode=decode, relax=args.relax
        )
        set_sampling(pipe, args)
        if args.variations:
            groups = pipe.variations(
                args.variations, text_diff=args.text_diff, text_diff_scale=args.text_diff_scale, **settings
            )
            names = [str(v) for v in args.variations]
            sources = [{"source": name} for name in names]
            stems = [f"variation-{slug}_s{kept[0].seed}" for slug, kept in zip(unique_slugs(_stems(names)), groups)]
        elif args.interpolate:
            steps = pipe.interpolate(*args.interpolate, 5 if args.steps is None else args.steps, **settings)
            slug = "-".join(unique_slugs(_stems(args.interpolate)))
            ends, seed = [str(end) for end in args.interpolate], steps[0][0].seed
            # the command's seed, which its file names carry and which draws the whole path again (step k samples
            # with seed + k), and the step
            sources = [{"sources": ends, "seed": seed, "step": k} for k in range(len(steps))]
            groups, stems = steps, [f"interpolate-{slug}_s{seed}_step{k}" for k in range(len(steps))]
        elif args.mask or args.extend:
            image, mask = args.init_image, args.mask
            if args.extend:
                from dalle_mini_impl.clip.uses import open_image
                from dalle_mini_impl.pipeline.edit import extend_canvas

                image, mask = extend_canvas(open_image(image, "--init-image"), args.extend)
            groups = pipe.edit(prompts, image, mask, likelihood_weight=args.likelihood_weight, **settings)
            sources = [{}] * len(groups)
            stems = [f"{slug}_s{kept[0].seed}" for slug, kept in zip(unique_slugs(prompts), groups)]
        else:
            groups = pipe.generate(
                prompts,
                **settings,
                guided_prior_weight=args.guided_prior_weight,
                guided_optimizer=args.guided_optimizer,
                guided_contrast_weight=args.guided_contrast_weight,
                guided_contrast_guard=args.guided_contrast_guard,
                prior_guidance_scale=args.prior_guidance_scale,
                method=args.method,
                init=args.init,
                init_image=args.init_image,
                keep_rows=args.keep_rows,
                progress=True,
            )
            sources = [{}] * len(groups)
            stems = [f"{slug}_s{kept[0].seed}" for slug, kept in zip(unique_slugs(prompts), groups)]

    written = 0
    for stem, kept, source in zip(stems, groups, sources):
        paths, grid = _save(kept, out, stem)
        written += len(paths) + 1
        if not args.json:
            named = paths[0].name if len(paths) == 1 else f"{paths[0].name} .. {paths[-1].name}"
            print(f"{kept[0].prompt!r}: {named} and {grid.name}")
            continue
        for r, path in zip(kept, paths):
            record = {"prompt": r.prompt, "path": str(path), "rank": r.rank, "clip_score": r.clip_score, "seed": r.seed}
            record |= source  # a variation's source image, an interpolation's two ends
            record |= {} if r.t is None else {"t": r.t}
            # a path holding bytes that are not UTF-8 (lone surrogates), or an output that is not UTF-8 (a Windows
            # console's code page, redirected), cannot take it as is: escaped
            print(json.dumps(record, ensure_ascii=not (_is_utf8(str(path)) and _utf8_out())), flush=True)
    if args.interpolate:  # the path at a glance: every step's best, in order
        best = [kept[0] for kept in groups]
        path_grid = _save_grid(best, out, stems[0].rsplit("_step", 1)[0] + "_path", [f"t={r.t:.2f}" for r in best])
        written += 1
        if not args.json:
            print(f"the path: {path_grid.name}")
    if not args.json:
        shown = f"{out}{os.sep}".encode("utf-8", "backslashreplace").decode()
        print(f"wrote {written} PNGs to {shown}")
    return 0


def _stems(paths: Sequence[str]) -> list[str]:
    """Image file names without folder and suffix, to name what was drawn from them."""
    return [Path(p).stem or "image" for p in paths]


def _save(kept: list, out: Path, stem: str) -> tuple[list[Path], Path]:
    try:
        return save_results(kept, out, stem)
    except OSError as e:  # no permission, a full disk
        raise UserError(
            f"cannot write the PNGs to --out '{out}' ({e.strerror or e}); pass a folder you can write to"
        ) from None


def _utf8_out() -> bool:
    try:
        return codecs.lookup(sys.stdout.encoding or "ascii").name == "utf-8"
    except LookupError:
        return False


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_out(out: Path) -> None:
    """--out names a folder, or a path where one can be made: no part of it may be a file."""
    for path in (out, *out.parents):
        try:
            exists = path.exists()
        except OSError as e:  # a folder above it that this user may not read (Python < 3.12 raises here)
            raise UserError(
                f"--out '{out}' cannot be reached ({e.strerror or e}); pass a folder you can write to"
            ) from None
        if exists:
            if not path.is_dir():
                where = "is a file" if path == out else f"lies under the file '{path}'"
                raise UserError(f"--out '{out}' {where}; pass a folder for the PNGs")
            return


def save_results(kept: list, out: Path, stem: str) -> tuple[list[Path], Path]:
    """One prompt's Results as STEM_rRANK.png each and STEM_grid.png (captioned with rank and score)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in kept:
        # renamed into place: a killed run leaves no torn PNG
        paths.append(write_atomic(out / f"{stem}_r{r.rank}.png", lambda tmp, r=r: r.image.save(tmp, format="PNG")))
    captions = [f"#{r.rank}" + ("" if r.clip_score is None else f" {r.clip_score:.3f}") for r in kept]
    return paths, _save_grid(kept, out, f"{stem}_grid", captions)


def _save_grid(kept: list, out: Path, name: str, captions: list[str]) -> Path:
    """Results side by side, captioned, as NAME.png."""
    import numpy as np
    import torch

    from dalle_mini_impl.data.images import from_uint8, save_grid

    images = torch.stack([from_uint8(np.asarray(r.image)) for r in kept])  # (N, 3, H, W)
    return save_grid(images, out / f"{name}.png", nrow=len(kept), captions=captions)


if __name__ == "__main__":
    run_cli(main)
