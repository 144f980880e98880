"""Whole networks: a compiled renorm training step against a compiled batchnorm step.

    python bench/bench_networks.py [--threads 1] [--iters 40]

Networks: a ResNet-18-style CNN (BasicBlocks [2, 2, 2, 2], 64 px, batch 8 and 32, SGD) and a
CrossQ-style critic (Linear-BN-ReLU x 2 + head, widths 256 and 2048, joint batch 512, Adam).
Variants: ``torch.compile`` of the batchnorm network, of ``renormify(network)`` (defaults:
non-finite guard and diagnostics on) and of the batchnorm network with ``backend="renorm"``.
Per network and variant: the first compiled step (compile included, Inductor's caches off, so
every variant compiles from scratch), the step time (interleaved rounds, lower quartile), and
the activation memory a step keeps for its backward (bytes of the distinct storages autograd
saved: what differs between the variants; CPU has no allocator statistics). Ratios against
the batchnorm variant, side by side in one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # every first compile is a cold one

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import BasicBlock, interleaved  # noqa: E402

from renorm_fx import RenormSchedule, renormify  # noqa: E402

SCHEDULE = RenormSchedule.paper(warmup=5, r_max_at=40, d_max_at=25)  # the bounds move during the run


class ResNet18(nn.Module):
    """ResNet-18's layout (torchvision's, without the download), 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Critic(nn.Module):
    def __init__(self, width: int, inputs: int = 20) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, width), nn.BatchNorm1d(width, momentum=0.01), nn.ReLU(),
                                 nn.Linear(width, width), nn.BatchNorm1d(width, momentum=0.01), nn.ReLU(),
                                 nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def _saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of the distinct storages autograd saves for the backward during one step."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _stepper(model: nn.Module, compiled: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> Callable[[], None]:
    opt = (torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if kind == "cnn"
           else torch.optim.Adam(model.parameters(), lr=1e-4))

    def step() -> None:
        out = compiled(x)
        loss = F.cross_entropy(out, y) if kind == "cnn" else (out - y).square().mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    return step


def bench(name: str, make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, kind: str, iters: int) -> None:
    torch.manual_seed(0)
    base = make()
    variants = {"batchnorm": (base, {}), "renormify": (renormify(base, SCHEDULE), {}),
                "backend=renorm": (make(), {"backend": "renorm", "options": {"schedule": SCHEDULE}})}
    variants["backend=renorm"][0].load_state_dict(base.state_dict())
    steps, first = {}, {}
    for key, (model, kwargs) in variants.items():
        torch._dynamo.reset()
        step = _stepper(model, torch.compile(model, **kwargs), x, y, kind)
        start = time.perf_counter()
        step()
        first[key] = time.perf_counter() - start
        steps[key] = step
    memory = {k: _saved_bytes(s) for k, s in steps.items()}
    lq = interleaved(steps, iters, warmup=0)
    b = "batchnorm"
    for key in ("renormify", "backend=renorm"):
        print(f"| {name} | {key} | {lq[b] * 1e3:.2f} ms | {lq[key] / lq[b]:.2f}x | {memory[b] / 2**20:.1f} MiB | "
              f"{memory[key] / memory[b]:.2f}x | {first[b]:.1f} s | {first[key] / first[b]:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--only", choices=("cnn", "critic", "all"), default="all")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); compiled step vs compiled batchnorm\n")
    warm = torch.compile(nn.Linear(2, 2))  # the process's one-time compiler start-up, charged to nobody
    warm(torch.randn(1, 2)).sum().backward()
    print("| network | variant | BN step | step ÷ BN | BN saved activations | ÷ BN | BN first compile | ÷ BN |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    if args.only in ("cnn", "all"):
        for batch in (8, 32):
            x = torch.randn(batch, 3, 64, 64, generator=g)
            y = torch.randint(0, 10, (batch,), generator=g)
            bench(f"ResNet-18 style, batch {batch}", ResNet18, x, y, "cnn", args.iters)
    if args.only in ("critic", "all"):
        for width in (256, 2048):
            x, y = torch.randn(512, 20, generator=g), torch.randn(512, generator=g)
            bench(f"CrossQ critic, width {width}", lambda w=width: Critic(w), x, y, "critic", args.iters)


if __name__ == "__main__":
    main()
