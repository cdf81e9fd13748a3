"""Evaluation commands: `python -m dalle_mini_impl.eval {judge,recon,clip,shapes,emoji} ...`, each printing JSON."""

from __future__ import annotations

import argparse

from ..errors import UserError


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    """`--method {ar,unclip}`: where a text-to-image evaluation's candidates come from."""
    parser.add_argument(
        "--method", default="ar", choices=["ar", "unclip"], help="ar: the transformer; unclip: the prior and decoder"
    )


def check_method(pipe, method: str, guided: int) -> None:
    """One sentence when `method` needs parts the bundle lacks, or is asked beside `--guided` refinement."""
    if method == "unclip":
        pipe.require_unclip("--method unclip", prior=True)
        if guided:
            raise UserError("--guided refines the default method's top-1; leave it out with --method unclip")
