"""What the benchmarks share: interleaved timing, and a ResNet basic block."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["interleaved", "BasicBlock"]


def interleaved(steps: dict[str, Callable[[], None]], iters: int, warmup: int = 3,
                stat: str = "lq") -> dict[str, float]:
    """Seconds per call of each step, the steps run round-robin (load on the machine hits all
    alike); ``stat``: ``"lq"`` (lower quartile, the default: this 2-core machine is shared) or
    ``"median"``."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    pick = (lambda v: statistics.quantiles(v, n=4)[0]) if stat == "lq" else statistics.median
    return {k: pick(v) for k, v in times.items()}


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU, conv-BN, plus the (projected) input, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))
