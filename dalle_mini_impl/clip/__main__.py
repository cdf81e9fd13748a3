"""`python -m dalle_mini_impl.clip COMMAND ...`: zero-shot labels, an image index, text-to-image search.

    classify IMAGE... --labels circle,square,triangle [--template 'a {}' ...]   one JSON line per image
    index FOLDER --out INDEX                                                     embed every image once
    search INDEX "a red circle" -k 5                                             JSON lines: path, score

Every command takes `--model BUNDLE` (default: the shapes bundle shipped in the package) or
`--openclip NAME --pretrained WEIGHTS` for pretrained OpenAI / open_clip weights (optional dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import UserError, run_cli
from ..pipeline.bundle import load_clip
from .uses import DEFAULT_TEMPLATES, ClipScorer, build_index, load_index, read_image, search


def load_scorer(args: argparse.Namespace) -> ClipScorer:
    """The scorer the command line asks for: --openclip NAME, --model DIR, or the shipped bundle."""
    if args.pretrained is not None and not args.openclip:
        raise UserError("--pretrained names open_clip weights; give --openclip NAME too, or leave --pretrained out")
    if args.openclip and args.model is not None:
        raise UserError("--model and --openclip name two models; give one of them")
    if args.openclip:
        from .openclip import OpenCLIPScorer

        return OpenCLIPScorer(args.openclip, pretrained=args.pretrained, device=args.device)
    return load_clip(args.model, device=args.device)  # None: the shipped shapes bundle


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=None,
        help="a bundle folder or a shipped bundle's name (default: shapes; search: the bundle that built the index)",
    )
    common.add_argument("--openclip", default=None, metavar="NAME", help="an open_clip model name, e.g. ViT-B-32")
    common.add_argument("--pretrained", default=None, help="with --openclip: a weights file or an open_clip tag")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser = argparse.ArgumentParser(prog="python -m dalle_mini_impl.clip", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classify", parents=[common], help="zero-shot label probabilities of images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--labels", required=True, help="comma-separated labels, e.g. circle,square,triangle")
    p.add_argument(
        "--template",
        action="append",
        default=None,
        help=f"prompt template with {{}} for the label, repeatable (default: {' | '.join(DEFAULT_TEMPLATES)})",
    )
    p = sub.add_parser("index", parents=[common], help="embed every image under a folder")
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--out", required=True, metavar="INDEX", help="index folder to write")
    p.add_argument("--batch-size", type=int, default=64)
    p = sub.add_parser("search", parents=[common], help="the images of an index closest to a text")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    return parser


def _classify(args: argparse.Namespace) -> None:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise UserError("--labels is empty; pass comma-separated labels, e.g. --labels circle,square,triangle")
    templates = args.template or list(DEFAULT_TEMPLATES)
    for path in args.images:  # before the model loads: a typo should fail fast
        if not Path(path).is_file():
            raise UserError(f"image '{path}' does not exist; check the path")
    scorer = load_scorer(args)
    images = torch.stack([read_image(path, scorer.image_size) for path in args.images])
    probs = scorer.classify(images, labels, templates)
    for path, row in zip(args.images, probs.tolist()):
        best = labels[max(range(len(labels)), key=row.__getitem__)]
        print(json.dumps({"image": path, "best": best, "probs": dict(zip(labels, row))}))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "classify":
        _classify(args)
    elif args.command == "index":
        if args.batch_size < 1:
            raise UserError(f"--batch-size is {args.batch_size}; use at least 1")
        meta = build_index(load_scorer(args), args.folder, args.out, args.batch_size)
        print(json.dumps({"index": args.out, "n": meta["n"], "skipped": len(meta["skipped"])}))
    else:
        if args.k < 1:
            raise UserError(f"-k is {args.k}; ask for at least 1 result")
        index = load_index(args.index)  # before the model loads: a wrong folder should fail fast
        built_by = str(index.meta.get("model") or "")
        if args.model is None and not args.openclip and Path(built_by).is_dir():
            args.model = built_by  # the bundle that built the index, which alone can search it
        for path, score in search(load_scorer(args), index, args.query, args.k):
            print(json.dumps({"path": path, "score": round(score, 4)}))
    return 0


if __name__ == "__main__":
    run_cli(main)
