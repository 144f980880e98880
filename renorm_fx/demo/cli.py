"""The command line of ``python -m renorm_fx.demo``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import DEFAULT_RECIPES, FULL_SEEDS, LR_SCHEDULES, THREADS, TINY_STEPS, DemoConfig
from .data import ACCUMULATED, ALL_REGIMES, ASKED_REGIMES, REGIMES
from .model import METHODS, RAMPS
from .run import run_demo

__all__ = ["parse_regimes", "parse_methods", "parse_args", "main"]


def parse_regimes(text: str) -> tuple[str, ...]:
    """``"all"``, ``"asked"`` or a comma-separated list of regime names (``micro-4-acc`` and ``micro-2-acc``:
    the micro-batch regimes with gradient accumulation)."""
    if text == "all":
        return tuple(REGIMES)
    if text == "asked":
        return ASKED_REGIMES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_REGIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown regime(s) {unknown}; choose from {', '.join(ALL_REGIMES)}, "
                                         f"all, asked")
    return names


def parse_methods(text: str) -> tuple[str, ...]:
    """A comma-separated list of methods (``batchnorm``, ``renorm``)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in METHODS for n in names):
        raise argparse.ArgumentTypeError(f"unknown method(s) in {text!r}; choose from {', '.join(METHODS)}")
    return names


def with_accumulation(regimes: Sequence[str]) -> tuple[str, ...]:
    """``regimes`` with each micro-batch regime followed by its gradient-accumulation twin."""
    out: list[str] = []
    for name in regimes:
        out.append(name)
        if name + "-acc" in ACCUMULATED and name + "-acc" not in regimes:
            out.append(name + "-acc")
    return tuple(dict.fromkeys(out))


def _recipe_help() -> str:
    return "; ".join(f"{m}: {r.describe(m)}" for m, r in DEFAULT_RECIPES.items())


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoConfig:
    """The command line as a :class:`DemoConfig`."""
    from . import __doc__ as doc

    parser = argparse.ArgumentParser(prog="python -m renorm_fx.demo", description=doc,
                                     epilog=f"default recipes: {_recipe_help()}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="optimizer steps per run, both methods (default: each recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a single-seed run (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", help="several seeds: mean ± std")
    parser.add_argument("--full", action="store_true", help=f"seeds {' '.join(map(str, FULL_SEEDS))} (unless --seeds)")
    parser.add_argument("--regimes", type=parse_regimes, default=tuple(REGIMES),
                        help=f"comma-separated, from {', '.join(ALL_REGIMES)}; or 'all' (default: "
                             f"{', '.join(REGIMES)}), 'asked'")
    parser.add_argument("--accumulate", action="store_true",
                        help="also run each micro-batch regime with gradient accumulation (one forward and backward "
                             "per micro-batch, the paper's set-up) and print both times per step")
    parser.add_argument("--methods", type=parse_methods, default=METHODS,
                        help="comma-separated: batchnorm,renorm (default both)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out/)")
    parser.add_argument("--no-compile", action="store_true", help="run both methods eagerly")
    parser.add_argument("--tiny", action="store_true", help=f"{TINY_STEPS} steps: checks the code paths only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--lr", type=float, help="SGD learning rate, both methods (default: each recipe's)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="learning-rate schedule, both methods")
    parser.add_argument("--momentum", type=float,
                        help=f"renorm's moving-average rate alpha (default {DEFAULT_RECIPES['renorm'].momentum})")
    parser.add_argument("--bn-momentum", type=float,
                        help=f"batchnorm's moving-average rate (default {DEFAULT_RECIPES['batchnorm'].momentum})")
    parser.add_argument("--ramp", choices=RAMPS, help=f"renorm's clip schedule after the warm-up (default "
                                                      f"{DEFAULT_RECIPES['renorm'].ramp})")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch CPU threads (default {THREADS})")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on 20%% of the training set held out, not on the test set (for tuning)")
    args = parser.parse_args(argv)
    steps = args.steps or (TINY_STEPS if args.tiny else None)
    if steps is not None and steps < 1:
        parser.error("--steps must be >= 1")
    recipes = {}
    for method, recipe in DEFAULT_RECIPES.items():
        changes = {"steps": steps, "lr": args.lr, "lr_schedule": args.lr_schedule,
                   "momentum": args.momentum if method == "renorm" else args.bn_momentum,
                   "ramp": args.ramp if method == "renorm" else None}
        recipes[method] = dataclasses.replace(recipe, **{k: v for k, v in changes.items() if v is not None})
    seeds = tuple(args.seeds) if args.seeds else (FULL_SEEDS if args.full else (args.seed,))
    regimes = with_accumulation(args.regimes) if args.accumulate else args.regimes
    tiny = {"eval_points": 2, "diag_points": steps} if args.tiny else {}
    return DemoConfig(seeds=seeds, regimes=regimes, methods=args.methods, out=args.out,
                      compile=not args.no_compile, progress=not args.no_progress, threads=args.threads,
                      validation=args.validation, recipes=recipes, **tiny)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m renorm_fx.demo``; returns 1 if a folded model's accuracy differs from the unfolded one's."""
    outcome = run_demo(parse_args(argv))
    return 0 if outcome.fold_ok else 1


if __name__ == "__main__":
    sys.exit(main())
