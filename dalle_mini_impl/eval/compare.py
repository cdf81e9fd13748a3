"""Two models' evaluations side by side, paired by seed: `python -m dalle_mini_impl.eval compare A.json B.json`.

A.json and B.json are what `eval emoji --out` (or `eval shapes`, `eval unclip`, ... `--out`) wrote for the same seeds:
one seed's captions, R-precision names and sampling seeds are the same for every model, so each seed gives a
paired difference, and over k seeds the mean difference has a standard error of stdev(differences) / sqrt(k).
This is how a change is told from the noise of 130 captions (on emoji-styles a seed moves a model's name R@1 by up
to 9 points, and the paired difference of two models by far less; docs/RESULTS.md).

Prints one JSON object: for every column both files have (`reranked`, `first`, `every`, ...; a column of groups
as `name.group`: `clip_top1_of_8.two`) and every number
in it (`style_acc`, `name_r1`, `cmmd`, ...), the mean of A (`a`), the mean of B (`b`), the mean of B - A over the
seeds (`diff`) and its standard error (`se`; null for one seed). The files must grade the same captions: the same
seeds and split, and real images read alike (`real`: the same judge), or the command says which differs. A side may
be several files joined by commas, one evaluation's seeds run as separate processes (on two cores, two 1-thread
processes finish sooner than one at 2 threads):

    python -m dalle_mini_impl.eval compare SHIPPED_21.json,SHIPPED_25.json NEW_21.json,NEW_25.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from ..config import SampleConfig
from ..errors import UserError
from ..files import read_json_object
from . import sample_settings

# references, not the model's samples: left out (the first three are the same for both models)
REFERENCES = ("real", "same_style_random", "copy_other_style", "reconstructed")


def read_result(path: str) -> tuple[dict, dict[str, dict]]:
    """An evaluation's JSON: (its settings, {seed: that seed's result})."""
    fix = "pass the JSON an evaluation wrote with --out"
    result = read_json_object(path, "evaluation result", fix)
    if "seed" not in result:
        raise UserError(f"'{path}' has no 'seed'; {fix}")
    seeds = result["per_seed"] if "per_seed" in result else {str(result["seed"]): result}
    if not isinstance(seeds, dict) or not all(isinstance(v, dict) for v in seeds.values()):
        raise UserError(f"'{path}' has a 'per_seed' that is not an object of one result per seed; {fix}")
    for seed, one in seeds.items():
        if not seed.lstrip("-").isdigit():
            raise UserError(f"'{path}' has the seed {seed!r}, not an integer; {fix}")
        if not isinstance(one.get("n"), (int, float)) or isinstance(one.get("n"), bool):
            # a bundle's config.json has a 'seed' too: what tells an evaluation is the number of things it graded
            raise UserError(f"'{path}' is not an evaluation result (no number 'n' of items graded, seed {seed}); {fix}")
    return result, seeds


# what one evaluation's runs share: the model, the judge, the data drawn and the sampling settings
RUN_SETTINGS = ("model", "method", "judge", "split", "candidates", "dtype", "batch_size")


def read_side(spec: str) -> tuple[dict, dict[str, dict]]:
    """One side of the comparison: an evaluation's JSON, or several joined by commas (`A1.json,A2.json`: one
    evaluation's seeds run as separate processes), merged into one, their seeds in the order given. Files that
    ran another model or other settings, or repeat a seed, are one sentence."""
    paths = [path for path in spec.split(",") if path.strip()]
    if not paths:
        raise UserError(f"'{spec}' names no evaluation result; pass the JSON an evaluation wrote with --out")
    settings = RUN_SETTINGS + tuple(sample_settings(SampleConfig(), "both"))
    top, seeds = read_result(paths[0])
    seeds, origin = dict(seeds), dict.fromkeys(seeds, paths[0])
    for path in paths[1:]:
        other_top, other = read_result(path)
        for key in settings:
            if other_top.get(key) != top.get(key):
                raise UserError(
                    f"'{paths[0]}' ran with {key} {top.get(key)} and '{path}' with {other_top.get(key)}; join "
                    "only runs of one evaluation"
                )
        for seed in other:
            if seed in seeds:
                raise UserError(f"seed {seed} is in both '{origin[seed]}' and '{path}'; give each seed once")
            seeds[seed], origin[seed] = other[seed], path
    return top, seeds


def _numbers(value: dict) -> dict[str, float]:
    """The numbers of one column, `n` left out (a count, not a measure)."""
    return {
        k: float(v) for k, v in value.items() if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def columns(result: dict) -> dict[str, dict[str, float]]:
    """The columns of one seed's result: its keys whose values are dicts of numbers (`eval emoji`'s `reranked`,
    `every`, ..), and one level down, as `name.part` (`eval shapes`' `clip_top1_of_8.two`, ...)."""
    out = {}
    for name, value in result.items():
        if not isinstance(value, dict):
            continue
        parts = [(name, value)] + [(f"{name}.{part}", sub) for part, sub in value.items() if isinstance(sub, dict)]
        for column, part in parts:
            if numbers := _numbers(part):
                out[column] = numbers
    return out


def check_paired(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    """One sentence unless A and B graded the same captions the same way: seeds, split, candidates, the captions
    shown and the real images' numbers (which only the captions and the judge decide)."""
    (top_a, seeds_a), (top_b, seeds_b) = a, b
    if seeds_a.keys() != seeds_b.keys():
        raise UserError(
            f"A has seeds {', '.join(seeds_a)} and B {', '.join(seeds_b)}; evaluate both with the same --seed"
        )
    for key in ("split", "candidates"):
        if top_a.get(key) != top_b.get(key):
            raise UserError(f"A's {key} is {top_a.get(key)} and B's {top_b.get(key)}; compare evaluations alike")
    for seed in seeds_a:
        x, y = seeds_a[seed], seeds_b[seed]
        if x.get("n") != y.get("n"):
            raise UserError(f"seed {seed}: A graded {x.get('n')} captions and B {y.get('n')}; evaluate both alike")
        if x.get("captions") != y.get("captions"):
            raise UserError(f"seed {seed}: A and B drew other captions (another --n or data); evaluate them alike")
        if x.get("real") != y.get("real"):
            raise UserError(
                f"seed {seed}: the real images read differently in A and B (another judge); grade both with the "
                "same --judge"
            )


def compare(a: tuple[dict, dict], b: tuple[dict, dict]) -> dict:
    """The paired comparison of two evaluations (read_result's) over their seeds: every column but the references
    (which are the same for both), every number in it."""
    check_paired(a, b)
    pairs = [(columns(a[1][s]), columns(b[1][s])) for s in a[1]]
    first = pairs[0][0]
    shared = [c for c in first if c not in REFERENCES and all(c in x and c in y for x, y in pairs)]
    if not shared:
        raise UserError("A and B have no column of numbers in common to compare; pass what one evaluation wrote")
    out = {}
    for column in shared:
        out[column] = {}
        for metric in [m for m in first[column] if all(m in x[column] and m in y[column] for x, y in pairs)]:
            xs = [x[column][metric] for x, _ in pairs]
            ys = [y[column][metric] for _, y in pairs]
            diffs = [v - u for u, v in zip(xs, ys)]
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
            out[column][metric] = {
                "a": round(statistics.fmean(xs), 5),
                "b": round(statistics.fmean(ys), 5),
                "diff": round(statistics.fmean(diffs), 5),
                "se": None if se is None else round(se, 5),
            }
    return {"seeds": [int(s) for s in a[1]], "columns": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle_mini_impl.eval compare", description=__doc__.split("\n")[0])
    p.add_argument(
        "a", help="the first model's evaluation JSON (--out); several joined by commas are one (its seeds in parts)"
    )
    p.add_argument("b", help="the second's, for the same seeds: diff is B - A")
    args = p.parse_args(argv)
    result = compare(read_side(args.a), read_side(args.b))
    print(json.dumps({"a": args.a, "b": args.b, **result}))
    return 0


if __name__ == "__main__":
    from dalle_mini_impl.errors import run_cli

    run_cli(main)
