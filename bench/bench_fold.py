"""Eval latency: conv + batchnorm, conv + renorm (renormified, eval mode), folded conv.

Cases: a conv + BN unit, a small ResNet, a re-parameterizable net (RepVGG and MobileOne
blocks: conv + BN branches summed with an identity BN, which fold merges into one conv
per block) and a MobileNet-style net whose norms are norm + activation layers (a
``BatchNorm2d`` subclass with its own forward, as timm's ``BatchNormAct2d``, which fold
inlines so that the norm folds and the activation stays). For the last two, "fold, previous
pass" is the fold without these steps (branches folded but not merged; norm + activation
layers left whole), as ``fold`` was before them.

All variants run side by side in one process, CPU float32, under ``torch.no_grad()``;
each round times every variant once (the median of many runs,
``torch.utils.benchmark.Timer``), in interleaved rounds so that changing machine load hits
every variant alike. Reported: the lower quartile over rounds of each variant's time (its
least disturbed rounds on a shared machine) and its ratio to the unfolded batchnorm
model's lower quartile. (Not the lower quartile of per-round ratios: for two equal
variants those scatter around 1, and their lower quartile is below it.) On a shared
machine, ``--threads 1`` keeps OpenMP threads from spinning against other jobs. No
thresholds: a report, not a test.

    python bench/bench_fold.py            # ~ 2 minutes
    python bench/bench_fold.py --quick    # a few seconds (smoke run)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).parent))
from common import BasicBlock  # noqa: E402

from renorm_fx import fold, renormify
from renorm_fx.deploy import _fold


class ConvBN(nn.Module):
    """The unit fold targets: a 3x3 conv followed by batchnorm."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


Block = BasicBlock



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


class RepVGGBlock(nn.Module):
    """3x3 conv + BN, 1x1 conv + BN and (same shape) an identity BN, summed, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(x) + self.conv1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)


class MobileOneBlock(nn.Module):
    """MobileOne: ``branches`` kxk conv + BN branches, a 1x1 conv + BN and an identity BN, summed."""

    def __init__(self, c: int, k: int = 3, branches: int = 4, groups: int = 1) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=groups, bias=False),
                                                 nn.BatchNorm2d(c)) for _ in range(branches))
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=False), nn.BatchNorm2d(c)) if k > 1 else None
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.identity(x)
        if self.scale is not None:
            out = out + self.scale(x)
        for branch in self.convs:
            out = out + branch(x)
        return F.relu(out)


class RepNet(nn.Module):
    """A re-parameterizable net: RepVGG stages, then a MobileOne depthwise + pointwise stage."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            RepVGGBlock(3, 32, 2), RepVGGBlock(32, 48, 2), RepVGGBlock(48, 48), RepVGGBlock(48, 96, 2),
            RepVGGBlock(96, 96), MobileOneBlock(96, 3, groups=96), MobileOneBlock(96, 1))
        self.fc = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(x).mean((2, 3)))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm + activation layer: ``F.batch_norm``, then dropout and an activation, in its own forward."""

    def __init__(self, c: int, act: bool = True) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 / EfficientNet block: 1x1 expand, 3x3 depthwise, 1x1 project; each conv + BatchNormAct2d."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = c_in * expand
        self.conv_pw = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.conv_pwl = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = BatchNormAct2d(c_out, act=False)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return y + x if self.skip else y


class NormActNet(nn.Module):
    """A MobileNet-style net whose every norm is a BatchNormAct2d (norm + SiLU in one module)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), BatchNormAct2d(16))
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
                                    InvertedResidual(24, 40, 2), InvertedResidual(40, 40, 1),
                                    InvertedResidual(40, 80, 2), InvertedResidual(80, 80, 1))
        self.head = nn.Sequential(nn.Conv2d(80, 160, 1, bias=False), BatchNormAct2d(160))
        self.fc = nn.Linear(160, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


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


def _lower_quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]


def _what(report) -> str:
    merged = f", {len(report.merged)} blocks merged" if report.merged else ""
    left = f", {len(report.not_folded)} left" if report.not_folded else ""
    return f"{len(report.folded)} BN folded{merged}{left}"


def bench(name: str, model: nn.Module, x: torch.Tensor, rounds: int, min_run_time: float,
          previous: bool = False) -> list[tuple]:
    """``(case, variant, lower-quartile us, its ratio to batchnorm's lower quartile)`` for each variant.

    ``previous``: also time the fold without its norm-subclass and branch-merging steps.
    """
    bn = _with_stats(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rn = renormify(copy.deepcopy(bn)).eval()
    folded = fold(bn)
    variants = {"conv + batchnorm": bn, "conv + renorm (renormify, eval)": rn}
    if previous:
        old = _fold(bn, inline_subclasses=False, merge_branches=False)
        variants[f"fold, previous pass ({_what(old.fold_report)})"] = old
    variants[f"fold ({_what(folded.fold_report)})"] = folded
    with torch.no_grad():
        ref = bn(x)
        err = max((m(x) - ref).abs().max().item() for m in variants.values()) / ref.abs().max().item()
        for m in variants.values():
            for _ in range(3):
                m(x)  # warm up
    if err > 1e-4:
        raise AssertionError(f"{name}: outputs differ (max rel err {err:.2e})")
    # Interleaved rounds: each round times every variant once, so a change in machine load
    # hits all of them alike; then each variant's lower quartile over rounds.
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, m in variants.items():
            times[label].append(_median_us(m, x, min_run_time))
    q25 = {label: _lower_quartile(ts) for label, ts in times.items()}
    base = q25["conv + batchnorm"]
    return [(name, label, t, t / base) for label, t in q25.items()]


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
        ("conv3x3 64->64 + BN, x=(8,64,56,56)", ConvBN(64), torch.randn(8, 64, 56, 56), False),
        ("SmallResNet, x=(8,3,32,32)", SmallResNet(), torch.randn(8, 3, 32, 32), False),
        ("RepNet (RepVGG + MobileOne), x=(8,3,64,64)", RepNet(), torch.randn(8, 3, 64, 64), True),
        ("NormActNet (BatchNormAct2d), x=(8,3,64,64)", NormActNet(), torch.randn(8, 3, 64, 64), True),
    ]
    print(f"torch {torch.__version__}, CPU float32, {torch.get_num_threads()} threads, "
          f"{rounds} interleaved rounds of >= {min_run_time:g} s per variant; median time per round, "
          f"then each variant's lower quartile over rounds, and its ratio to batchnorm's\n")
    rows = []
    for name, model, x, previous in cases:
        rows += bench(name, model, x, rounds, min_run_time, previous)
    w_case = max(len(r[0]) for r in rows)
    w_label = max(len(r[1]) for r in rows)
    print(f"{'case':<{w_case}}  {'variant':<{w_label}}  {'q25 time':>10}  {'vs BN':>6}")
    print(f"{'-' * w_case}  {'-' * w_label}  {'-' * 10}  {'-' * 6}")
    for name, label, t, ratio in rows:
        print(f"{name:<{w_case}}  {label:<{w_label}}  {t:>7.0f} us  {ratio:>5.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
