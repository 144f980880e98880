"""The paper's claim, reproduced in minutes: batchnorm vs batch renorm on micro-batches and non-i.i.d. batches.

    python -m renorm_fx.demo                 # one seed, every regime, ~2 minutes on 2 CPU cores
    python -m renorm_fx.demo --full          # 5 seeds, mean +- std
    python -m renorm_fx.demo --regimes iid,micro-2 --steps 600 --no-compile

A small CNN (two conv + BatchNorm2d blocks, a Linear + BatchNorm1d head) learns
scikit-learn's bundled digits (no download) twice per regime: with batchnorm and with
``renormify`` (both compiled with ``torch.compile`` unless ``--no-compile``), the same
initial weights, batches, optimizer and number of steps. It prints the test accuracy in
inference (eval) mode per regime and method with the time per training step, writes a
plot (``demo.png``: test accuracy over training; the bounds r_max / d_max with the r and
d the layers used; the fraction of clipped channels, from ``renorm_fx.diagnostics``),
and ends by folding each renorm model (``renorm_fx.fold``) and checking that the
deployed model's test accuracy equals the unfolded one's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import RenormSchedule, diagnostics, fold, renormify
from .demo_data import ASKED_REGIMES, REGIMES, Digits, Regime, batch_stream, load_digits_split, micro_batches

__all__ = ["DigitsCNN", "DemoConfig", "RunResult", "Row", "run_demo", "make_schedule", "summarize",
           "format_table", "format_markdown", "main"]

METHODS = ("batchnorm", "renorm")
DEFAULT_STEPS = 300
TINY_STEPS = 6
FULL_SEEDS = (0, 1, 2, 3, 4)
LEARNING_RATE = 0.03  # SGD, momentum 0.9, weight decay 5e-4: chosen on batchnorm's i.i.d. validation accuracy
RENORM_MOMENTUM = 0.1  # alpha for renorm (renormify(momentum=...))
BATCHNORM_MOMENTUM = 0.1  # PyTorch's default
THREADS = 1  # a tiny model: one thread is as fast, and steady when the machine is busy
# The schedule, as fractions of the run (the paper: 5k / 25k / 40k steps of a ~150k-step run).
WARMUP, D_MAX_AT, R_MAX_AT = 0.1, 0.4, 0.6


# ---- the model -------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """8x8 digits -> 10 classes: conv-BN-ReLU, conv-BN-ReLU-pool, pool, Linear-BatchNorm1d-ReLU, Linear.

    The BatchNorm1d in the head normalizes 64 features over the examples of the batch
    alone (no spatial positions), which is where small and non-i.i.d. batches hurt most.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 2 * 2, 64, bias=False)
        self.bn_fc = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(x, 2).flatten(1)
        x = F.relu(self.bn_fc(self.fc1(x)))
        return self.fc2(x)


def make_schedule(steps: int, forwards_per_step: int = 1) -> RenormSchedule:
    """The paper's schedule scaled to a run of ``steps`` optimizer steps.

    Batchnorm (r_max = 1, d_max = 0) for the first 10 % of the run, then d_max reaches 5
    at 40 % and r_max reaches 3 at 60 %. A schedule counts each layer's forwards
    (``num_batches_tracked``): with micro-batches there are ``forwards_per_step`` of
    them per optimizer step, so the ramp is stretched by that factor to stay the same
    in optimizer steps.
    """
    warmup, d_at, r_at = schedule_steps(steps)
    k = forwards_per_step
    return RenormSchedule.paper(warmup=warmup * k, r_max_at=r_at * k, d_max_at=d_at * k)


def schedule_steps(steps: int) -> tuple[int, int, int]:
    """``(warmup, d_max_at, r_max_at)`` in optimizer steps for a run of ``steps``: 10 %, 40 %, 60 %."""
    warmup = max(1, round(WARMUP * steps))
    d_at = max(warmup + 1, round(D_MAX_AT * steps))
    return warmup, d_at, max(d_at + 1, round(R_MAX_AT * steps))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 and weight decay 5e-4 (the same for both methods)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


