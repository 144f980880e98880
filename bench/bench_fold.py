"""Eval latency: conv + batchnorm, conv + renorm (renormified, eval mode), folded conv.

All three run side by side in one process, CPU float32, under ``torch.no_grad()``;
each time is the median of many runs (``torch.utils.benchmark.Timer``), in interleaved
rounds so that changing machine load hits every variant alike. Ratios are against the
unfolded batchnorm model, paired within a round. No thresholds: a report, not a test.

    python bench/bench_fold.py            # < 1 minute
    python bench/bench_fold.py --quick    # a few seconds (smoke run)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from renorm_fx import fold, renormify


class ConvBN(nn.Module):
    """The unit fold targets: a 3x3 conv followed by batchnorm."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Block(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = None
        if stride != 1 or c_in != c:
            self.down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """A CIFAR-size ResNet: stem, three stages of one block, pooled linear + BN1d head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stages = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2))
        self.fc = nn.Linear(128, classes)
        self.bn_fc = nn.BatchNorm1d(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stages(self.stem(x))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def _with_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _median_us(model: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    with torch.no_grad():
        timer = Timer("model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def _median(values: list[float]) -> float:
    return statistics.median(values)


def bench(name: str, model: nn.Module, x: torch.Tensor, rounds: int, min_run_time: float) -> list[tuple]:
    """``(case, variant, median us, median ratio vs batchnorm)`` for each variant."""
    bn = _with_stats(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rn = renormify(copy.deepcopy(bn)).eval()
    folded, report = fold(bn, report=True)
    with torch.no_grad():
        ref = bn(x)
        err = max((m(x) - ref).abs().max().item() for m in (rn, folded)) / ref.abs().max().item()
        for m in (bn, rn, folded):
            for _ in range(3):
                m(x)  # warm up
    if err > 1e-4:
        raise AssertionError(f"{name}: outputs differ (max rel err {err:.2e})")
    variants = {"conv + batchnorm": bn, "conv + renorm (renormify, eval)": rn,
                f"folded ({len(report.folded)} BN folded)": folded}
    # Interleaved rounds: each round times every variant once, so a change in machine load
    # hits all of them alike; ratios are taken within a round, then the median over rounds.
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, m in variants.items():
            times[label].append(_median_us(m, x, min_run_time))
    base = times["conv + batchnorm"]
    return [(name, label, _median(ts), _median([t / b for t, b in zip(ts, base)])) for label, ts in times.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timing runs (a smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, min_run_time = (2, 0.05) if args.quick else (15, 0.2)
    torch.manual_seed(0)
    cases = [
        ("conv3x3 64->64 + BN, x=(8,64,56,56)", ConvBN(64), torch.randn(8, 64, 56, 56)),
        ("SmallResNet, x=(8,3,32,32)", SmallResNet(), torch.randn(8, 3, 32, 32)),
    ]
    print(f"torch {torch.__version__}, CPU float32, {torch.get_num_threads()} threads, "
          f"{rounds} interleaved rounds of >= {min_run_time:g} s per variant; median time per round, "
          f"then median over rounds (ratios paired within a round)\n")
    rows = []
    for name, model, x in cases:
        rows += bench(name, model, x, rounds, min_run_time)
    w_case = max(len(r[0]) for r in rows)
    w_label = max(len(r[1]) for r in rows)
    print(f"{'case':<{w_case}}  {'variant':<{w_label}}  {'median':>10}  {'vs BN':>6}")
    print(f"{'-' * w_case}  {'-' * w_label}  {'-' * 10}  {'-' * 6}")
    for name, label, t, ratio in rows:
        print(f"{name:<{w_case}}  {label:<{w_label}}  {t:>7.0f} us  {ratio:>5.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
