"""Training and evaluation: models compiled once and reused, one run per (regime, method, seed)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import count_updates, diagnostics, fold
from .config import DemoConfig, Recipe
from .data import Digits, Regime, batch_stream, micro_batches
from .model import build_model, initial_state, make_optimizer

__all__ = ["DiagPoint", "FoldCheck", "RunResult", "Stopwatch", "PooledModel", "ModelPool", "train_step",
           "evaluate", "train_run", "check_fold", "read_diagnostics", "torch_threads"]


# ---- results ----------------------------------------------------------------------------------
@dataclasses.dataclass
class DiagPoint:
    """``renorm_fx.diagnostics`` after one optimizer step, over all renorm layers."""

    step: int  # optimizer step
    r_max: float  # the bounds the last forward used
    d_max: float
    r_low: float  # smallest and largest r over every layer's channels (with virtual batches: group means)
    r_high: float
    d_low: float
    d_high: float
    clipped: float  # fraction of all channels (with virtual batches: group x channel) whose r or d was clipped


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
    step_ms: float  # median time of a training step (first step of a compiled graph excluded)
    curve: list[tuple[int, float]]  # (optimizer step, eval-mode test accuracy)
    trace: list[DiagPoint]  # renorm only
    fold: Optional[FoldCheck] = None
    steps: int = 0  # optimizer steps run


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


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op CPU threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- models, compiled once per method and micro-batch set-up -----------------------------------
@dataclasses.dataclass
class PooledModel:
    """A model, its optimizer and its compiled forward, reused across regimes and seeds (reset per run).

    A renorm model's schedule counts this optimizer's steps (``renorm_fx.count_updates``), tied
    once, before ``torch.compile``: so the optimizer is reused too, its state cleared per run.
    """

    module: nn.Module  # the eager model: batchnorm's DigitsCNN or renormify's DigitsCNN
    forward: Callable[[Tensor], Tensor]  # torch.compile(module), or module itself
    optimizer: torch.optim.Optimizer
    recipe: Recipe
    train_compiled: bool = False  # has the training graph run once (compiled)?
    eval_compiled: bool = False


class ModelPool:
    """One model per (method, normalization set-up): each distinct graph compiles once per demo.

    Regimes with the same micro-batch set-up share a model (same input shape, same virtual
    batches, same schedule); before each run its parameters and buffers (step counters
    included) are reset to the run's initial weights with ``load_state_dict``, which keeps
    the compiled graphs, and its optimizer's state is cleared.
    """

    def __init__(self, recipes: dict[str, Recipe], compile: bool) -> None:
        self.recipes, self.compile = dict(recipes), compile
        self.models: dict[tuple[str, int, bool], PooledModel] = {}

    @staticmethod
    def key(method: str, regime: Regime) -> tuple[str, int, bool]:
        return method, regime.micro_batch, regime.accumulate

    def get(self, method: str, regime: Regime, seed: int) -> PooledModel:
        """The pooled model for ``method`` and ``regime``, reset to seed ``seed``'s initial weights."""
        key = self.key(method, regime)
        if key not in self.models:
            recipe = self.recipes[method]
            schedule = recipe.schedule() if method == "renorm" else None
            module = build_model(method, schedule, recipe.momentum, regime.virtual_batch_size)
            optimizer = make_optimizer(module, recipe.lr)
            if method == "renorm":
                count_updates(module, optimizer)  # the schedule counts optimizer steps, however many forwards
            forward = torch.compile(module, dynamic=False) if self.compile else module
            self.models[key] = PooledModel(module, forward, optimizer, recipe)
        pooled = self.models[key]
        pooled.module.load_state_dict(initial_state(seed))
        pooled.optimizer.state.clear()  # a fresh optimizer (momentum buffers), same parameters
        pooled.module.train()
        return pooled


# ---- training and evaluation ------------------------------------------------------------------
def train_step(forward: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, data: Digits,
               indices: Tensor, regime: Regime) -> None:
    """One optimizer step on ``indices``: one forward and backward of the whole batch (normalized in
    virtual batches if the model has them), or with ``regime.accumulate`` one per micro-batch,
    gradients accumulated."""
    optimizer.zero_grad(set_to_none=True)
    if not regime.accumulate:
        F.cross_entropy(forward(data.x_train[indices]), data.y_train[indices]).backward()
    else:
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
    recipe, optimizer = pooled.recipe, pooled.optimizer
    steps = recipe.steps
    stream = batch_stream(regime, data.y_train, torch.Generator().manual_seed(seed))
    eval_every, diag_every = every(steps, config.eval_points), every(steps, config.diag_points)
    curve = [(0, _timed_eval(pooled, data, watch))]
    trace: list[DiagPoint] = []
    step_seconds: list[float] = []
    desc = f"{method:9s} {regime.name:11s} seed {seed}"
    with progress_bar(steps, desc, config.progress) as bar:
        for step in range(1, steps + 1):
            indices = next(stream)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(step)
            t0 = time.perf_counter()
            train_step(pooled.forward, optimizer, data, indices, regime)
            seconds = time.perf_counter() - t0
            if pooled.train_compiled or not pool.compile:
                step_seconds.append(seconds)
                watch.add("training steps", seconds)
            else:
                pooled.train_compiled = True
                watch.add("compile (first training step of each graph)", seconds)
            if method == "renorm" and (step % diag_every == 0 or step == steps):
                with watch("diagnostics"):
                    trace.append(read_diagnostics(pooled.module, step))
            if step % eval_every == 0 or step == steps:
                curve.append((step, _timed_eval(pooled, data, watch)))
            bar.update()
    step_ms = 1e3 * statistics.median(step_seconds) if step_seconds else math.nan
    return RunResult(regime.name, method, seed, curve[-1][1], step_ms, curve, trace, steps=steps)


def _timed_eval(pooled: PooledModel, data: Digits, watch: Stopwatch) -> float:
    phase = "evaluation" if pooled.eval_compiled else "compile (first evaluation of each model)"
    pooled.eval_compiled = True
    with watch(phase):
        return evaluate(pooled, data.x_test, data.y_test)


def check_fold(module: nn.Module, data: Digits, eval_accuracy: float) -> FoldCheck:
    """Fold ``module`` (eval mode) for deployment and compare its test accuracy and logits with the unfolded model."""
    module.eval()
    try:
        deployed = fold(module)
        report = deployed.fold_report
        with torch.no_grad():
            reference = module(data.x_test)
            logits = deployed(data.x_test)
    finally:
        module.train()
    folded_accuracy = (logits.argmax(1) == data.y_test).float().mean().item()
    return FoldCheck(eval_accuracy, folded_accuracy, (logits - reference).abs().max().item(), str(report))