# ---- configuration and results ---------------------------------------------------------------
@dataclasses.dataclass
class DemoConfig:
    """What to run. ``seeds`` are the initializations and batch orders; each seed trains every regime x method."""

    steps: int = DEFAULT_STEPS
    seeds: tuple[int, ...] = (0,)
    regimes: tuple[str, ...] = tuple(REGIMES)
    methods: tuple[str, ...] = METHODS
    out: Path = Path("demo_out")
    compile: bool = True
    progress: bool = True
    lr: float = LEARNING_RATE
    momentum: float = RENORM_MOMENTUM
    bn_momentum: float = BATCHNORM_MOMENTUM
    threads: int = THREADS
    validation: bool = False
    eval_points: int = 25  # test-accuracy evaluations per run (for the curves)
    diag_points: int = 100  # diagnostics reads per renorm run (for the plot)


@dataclasses.dataclass
class DiagPoint:
    """``renorm_fx.diagnostics`` after one optimizer step, over all renorm layers."""

    step: int  # optimizer step
    r_max: float  # the bounds the last forward used
    d_max: float
    r_low: float  # smallest and largest r over every layer's channels
    r_high: float
    d_low: float
    d_high: float
    clipped: float  # fraction of all channels whose r or d was clipped


@dataclasses.dataclass
class FoldCheck:
    """The renorm model folded for deployment against itself unfolded, on the test set."""

    eval_accuracy: float
    folded_accuracy: float
    max_abs_diff: float  # largest |logit difference|, folded vs unfolded (eager, eval mode)
    report: str

    @property
    def ok(self) -> bool:
        return self.folded_accuracy == self.eval_accuracy


@dataclasses.dataclass
class RunResult:
    """One training run: a regime, a method, a seed."""

    regime: str
    method: str
    seed: int
    accuracy: float  # eval mode, after the last step
    step_ms: float  # median time of a training step (first step excluded: compile)
    curve: list[tuple[int, float]]  # (optimizer step, eval-mode test accuracy)
    trace: list[DiagPoint]  # renorm only
    fold: Optional[FoldCheck] = None


@dataclasses.dataclass
class Row:
    """One regime of the results table: both methods, over the seeds."""

    regime: str
    description: str
    accuracy: dict[str, list[float]]  # method -> one accuracy per seed
    step_ms: dict[str, float]  # method -> median over seeds

    def mean(self, method: str) -> float:
        return statistics.fmean(self.accuracy[method])

    def std(self, method: str) -> float:
        values = self.accuracy[method]
        return statistics.stdev(values) if len(values) > 1 else 0.0


class Stopwatch:
    """Seconds spent per phase; ``with watch("training"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def report(self) -> str:
        total = time.perf_counter() - self.start
        parts = [f"{phase} {sec:.1f} s" for phase, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1])]
        rest = total - sum(self.seconds.values())
        return f"time: {total:.1f} s in the demo = " + ", ".join(parts) + f", other {rest:.1f} s"


# ---- models, compiled once per method and micro-batch size ------------------------------------
@dataclasses.dataclass
class PooledModel:
    """A model and its compiled forward, reused across regimes and seeds (its state is reset per run)."""

    module: nn.Module  # the eager model: batchnorm's DigitsCNN or renormify's RenormGraphModule
    forward: Callable[[Tensor], Tensor]  # torch.compile(module), or module itself
    schedule: Optional[RenormSchedule]
    train_compiled: bool = False  # has the training graph run once (compiled)?
    eval_compiled: bool = False


class ModelPool:
    """One model per (method, micro-batch size): each distinct graph compiles once per demo.

    Regimes with the same micro-batch share a model (same input shape, same schedule);
    before each run its parameters and buffers (step counters included) are reset to
    the run's initial weights with ``load_state_dict``, which keeps the compiled graphs.
    """

    def __init__(self, steps: int, momentum: float, compile: bool, bn_momentum: float = BATCHNORM_MOMENTUM) -> None:
        self.steps, self.momentum, self.bn_momentum, self.compile = steps, momentum, bn_momentum, compile
        self.models: dict[tuple[str, int], PooledModel] = {}

    def schedule_for(self, regime: Regime) -> RenormSchedule:
        return make_schedule(self.steps, regime.forwards_per_step)

    def get(self, method: str, regime: Regime, seed: int) -> PooledModel:
        """The pooled model for ``method`` and ``regime``, reset to seed ``seed``'s initial weights."""
        key = (method, regime.micro_batch)
        if key not in self.models:
            schedule = self.schedule_for(regime) if method == "renorm" else None
            module = build_model(method, schedule, self.bn_momentum if method == "batchnorm" else self.momentum)
            forward = torch.compile(module, dynamic=False) if self.compile else module
            self.models[key] = PooledModel(module, forward, schedule)
        pooled = self.models[key]
        pooled.module.load_state_dict(initial_state(seed))
        pooled.module.train()
        return pooled


