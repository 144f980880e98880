"""Training-step speed, kernel count and peak memory: renorm vs batchnorm, eager and compiled.

    python bench/bench_compile.py [--quick] [--markdown out.md]

Side by side in one process, CPU, float32. A step is forward + backward of one
normalization layer on a fixed input and output gradient (and, for the network
row, a ResNet-style CNN's forward + backward). Times are medians; ratios are
against eager ``nn.BatchNorm2d`` and compiled ``nn.BatchNorm2d`` measured in the
same run. Kernel counts are the fused C++ kernels Inductor generates for the
forward and the backward. The "no NaN guard" rows price the non-finite guard (on by
default): compare them with the "renormify compiled" rows. Peak memory is the most the step allocates above what
it starts with (from the profiler's allocation events).
"""

from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved  # noqa: E402

from renorm_fx import RenormSchedule, renormify  # noqa: E402

SHAPES = [(8, 64, 56, 56), (32, 256, 14, 14), (4, 64, 112, 112)]
SCHEDULE = RenormSchedule.constant(2.0, 1.0)  # clipping active: the general case


class PlainRenorm(nn.BatchNorm2d):
    """Batch renorm as one would write it by hand: the paper's equations with autograd."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.register_buffer("r_max", torch.tensor(2.0))
        self.register_buffer("d_max", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = lambda t: t[None, :, None, None]  # noqa: E731
        mean = x.mean((0, 2, 3))
        sigma_b = torch.sqrt(x.var((0, 2, 3), unbiased=False) + self.eps)
        sigma = torch.sqrt(self.running_var + self.eps)
        r = torch.clamp(sigma_b / sigma, 1 / self.r_max, self.r_max).detach()
        d = torch.clamp((mean - self.running_mean) / sigma, -self.d_max, self.d_max).detach()
        y = c(self.weight) * ((x - c(mean)) / c(sigma_b) * c(r) + c(d)) + c(self.bias)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            new_sigma = torch.lerp(sigma, sigma_b, self.momentum)
            self.running_var.copy_(new_sigma * new_sigma - self.eps)
        return y


def _median_ms(steps: dict[str, Callable[[], None]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each step, timed round-robin so that load on the machine hits all alike."""
    return {k: v * 1e3 for k, v in interleaved(steps, reps, warmup, stat="median").items()}


def _peak_bytes(fn: Callable[[], None]) -> int:
    """Most bytes live above the start, at op granularity (each op's own allocations minus frees)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def _kernels(fn: Callable[[], None]) -> str:
    _, codes = run_and_get_code(fn)
    counts = [code.count("async_compile.cpp_pybinding(") for code in codes]
    return "/".join(str(c) for c in counts) or "-"


def layer_rows(shape: tuple[int, ...], reps: int) -> list[dict]:
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    bn = nn.BatchNorm2d(c)
    renorm = renormify(nn.Sequential(nn.BatchNorm2d(c)), SCHEDULE)
    variants = {
        "batchnorm eager": bn,
        "batchnorm compiled": torch.compile(copy.deepcopy(bn)),
        "plain renorm eager": PlainRenorm(c),
        "plain renorm compiled": torch.compile(PlainRenorm(c)),
        "renormify eager": renorm,
        "renormify compiled": torch.compile(copy.deepcopy(renorm)),
        "renormify compiled, no NaN guard": torch.compile(
            renormify(nn.Sequential(nn.BatchNorm2d(c)), SCHEDULE, nonfinite_guard=False)),
        "backend='renorm'": torch.compile(copy.deepcopy(bn), backend="renorm",
                                          options={"schedule": SCHEDULE}),
    }
    steps = {}
    for name, module in variants.items():
        def step(module: nn.Module = module) -> None:
            x.grad = None
            module(x).backward(grad)

        steps[name] = step
    kernels = {name: _kernels(fn) for name, fn in steps.items() if "compiled" in name or "backend" in name}
    ms = _median_ms(steps, reps)
    peaks = {}
    for name, fn in steps.items():
        x.grad = None  # the step's gradient is counted, not a previous step's being freed
        peaks[name] = _peak_bytes(fn) / 2**20
    return [{"shape": shape, "variant": name, "ms": ms[name], "peak_mb": peaks[name],
             "kernels": kernels.get(name, "-")} for name in steps]


class Block(nn.Module):
    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c if stride == 1 else c // 2, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = None if stride == 1 else nn.Sequential(nn.Conv2d(c // 2, c, 1, stride, bias=False),
                                                           nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layers = nn.Sequential(Block(32), Block(64, 2), Block(128, 2))
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def network_rows(reps: int) -> list[dict]:
    torch.manual_seed(0)
    net = ResNetish()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    variants = {
        "batchnorm eager": net,
        "batchnorm compiled": torch.compile(copy.deepcopy(net)),
        "renormify eager": renormify(net, SCHEDULE),
        "renormify compiled": torch.compile(renormify(net, SCHEDULE)),
        "renormify compiled, no NaN guard": torch.compile(renormify(net, SCHEDULE, nonfinite_guard=False)),
        "backend='renorm'": torch.compile(copy.deepcopy(net), backend="renorm", options={"schedule": SCHEDULE}),
    }
    steps = {}
    for name, module in variants.items():
        def step(module: nn.Module = module) -> None:
            module.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), y).backward()

        steps[name] = step
    ms = _median_ms(steps, reps)
    peaks = {}
    for name, fn in steps.items():
        variants[name].zero_grad(set_to_none=True)
        peaks[name] = _peak_bytes(fn) / 2**20
    return [{"shape": "ResNet-ish 16x3x32x32", "variant": name, "ms": ms[name], "peak_mb": peaks[name],
             "kernels": "-"} for name in steps]


def table(rows: list[dict]) -> str:
    lines = ["| input | variant | ms / step | vs eager BN | vs compiled BN | peak MB | vs BN peak | kernels fwd/bwd |",
             "|---|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        eager = next(r for r in group if r["variant"] == "batchnorm eager")
        comp = next(r for r in group if r["variant"] == "batchnorm compiled")
        for r in group:
            base = comp if ("compiled" in r["variant"] or "backend" in r["variant"]) else eager
            lines.append(
                f"| {shape} | {r['variant']} | {r['ms']:.2f} | {r['ms'] / eager['ms']:.2f}x | "
                f"{r['ms'] / comp['ms']:.2f}x | {r['peak_mb']:.1f} | {r['peak_mb'] / max(base['peak_mb'], 1e-9):.2f}x | "
                f"{r['kernels']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, fewer repetitions")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    reps = 10 if args.quick else 40
    rows = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        rows += layer_rows(shape, reps)
    if not args.quick:
        rows += network_rows(reps // 2)
    out = table(rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32; "
          f"'vs BN peak' compares with eager or compiled batchnorm alike.\n")
    print(out)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
