"""The paper's claim, reproduced in minutes: batchnorm vs batch renorm on micro-batches and non-i.i.d. batches.

    python -m renorm_fx.demo                 # one seed, every regime, 1-3 minutes on 2 CPU cores
    python -m renorm_fx.demo --full          # 5 seeds, mean +- std
    python -m renorm_fx.demo --accumulate    # micro-batches also as separate forwards: both times per step
    python -m renorm_fx.demo --regimes iid,micro-2 --steps 600 --no-compile

A small CNN (two conv + BatchNorm2d blocks, a Linear + BatchNorm1d head) learns
scikit-learn's bundled digits (no download) twice per regime: with batchnorm and with
``renormify`` (both compiled with ``torch.compile`` unless ``--no-compile``), from the same
initial weights on the same batches, each with its training recipe (chosen on a
validation split with the same search budget: docs/demo_recipe.md). The micro-batch
regimes normalize groups of 4 or 2 examples of one 32-example forward (virtual batches).
It prints the test accuracy in inference (eval) mode per regime and method with the time
per training step, writes a plot (``demo.png``: test accuracy over training; the bounds
r_max / d_max with the r and d the layers used; the fraction of clipped channels, from
``renorm_fx.diagnostics``), and ends by folding each renorm model (``renorm_fx.fold``) and
checking that the deployed model's test accuracy equals the unfolded one's.

Modules: ``data`` (digits, regimes, batches), ``model`` (the network, batchnorm's virtual
batches, the schedule), ``config`` (recipes, settings), ``training`` (the runs),
``report`` (tables, plot, files), ``run`` (``run_demo``), ``cli``; ``search`` (the recipe search:
``python -m renorm_fx.demo.search``) and ``ceiling`` (the 1-class ceiling: ``python -m
renorm_fx.demo.ceiling``), both described in docs/demo_recipe.md.
"""

from .cli import main, parse_args, parse_methods, parse_regimes
from .config import DEFAULT_RECIPES, FULL_SEEDS, THREADS, TINY_STEPS, DemoConfig, Recipe
from .data import ACCUMULATED, ALL_REGIMES, ASKED_REGIMES, REGIMES, Digits, Regime, load_digits_split
from .model import METHODS, DigitsCNN, build_model, ghost_batches, make_schedule, schedule_steps
from .report import Row, format_markdown, format_micro_times, format_table, summarize
from .run import DemoOutcome, describe_settings, run_demo
from .training import FoldCheck, ModelPool, RunResult

__all__ = ["DigitsCNN", "DemoConfig", "Recipe", "DEFAULT_RECIPES", "RunResult", "Row", "run_demo", "make_schedule",
           "summarize", "format_table", "format_markdown", "format_micro_times", "main", "parse_args",
           "parse_regimes", "parse_methods", "METHODS", "REGIMES", "ACCUMULATED", "ALL_REGIMES", "DemoOutcome"]