def initial_state(seed: int) -> dict[str, Tensor]:
    """The initial weights of seed ``seed``: the same for both methods."""
    torch.manual_seed(seed)
    return DigitsCNN().state_dict()


def build_model(method: str, schedule: Optional[RenormSchedule], momentum: float) -> nn.Module:
    """``DigitsCNN`` with batchnorm, or renormified with ``schedule``; ``momentum`` is the moving-average rate."""
    model = DigitsCNN()
    if method == "batchnorm":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum
        return model
    if method == "renorm":
        return renormify(model, schedule, momentum=momentum)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# ---- training and evaluation ------------------------------------------------------------------
def train_step(forward: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, data: Digits,
               indices: Tensor, regime: Regime) -> None:
    """One optimizer step on ``indices``: a forward and backward per micro-batch, gradients accumulated."""
    optimizer.zero_grad(set_to_none=True)
    for chunk in micro_batches(indices, regime):
        loss = F.cross_entropy(forward(data.x_train[chunk]), data.y_train[chunk])
        (loss * (len(chunk) / len(indices))).backward()
    optimizer.step()


def evaluate(pooled: PooledModel, x: Tensor, y: Tensor) -> float:
    """Accuracy in inference (eval) mode, i.e. with the moving statistics; the model goes back to training mode."""
    pooled.module.eval()
    try:
        with torch.no_grad():
            return (pooled.forward(x).argmax(1) == y).float().mean().item()
    finally:
        pooled.module.train()


def read_diagnostics(module: nn.Module, step: int) -> DiagPoint:
    """``renorm_fx.diagnostics(module)`` summarized over layers (channel-weighted clipped fraction)."""
    diag = diagnostics(module)
    channels = {name: module.get_buffer(f"{name}.running_mean").numel() for name in diag}
    total = sum(channels.values())
    first = next(iter(diag.values()))
    return DiagPoint(
        step=step,
        r_max=first.bounds[0],
        d_max=first.bounds[1],
        r_low=min(d.r_range[0] for d in diag.values()),
        r_high=max(d.r_range[1] for d in diag.values()),
        d_low=min(d.d_range[0] for d in diag.values()),
        d_high=max(d.d_range[1] for d in diag.values()),
        clipped=sum(d.clipped_fraction * channels[n] for n, d in diag.items()) / total,
    )


