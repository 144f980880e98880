"""The paper's claim, reproduced: the demo's run, its table as Markdown (the README's Results section).

    python bench/bench_reproduce.py                  # the demo's default run (seed 0), micro-batches both ways
    python bench/bench_reproduce.py --full           # seeds 0-4: mean ± std
    python bench/bench_reproduce.py --seeds 0 1 2 --markdown /tmp/r.md

Runs :func:`renorm_fx.demo.run_demo` (batchnorm vs ``renormify`` on scikit-learn's digits,
every regime, each method with its default recipe from docs/demo_recipe.md, both compiled
unless ``--no-compile``), and by default also the micro-batch regimes with gradient
accumulation (``--no-accumulate``: not), and writes the table of eval-mode test accuracy
(mean ± std over seeds) and time per training step, the micro-batch times (virtual
batches vs gradient accumulation), the exact command, the settings, the fold check and
where the time went, to ``--markdown`` (default ``bench/out/reproduce.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from renorm_fx import demo
from renorm_fx.demo.cli import with_accumulation

ROOT = Path(__file__).resolve().parent.parent


class Tee(io.TextIOBase):
    """Write to several streams (the terminal and a capture)."""

    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:
        return False  # no progress bars in a benchmark log


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0; --full: 0-4)")
    parser.add_argument("--full", action="store_true", help=f"seeds {' '.join(map(str, demo.FULL_SEEDS))}")
    parser.add_argument("--steps", type=int, help="steps per run, both methods (default: each recipe's)")
    parser.add_argument("--regimes", type=demo.parse_regimes, default=tuple(demo.REGIMES),
                        help=f"comma-separated, from {', '.join(demo.ALL_REGIMES)} (default all five)")
    parser.add_argument("--no-accumulate", action="store_true",
                        help="skip the micro-batch regimes with gradient accumulation")
    parser.add_argument("--no-compile", action="store_true", help="run both methods eagerly")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "out" / "reproduce.md",
                        help="where to write the Markdown (default bench/out/reproduce.md)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reproduce",
                        help="plot and results.json (default bench/out/reproduce/)")
    return parser.parse_args(argv)


def machine(threads: int) -> str:
    """One line about where this ran."""
    return (f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, {threads} torch thread{'s' if threads > 1 else ''}")


def to_markdown(command: str, config: demo.DemoConfig, outcome: demo.DemoOutcome, settings: str,
                wall_seconds: float) -> str:
    """The report: command, machine, recipes, table, micro-batch times, fold check, settings, time."""
    seeds = len(config.seeds)
    checks = [r.fold for r in outcome.results if r.fold is not None]
    fold_line = (f"Fold check (seed {config.seeds[0]}, every renorm model): deployed (folded) test accuracy "
                 f"{'equals' if outcome.fold_ok else 'DIFFERS FROM'} the unfolded eval accuracy in "
                 f"{sum(c.ok for c in checks)}/{len(checks)} regimes; largest |logit difference| "
                 f"{max((c.max_abs_diff for c in checks), default=0.0):.1e}.")
    recipes = "; ".join(f"{m}: {config.recipe(m).describe(m)}" for m in config.methods)
    times = demo.format_micro_times(outcome.rows)
    return "\n".join([
        "# Batchnorm vs batch renorm on digits",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine(config.threads)}  ",
        f"Wall time: {wall_seconds / 60:.1f} min  ",
        f"Recipes (docs/demo_recipe.md): {recipes}",
        "",
        f"Test accuracy in eval mode (the moving statistics) at the end of training, "
        + (f"mean ± std over seeds {', '.join(map(str, config.seeds))}" if seeds > 1 else f"seed {config.seeds[0]}")
        + "; time per training step (32 examples), median"
        + (" over the seeds' medians." if seeds > 1 else "."),
        "",
        demo.format_markdown(outcome.rows),
        "",
        *([f"```\n{times}\n```", ""] if times else []),
        fold_line,
        "",
        "Settings, as the demo printed them:",
        "",
        "```",
        settings,
        "```",
        "",
        f"Where the time went: {outcome.timing.removeprefix('time: ')}",
        "",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    seeds = tuple(args.seeds) if args.seeds else (demo.FULL_SEEDS if args.full else (0,))
    regimes = args.regimes if args.no_accumulate else with_accumulation(args.regimes)
    config = demo.DemoConfig(steps=args.steps, seeds=seeds, regimes=regimes, out=args.out,
                             compile=not args.no_compile, progress=False)
    command = "python bench/bench_reproduce.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    capture = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(Tee(sys.stdout, capture)):
        outcome = demo.run_demo(config)
    wall = time.perf_counter() - t0
    settings = capture.getvalue().split("\n\n", 1)[0]  # the header run_demo printed first
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(to_markdown(command.rstrip(), config, outcome, settings, wall))
    print(f"\nwrote {args.markdown}")
    return 0 if outcome.fold_ok else 1


if __name__ == "__main__":
    sys.exit(main())
