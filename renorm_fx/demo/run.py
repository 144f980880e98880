"""``run_demo``: every regime x method x seed, the table, the plot, the results files, the fold check."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

import torch

from .config import DemoConfig
from .data import ALL_REGIMES, Digits, load_digits_split
from .model import schedule_steps
from .report import (Row, format_micro_times, format_table, plot_runs, print_fold_checks, summarize,
                     write_results)
from .training import ModelPool, RunResult, Stopwatch, check_fold, torch_threads, train_run

__all__ = ["DemoOutcome", "run_demo", "describe_settings"]


@dataclasses.dataclass
class DemoOutcome:
    """Everything ``run_demo`` produced."""

    results: list[RunResult]
    rows: list[Row]
    plot: Path
    fold_ok: bool
    timing: str
    models: int  # distinct models built (and compiled) for all the runs


def describe_settings(config: DemoConfig, data: Digits) -> str:
    """The header printed before training: data, model, recipes, schedule, micro-batches, compile."""
    regimes = [ALL_REGIMES[name] for name in config.regimes]
    lines = [
        f"digits (scikit-learn): {len(data.y_train)} training images, {len(data.y_test)} {data.test_name} images, "
        f"8x8, 10 classes",
        "model: DigitsCNN (conv-BatchNorm2d x2, Linear-BatchNorm1d head); batchnorm vs renormify(model)",
        "training: batches of 32 examples, SGD momentum 0.9 weight decay 5e-4, the same initial weights and "
        f"batches for both methods, seeds {list(config.seeds)}; each method's recipe (docs/demo_recipe.md):",
    ]
    lines += [f"  {m:9s} {config.recipe(m).describe(m)}" for m in config.methods]
    lines.append(f"both methods {'compiled with torch.compile (dynamic=False)' if config.compile else 'eager'}, "
                 f"{config.threads} CPU thread{'s' if config.threads > 1 else ''}")
    if "renorm" in config.methods:
        recipe = config.recipe("renorm")
        warmup, d_at, r_at = schedule_steps(recipe.steps)
        lines.append("renorm schedule (step = optimizer updates: renorm_fx.count_updates(model, optimizer), "
                     "in every regime):")
        lines.append(f"  {recipe.schedule()}")
        if recipe.ramp == "paper":
            lines.append(f"  = batchnorm (r_max = 1, d_max = 0) up to step {warmup}, then linear ramps: d_max "
                         f"reaches 5 at step {d_at}, r_max reaches 3 at step {r_at} (of {recipe.steps} steps)")
        else:
            lines.append(f"  = batchnorm (r_max = 1, d_max = 0) for steps < {warmup}, then r_max = 3, d_max = 5 "
                         f"(of {recipe.steps} steps)")
    if any(r.groups > 1 for r in regimes):
        lines.append("micro-batches: one forward of 32 in virtual batches (renorm: renormify(..., "
                     "virtual_batch_size=k); batchnorm: each group of k through the same nn.BatchNorm, the "
                     "computation of gradient accumulation, equal to rounding), or with -acc one forward per "
                     "micro-batch, gradients accumulated")
    lines += [f"  {r.name:11s} {r.description}" for r in regimes]
    return "\n".join(lines)


#: Every pooled model is a DigitsCNN, and Dynamo keeps the graphs of one code object (DigitsCNN.forward)
#: together: one training and one eval graph per model, up to 10 models (with --accumulate) -> 20.
RECOMPILE_LIMIT = 32


@contextlib.contextmanager
def enough_recompiles(limit: int = RECOMPILE_LIMIT) -> Iterator[None]:
    """Let Dynamo keep ``limit`` graphs per code object (its default, 8, silently runs the 9th eager)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: max(limit, getattr(config, name))}):
        yield


def run_demo(config: DemoConfig) -> DemoOutcome:
    """Train every regime x method x seed, print the table, write the plot and results, check the fold."""
    with torch_threads(config.threads), enough_recompiles():
        return _run_demo(config)


def _run_demo(config: DemoConfig) -> DemoOutcome:
    watch = Stopwatch()
    with watch("data"):
        data = load_digits_split(validation=config.validation)
    pool = ModelPool(dict(config.recipes), config.compile)
    print(describe_settings(config, data), flush=True)
    print()
    results: list[RunResult] = []
    for seed in config.seeds:
        for name in config.regimes:
            regime = ALL_REGIMES[name]
            for method in config.methods:
                result = train_run(pool, method, regime, seed, data, config, watch)
                if method == "renorm" and seed == config.seeds[0]:
                    with watch("fold"):
                        result.fold = check_fold(pool.models[pool.key(method, regime)].module, data,
                                                 result.accuracy)
                results.append(result)
                print(f"{name:11s} {method:9s} seed {seed}: eval accuracy {result.accuracy:.3f}, "
                      f"{result.step_ms:.2f} ms/step", flush=True)
    rows = summarize(results)
    seeds = f"mean ± std over {len(config.seeds)} seeds" if len(config.seeds) > 1 else f"seed {config.seeds[0]}"
    steps = sorted({config.recipe(m).steps for m in config.methods})
    after = " / ".join(f"{config.recipe(m).steps} ({m})" for m in config.methods) if len(steps) > 1 else str(steps[0])
    print(f"\n{data.test_name} accuracy in eval mode after {after} steps ({seeds}); "
          f"ms per training step (median, one step = 32 examples):")
    print(format_table(rows))
    times = format_micro_times(rows)
    if times:
        print("\n" + times)
    with watch("plot"):
        plot = plot_runs(results, config.out / "demo.png", config.seeds[0])
    write_results(config, results, rows, config.out)
    print(f"\nplot: {plot}   results: {config.out / 'results.json'}, {config.out / 'results.md'}")
    fold_ok = print_fold_checks(results)
    timing = watch.report()
    print("\n" + timing)
    return DemoOutcome(results, rows, plot, fold_ok, timing, len(pool.models))