def every(steps: int, points: int) -> int:
    """The interval that gives about ``points`` evenly spaced steps in ``steps``."""
    return max(1, steps // max(1, points))


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar, shown only on a terminal (and when enabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled or not sys.stdout.isatty(),
                dynamic_ncols=True)


def train_run(pool: ModelPool, method: str, regime: Regime, seed: int, data: Digits, config: DemoConfig,
              watch: Stopwatch) -> RunResult:
    """Train one model from seed ``seed``'s initial weights; return its eval accuracy, timings, curve and trace."""
    pooled = pool.get(method, regime, seed)
    optimizer = make_optimizer(pooled.module, config.lr)
    stream = batch_stream(regime, data.y_train, torch.Generator().manual_seed(seed))
    eval_every, diag_every = every(config.steps, config.eval_points), every(config.steps, config.diag_points)
    curve = [(0, _timed_eval(pooled, data, watch))]
    trace: list[DiagPoint] = []
    step_seconds: list[float] = []
    desc = f"{method:9s} {regime.name:7s} seed {seed}"
    with progress_bar(config.steps, desc, config.progress) as bar:
        for step in range(1, config.steps + 1):
            indices = next(stream)
            t0 = time.perf_counter()
            train_step(pooled.forward, optimizer, data, indices, regime)
            seconds = time.perf_counter() - t0
            if pooled.train_compiled or not pool.compile:
                step_seconds.append(seconds)
                watch.add("training steps", seconds)
            else:
                pooled.train_compiled = True
                watch.add("compile (first training step of each graph)", seconds)
            if method == "renorm" and (step % diag_every == 0 or step == config.steps):
                with watch("diagnostics"):
                    trace.append(read_diagnostics(pooled.module, step))
            if step % eval_every == 0 or step == config.steps:
                curve.append((step, _timed_eval(pooled, data, watch)))
            bar.update()
    step_ms = 1e3 * statistics.median(step_seconds) if step_seconds else math.nan
    return RunResult(regime.name, method, seed, curve[-1][1], step_ms, curve, trace)


def _timed_eval(pooled: PooledModel, data: Digits, watch: Stopwatch) -> float:
    phase = "evaluation" if pooled.eval_compiled else "compile (first evaluation of each model)"
    pooled.eval_compiled = True
    with watch(phase):
        return evaluate(pooled, data.x_test, data.y_test)


def check_fold(module: nn.Module, data: Digits, eval_accuracy: float) -> FoldCheck:
    """Fold ``module`` (eval mode) for deployment and compare its test accuracy and logits with the unfolded model."""
    module.eval()
    try:
        deployed, report = fold(module, report=True)
        with torch.no_grad():
            reference = module(data.x_test)
            logits = deployed(data.x_test)
    finally:
        module.train()
    folded_accuracy = (logits.argmax(1) == data.y_test).float().mean().item()
    return FoldCheck(eval_accuracy, folded_accuracy, (logits - reference).abs().max().item(), str(report))


# ---- the table --------------------------------------------------------------------------------
def summarize(results: Sequence[RunResult]) -> list[Row]:
    """One row per regime (in the order run), both methods, accuracies over seeds."""
    rows: dict[str, Row] = {}
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for r in results:
        row = rows.setdefault(r.regime, Row(r.regime, REGIMES[r.regime].description, {}, {}))
        row.accuracy.setdefault(r.method, []).append(r.accuracy)
        times[(r.regime, r.method)].append(r.step_ms)
    for (regime, method), values in times.items():
        rows[regime].step_ms[method] = statistics.median(values)
    return list(rows.values())


def _acc(row: Row, method: str) -> str:
    if method not in row.accuracy:
        return "-"
    if len(row.accuracy[method]) > 1:
        return f"{row.mean(method):.3f} ± {row.std(method):.3f}"
    return f"{row.mean(method):.3f}"


def _delta(row: Row) -> str:
    if not all(m in row.accuracy for m in METHODS):
        return "-"
    return f"{row.mean('renorm') - row.mean('batchnorm'):+.3f}"


def _ms(row: Row, method: str) -> str:
    return f"{row.step_ms[method]:.2f}" if method in row.step_ms else "-"


TABLE_HEADER = ("regime", "training batches", "batchnorm", "renorm", "renorm - bn",
                "ms/step bn", "ms/step renorm")


def _table_cells(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    return [(r.regime, r.description, _acc(r, "batchnorm"), _acc(r, "renorm"), _delta(r),
             _ms(r, "batchnorm"), _ms(r, "renorm")) for r in rows]


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: eval-mode test accuracy (mean ± std over seeds) and ms per training step."""
    cells = [TABLE_HEADER, *_table_cells(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row]) -> str:
    """The same table in Markdown."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 5) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in _table_cells(rows)]
    return "\n".join(lines)


# ---- the plot ---------------------------------------------------------------------------------
def plot_runs(results: Sequence[RunResult], path: Path, seed: int) -> Path:
    """Write a 2x2 PNG for seed ``seed``: eval accuracy over training (both methods); r_max with the
    r the renorm layers used; d_max with the d they used; the fraction of clipped channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.seed == seed]
    regimes = list(dict.fromkeys(r.regime for r in runs))
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(regimes)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_acc, ax_r, ax_d, ax_clip = axes.flat
    for r in runs:
        steps, acc = zip(*r.curve)
        style = "-" if r.method == "renorm" else "--"
        ax_acc.plot(steps, acc, style, color=colors[r.regime], label=f"{r.regime} {r.method}")
        if not r.trace:
            continue
        t = r.trace
        s = [p.step for p in t]
        c = colors[r.regime]
        ax_r.fill_between(s, [p.r_low for p in t], [p.r_high for p in t], color=c, alpha=0.2, lw=0)
        ax_r.plot(s, [p.r_high for p in t], color=c, lw=0.8, label=f"{r.regime}: r range")
        ax_d.fill_between(s, [p.d_low for p in t], [p.d_high for p in t], color=c, alpha=0.2, lw=0)
        ax_d.plot(s, [p.d_high for p in t], color=c, lw=0.8, label=f"{r.regime}: d range")
        ax_clip.plot(s, [p.clipped for p in t], color=c, label=r.regime)
    bounds = next((r.trace for r in runs if r.trace), [])
    if bounds:
        s = [p.step for p in bounds]
        ax_r.plot(s, [p.r_max for p in bounds], "k", lw=2, label="r_max, 1/r_max")
        ax_r.plot(s, [1 / p.r_max for p in bounds], "k", lw=2)
        ax_d.plot(s, [p.d_max for p in bounds], "k", lw=2, label="±d_max")
        ax_d.plot(s, [-p.d_max for p in bounds], "k", lw=2)
    ax_acc.set(title="test accuracy, eval mode (dashed: batchnorm, solid: renorm)", xlabel="step",
               ylabel="accuracy", ylim=(0, 1.02))
    ax_acc.legend(fontsize=7, ncol=2)
    ax_r.set(title="renorm: r_max and the r used (min..max over channels)", xlabel="step", yscale="log")
    ax_d.set(title="renorm: d_max and the d used (min..max over channels)", xlabel="step")
    ax_clip.set(title="renorm: fraction of channels whose r or d was clipped\n(all of them in the warm-up: "
                      "r_max = 1, d_max = 0 is batchnorm)", xlabel="step",
                ylabel="fraction", ylim=(-0.02, 1.02))
    for ax in (ax_r, ax_d, ax_clip):
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(f"batchnorm vs renorm on digits, seed {seed}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the demo ---------------------------------------------------------------------------------
@dataclasses.dataclass
class DemoOutcome:
    """Everything ``run_demo`` produced."""

    results: list[RunResult]
    rows: list[Row]
    plot: Path
    fold_ok: bool
    timing: str
    models: int  # distinct models built (and compiled) for all the runs


def describe_settings(config: DemoConfig, data: Digits, pool: ModelPool) -> str:
    """The header printed before training: data, model, optimizer, schedule, momentum, compile."""
    regimes = [REGIMES[name] for name in config.regimes]
    lines = [
        f"digits (scikit-learn): {len(data.y_train)} training images, {len(data.y_test)} {data.test_name} images, "
        f"8x8, 10 classes",
        "model: DigitsCNN (conv-BatchNorm2d x2, Linear-BatchNorm1d head); batchnorm vs renormify(model)",
        f"training: {config.steps} steps of 32 examples, SGD lr {config.lr} momentum 0.9 weight decay 5e-4, "
        f"seeds {list(config.seeds)}",
        f"moving-average rate alpha: batchnorm {config.bn_momentum}, renorm {config.momentum}",
        f"both methods {'compiled with torch.compile (dynamic=False)' if config.compile else 'eager'}, "
        f"{config.threads} CPU thread{'s' if config.threads > 1 else ''}",
        "renorm schedule (RenormSchedule.paper scaled to the run; step = the layer's forward count):",
    ]
    by_forwards: dict[int, list[str]] = collections.defaultdict(list)
    for regime in regimes:
        by_forwards[regime.forwards_per_step].append(regime.name)
    for k, names in by_forwards.items():
        fake = Regime("_", "_", micro_batch=32 // k)
        lines.append(f"  {', '.join(names)} ({k} forward{'s' if k > 1 else ''} per step): {pool.schedule_for(fake)}")
    warmup, d_at, r_at = schedule_steps(config.steps)
    lines.append(f"  = batchnorm (r_max = 1, d_max = 0) up to step {warmup}, then linear ramps: d_max reaches 5 "
                 f"at step {d_at}, r_max reaches 3 at step {r_at} (of {config.steps} optimizer steps)")
    lines += [f"  {r.name:8s} {r.description}" + (" (gradients accumulated)" if r.forwards_per_step > 1 else "")
              for r in regimes]
    return "\n".join(lines)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op CPU threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(config: DemoConfig) -> DemoOutcome:
    """Train every regime x method x seed, print the table, write the plot and results, check the fold."""
    with torch_threads(config.threads):
        return _run_demo(config)


def _run_demo(config: DemoConfig) -> DemoOutcome:
    watch = Stopwatch()
    with watch("data"):
        data = load_digits_split(validation=config.validation)
    pool = ModelPool(config.steps, config.momentum, config.compile, config.bn_momentum)
    print(describe_settings(config, data, pool), flush=True)
    print()
    results: list[RunResult] = []
    for seed in config.seeds:
        for name in config.regimes:
            for method in config.methods:
                result = train_run(pool, method, REGIMES[name], seed, data, config, watch)
                if method == "renorm" and seed == config.seeds[0]:
                    with watch("fold"):
                        result.fold = check_fold(pool.models[(method, REGIMES[name].micro_batch)].module,
                                                 data, result.accuracy)
                results.append(result)
                print(f"{name:8s} {method:9s} seed {seed}: eval accuracy {result.accuracy:.3f}, "
                      f"{result.step_ms:.2f} ms/step", flush=True)
    rows = summarize(results)
    seeds = f"mean ± std over {len(config.seeds)} seeds" if len(config.seeds) > 1 else f"seed {config.seeds[0]}"
    print(f"\n{data.test_name} accuracy in eval mode after {config.steps} steps ({seeds}); "
          f"ms per training step (median, one step = 32 examples):")
    print(format_table(rows))
    with watch("plot"):
        plot = plot_runs(results, config.out / "demo.png", config.seeds[0])
    write_results(config, results, rows, config.out)
    print(f"\nplot: {plot}   results: {config.out / 'results.json'}, {config.out / 'results.md'}")
    fold_ok = print_fold_checks(results)
    timing = watch.report()
    print("\n" + timing)
    return DemoOutcome(results, rows, plot, fold_ok, timing, len(pool.models))


def print_fold_checks(results: Sequence[RunResult]) -> bool:
    """Print the deployed (folded) renorm models' accuracy next to the unfolded; True if all are equal."""
    checks = [r for r in results if r.fold is not None]
    if not checks:
        return True
    print(f"\ndeploy: renorm_fx.fold(model.eval()) of each renorm model (seed {checks[0].seed})")
    print(checks[0].fold.report)  # type: ignore[union-attr]
    print(f"{'regime':8s}  {'eval accuracy':>13s}  {'folded accuracy':>15s}  {'max |logit diff|':>16s}")
    for r in checks:
        f = r.fold
        assert f is not None
        print(f"{r.regime:8s}  {f.eval_accuracy:13.3f}  {f.folded_accuracy:15.3f}  {f.max_abs_diff:16.2e}"
              f"  {'equal' if f.ok else 'DIFFERENT'}")
    ok = all(r.fold.ok for r in checks)  # type: ignore[union-attr]
    print("fold check: " + ("the deployed models' accuracy equals the unfolded eval accuracy" if ok else "MISMATCH"))
    return ok


def write_results(config: DemoConfig, results: Sequence[RunResult], rows: Sequence[Row], out: Path) -> None:
    """``results.json`` (settings, every run with its curve and diagnostics trace) and ``results.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
    payload = {"settings": settings, "runs": [dataclasses.asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "results.md").write_text(format_markdown(rows) + "\n")


# ---- command line -----------------------------------------------------------------------------
def parse_regimes(text: str) -> tuple[str, ...]:
    """``"all"``, ``"asked"`` or a comma-separated list of regime names."""
    if text == "all":
        return tuple(REGIMES)
    if text == "asked":
        return ASKED_REGIMES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in REGIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown regime(s) {unknown}; choose from {', '.join(REGIMES)}, all, asked")
    return names


def parse_methods(text: str) -> tuple[str, ...]:
    """A comma-separated list of methods (``batchnorm``, ``renorm``)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in METHODS for n in names):
        raise argparse.ArgumentTypeError(f"unknown method(s) in {text!r}; choose from {', '.join(METHODS)}")
    return names


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoConfig:
    """The command line as a :class:`DemoConfig`."""
    parser = argparse.ArgumentParser(prog="python -m renorm_fx.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a single-seed run (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", help="several seeds: mean ± std")
    parser.add_argument("--full", action="store_true", help=f"seeds {' '.join(map(str, FULL_SEEDS))} (unless --seeds)")
    parser.add_argument("--regimes", type=parse_regimes, default=tuple(REGIMES),
                        help=f"comma-separated, from {', '.join(REGIMES)}; or 'all' (default), 'asked'")
    parser.add_argument("--methods", type=parse_methods, default=METHODS,
                        help="comma-separated: batchnorm,renorm (default both)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out/)")
    parser.add_argument("--no-compile", action="store_true", help="run both methods eagerly")
    parser.add_argument("--tiny", action="store_true", help=f"{TINY_STEPS} steps: checks the code paths only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help=f"SGD learning rate (default {LEARNING_RATE})")
    parser.add_argument("--momentum", type=float, default=RENORM_MOMENTUM,
                        help=f"renorm's moving-average rate alpha (default {RENORM_MOMENTUM})")
    parser.add_argument("--bn-momentum", type=float, default=BATCHNORM_MOMENTUM,
                        help=f"batchnorm's moving-average rate (default {BATCHNORM_MOMENTUM}, PyTorch's)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch CPU threads (default {THREADS})")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on 20%% of the training set held out, not on the test set (for tuning)")
    args = parser.parse_args(argv)
    steps = args.steps or (TINY_STEPS if args.tiny else DEFAULT_STEPS)
    if steps < 1:
        parser.error("--steps must be >= 1")
    seeds = tuple(args.seeds) if args.seeds else (FULL_SEEDS if args.full else (args.seed,))
    tiny = {"eval_points": 2, "diag_points": steps} if args.tiny else {}
    return DemoConfig(steps=steps, seeds=seeds, regimes=args.regimes, methods=args.methods, out=args.out, compile=not args.no_compile,
                      progress=not args.no_progress, lr=args.lr, momentum=args.momentum,
                      bn_momentum=args.bn_momentum, threads=args.threads, validation=args.validation, **tiny)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m renorm_fx.demo``; returns 1 if a folded model's accuracy differs from the unfolded one's."""
    outcome = run_demo(parse_args(argv))
    return 0 if outcome.fold_ok else 1


if __name__ == "__main__":
    sys.exit(main())
