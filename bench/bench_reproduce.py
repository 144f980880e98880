"""The paper's claim, reproduced at length: the demo over more seeds and steps, its table as Markdown.

    python bench/bench_reproduce.py                           # 5 seeds x 600 steps, ~5-10 min on 2 CPU cores
    python bench/bench_reproduce.py --seeds 0 1 --steps 300 --markdown /tmp/r.md

Runs :func:`renorm_fx.demo.run_demo` (batchnorm vs ``renormify`` on scikit-learn's
digits, every regime, both compiled unless ``--no-compile``) and writes the table of
eval-mode test accuracy (mean ± std over seeds) and time per training step, with the
exact command, the settings, the fold check and where the time went, to ``--markdown``
(default ``bench/out/reproduce.md``). The README's "Results" section quotes it.
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
from renorm_fx.demo_data import REGIMES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STEPS = 600
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


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
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help=f"seeds (default {' '.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--regimes", type=demo.parse_regimes, default=tuple(REGIMES),
                        help=f"comma-separated, from {', '.join(REGIMES)} (default all)")
    parser.add_argument("--no-compile", action="store_true", help="run both methods eagerly")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "out" / "reproduce.md",
                        help="where to write the Markdown (default bench/out/reproduce.md)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reproduce",
                        help="plot and results.json (default bench/out/reproduce/)")
    return parser.parse_args(argv)


def machine() -> str:
    """One line about where this ran."""
    return (f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, {demo.THREADS} torch thread")


def to_markdown(command: str, config: demo.DemoConfig, outcome: demo.DemoOutcome, settings: str,
                wall_seconds: float) -> str:
    """The report: command, machine, table, fold check, settings, time."""
    seeds = len(config.seeds)
    checks = [r.fold for r in outcome.results if r.fold is not None]
    fold_line = (f"Fold check (seed {config.seeds[0]}, every renorm model): deployed (folded) test accuracy "
                 f"{'equals' if outcome.fold_ok else 'DIFFERS FROM'} the unfolded eval accuracy in "
                 f"{sum(c.ok for c in checks)}/{len(checks)} regimes; largest |logit difference| "
                 f"{max((c.max_abs_diff for c in checks), default=0.0):.1e}.")
    return "\n".join([
        "# Batchnorm vs batch renorm on digits",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Wall time: {wall_seconds / 60:.1f} min",
        "",
        f"Test accuracy in eval mode (the moving statistics) after {config.steps} steps, "
        f"mean ± std over {seeds} seed{'s' if seeds > 1 else ''} ({', '.join(map(str, config.seeds))}); "
        f"time per training step (32 examples), median.",
        "",
        demo.format_markdown(outcome.rows),
        "",
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
    config = demo.DemoConfig(steps=args.steps, seeds=tuple(args.seeds), regimes=args.regimes, out=args.out,
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
