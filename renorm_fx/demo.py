"""A short end-to-end run: renormify a small CNN, train it, show the graph and the bounds.

    python -m renorm_fx.demo
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from . import RenormSchedule, bounds, renormify


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def make_data(n: int, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 8x8 images of class-specific stripes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    base = torch.zeros(classes, 1, 8, 8)
    for c in range(classes):
        base[c, 0, c * 2: c * 2 + 2, :] = 1.0
    return base[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=g), y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    schedule = RenormSchedule.paper(warmup=10, r_max_at=40, d_max_at=30)
    model = renormify(SmallCNN(), schedule)
    print(schedule)
    print("\nThe rewritten training graph of bn1 (print(model.code) shows all of it):")
    print("\n".join(line for line in model.code.splitlines() if "bn1_" in line))
    x, y = make_data(512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(args.steps):
        idx = torch.randint(len(x), (4,))  # micro-batches of 4
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}  bounds {bounds(model)['bn1']}")
    model.eval()
    xt, yt = make_data(256, seed=1)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"\neval accuracy after {args.steps} steps: {acc:.3f}")


if __name__ == "__main__":
    main()
