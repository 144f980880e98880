"""Small batches: virtual batches vs gradient accumulation, and the CrossQ critic step.

    python bench/bench_small_batches.py            # both parts (~10 min on 2 CPU cores: compiles)
    python bench/bench_small_batches.py --part virtual|critic [--quick]

Ratios side by side in one process; variants interleaved (each timed iteration runs every
variant once) and summarized by their lower quartile, since this 2-core machine is shared.

1. Virtual batches, compiled: one training step (forward, backward, SGD) on 32 examples with
   ``virtual_batch_size`` 4 and 2, against an ordinary compiled renorm step on the same 32
   examples, and against the gradient-accumulation equivalent (8 or 16 forwards and
   backwards of 4 or 2 examples, one optimizer step).
2. The CrossQ critic step (Linear-BN-ReLU x 2 + head, joint forward of 2 x 256 transitions,
   Adam): ``renormify``'s critic vs the same critic with ``nn.BatchNorm1d`` and with a
   hand-written renorm layer in the RL libraries' style (``bench/rl_style_renorm.py``),
   eager and compiled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved  # noqa: E402
from rl_style_renorm import RLStyleBatchRenorm  # noqa: E402

from renorm_fx import RenormSchedule, count_updates, renormify  # noqa: E402

CLIP = RenormSchedule.constant(3.0, 5.0)


# ---- 1. virtual batches --------------------------------------------------------------------


def _net(shape: tuple[int, ...]) -> nn.Module:
    c = shape[1]
    if len(shape) == 4:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
    return nn.Sequential(nn.Linear(c, c, bias=False), nn.BatchNorm1d(c), nn.ReLU())


def _sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, micro: int) -> Callable[[], None]:
    chunks = x.split(micro)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        for chunk in chunks:
            model(chunk).square().mean().backward()
        opt.step()

    return step


def bench_virtual(quick: bool) -> None:
    shapes = [(32, 64, 16, 16), (32, 256)] if not quick else [(32, 256)]
    print("\n## Virtual batches, compiled: time per 32-example training step\n")
    print("| input | ordinary renorm | virtual 4 | virtual 2 | accumulate 8 x 4 | accumulate 16 x 2 |"
          " virtual 4 / accumulate | virtual 2 / accumulate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        torch.manual_seed(0)
        x = torch.randn(shape)
        steps = {}
        for name, vbs, micro in (("ordinary", None, 32), ("virtual4", 4, 32), ("virtual2", 2, 32),
                                 ("accum4", None, 4), ("accum2", None, 2)):
            model = renormify(_net(shape), CLIP, virtual_batch_size=vbs)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            steps[name] = _sgd_step(torch.compile(model), opt, x, micro)
        t = interleaved(steps, 15 if quick else 60)
        base = t["ordinary"]
        print(f"| {shape} | {base * 1e3:.2f} ms | {t['virtual4'] / base:.2f}x | {t['virtual2'] / base:.2f}x | "
              f"{t['accum4'] / base:.2f}x | {t['accum2'] / base:.2f}x | {t['virtual4'] / t['accum4']:.2f} | "
              f"{t['virtual2'] / t['accum2']:.2f} |", flush=True)


# ---- 2. the CrossQ critic ------------------------------------------------------------------


def critic(width: int, norm: Callable[[int], nn.Module], inputs: int = 20) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), norm(width), nn.ReLU(),
                         nn.Linear(width, width), norm(width), nn.ReLU(), nn.Linear(width, 1))


def _critic_step(model: nn.Module, compiled: bool, x: torch.Tensor, tie: bool) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if tie:
        count_updates(model, opt)
    run = torch.compile(model) if compiled else model
    target = torch.zeros(x.shape[0] // 2)

    def step() -> None:
        q, q_next = run(x).squeeze(1).chunk(2)  # the joint forward of (s, a) and (s', a')
        loss = (q - (target + 0.99 * q_next.detach())).square().mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    return step


def bench_critic(quick: bool) -> None:
    print("\n## CrossQ critic step (joint batch 512, Adam): time per update\n")
    print("| width | mode | nn.BatchNorm1d | renormify | RL-style renorm | renormify / BN | renormify / RL-style |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for width in ((256,) if quick else (256, 2048)):
        torch.manual_seed(0)
        x = torch.randn(512, 20)
        for compiled in (False, True):
            base = critic(width, lambda c: nn.BatchNorm1d(c, momentum=0.01))
            steps = {
                "bn": _critic_step(base, compiled, x, False),
                "renorm": _critic_step(renormify(base, CLIP, momentum=0.01), compiled, x, True),
                "rl": _critic_step(critic(width, lambda c: RLStyleBatchRenorm(c, 0.01, r_max=3.0, d_max=5.0)),
                                   compiled, x, False),
            }
            t = interleaved(steps, 15 if quick else 80)
            print(f"| {width} | {'compiled' if compiled else 'eager'} | {t['bn'] * 1e3:.3f} ms | "
                  f"{t['renorm'] * 1e3:.3f} ms | {t['rl'] * 1e3:.3f} ms | {t['renorm'] / t['bn']:.2f} | "
                  f"{t['renorm'] / t['rl']:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("virtual", "critic", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="one shape, few iterations (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    if args.part in ("virtual", "all"):
        bench_virtual(args.quick)
    if args.part in ("critic", "all"):
        bench_critic(args.quick)


if __name__ == "__main__":
    main()
