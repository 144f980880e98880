"""Where a renorm layer's training step spends its time, eager and compiled, against batchnorm's.

    python bench/profile_layer.py [--quick] [--shapes 32x64,32x256x14x14] [--rows 15]

For each shape (default: the MLP shape 32x64 and the conv shape 32x256x14x14):

1. Eager: ``renormify(bn)``'s training step (forward + backward) under ``torch.profiler``,
   the top ops by self CPU time (and batchnorm's, shorter, for comparison), with the
   number of ops each step dispatches (forward: top-level aten ops; backward: autograd nodes).
2. Compiled: the C++ kernels Inductor generates for the forward and the backward of
   ``renormify(bn)``, ``torch.compile(bn, backend="renorm")``, the RL-style layer
   (bench/rl_style_renorm.py) and batchnorm (counted as ``cpp_pybinding(`` in each generated
   module, as tests/test_compile.py does). The generated code is saved to
   ``bench/out/code_<shape>_<variant>_{fwd,bwd}.py`` (``<shape>_t<n>`` with ``--threads n`` other
   than 2) so it can be diffed, e.g.
   ``diff bench/out/code_32x64_bn_c_fwd.py bench/out/code_32x64_renorm_c_fwd.py``.
3. Compiled steps profiled too (top ops by self CPU time): at small shapes what is left is
   the compiled wrappers' own overhead.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rl_style_renorm import RLStyleBatchRenorm  # noqa: E402

import renorm_fx  # noqa: E402
from renorm_fx import renormify  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
DEFAULT_SHAPES = "32x64,32x256x14x14"


def make_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        y = module(x)
        y.backward(grad if grad.dtype == y.dtype else grad.to(y.dtype))

    return step


def _op_counts(prof: profile, steps: int) -> tuple[float, float]:
    """Per step: aten ops called directly by the step's forward, and autograd nodes run by its backward."""
    fwd = bwd = 0
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("autograd::engine::evaluate_function"):
            bwd += 1
        elif parent is not None and parent.name == "step" and e.name.startswith("aten::"):
            fwd += 1
    return fwd / steps, bwd / steps


def profile_step(step: Callable[[], None], steps: int, rows: int, title: str) -> None:
    for _ in range(10):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps * 1e6
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("step"):
                step()
    fwd, bwd = _op_counts(prof, steps)
    print(f"\n#### {title}: {wall:.0f} µs/step unprofiled; per step {fwd:.0f} top-level forward ops, "
          f"{bwd:.0f} backward autograd nodes ({steps} steps profiled)\n")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    print(table)


def compiled_variants(c: int, conv: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(c)
    comp = lambda m, **kw: torch.compile(m, dynamic=False, fullgraph=True, **kw)  # noqa: E731
    return {
        "bn_c": comp(copy.deepcopy(bn)),
        "renorm_c": comp(renormify(bn)),
        "renorm_ng_c": comp(renormify(bn, nonfinite_guard=False)),
        "backend": comp(copy.deepcopy(bn), backend="renorm"),
        "rl_c": comp(RLStyleBatchRenorm(c, momentum=bn.momentum, eps=bn.eps)),
    }


def kernel_report(shape: tuple[int, ...], x: torch.Tensor, grad: torch.Tensor) -> dict[str, nn.Module]:
    tag = "x".join(map(str, shape))
    if torch.get_num_threads() != 2:  # single-threaded code has no OpenMP regions: keep it apart
        tag += f"_t{torch.get_num_threads()}"
    variants = compiled_variants(shape[1], len(shape) == 4)
    print(f"\n#### compiled, {tag}: Inductor C++ kernels (cpp_pybinding) per generated module\n")
    print("| variant | kernels fwd | kernels bwd | omp for / omp single fwd | bwd | generated code (bench/out/) |")
    print("|---|---|---|---|---|---|")
    os.makedirs(OUT, exist_ok=True)
    for name, module in variants.items():
        torch._dynamo.reset()
        _, codes = run_and_get_code(make_step(module, x, grad))
        counts, files, omp = [], [], []
        for part, code in zip(("fwd", "bwd", "extra"), codes):
            counts.append(code.count("cpp_pybinding("))
            # worksharing loops and single-thread regions: each ends in a barrier of the thread team
            omp.append(f"{code.count('#pragma omp for')} / {code.count('#pragma omp single')}")
            path = os.path.join(OUT, f"code_{tag}_{name}_{part}.py")
            with open(path, "w") as f:
                f.write(code)
            files.append(os.path.basename(path))
        cells = [str(n) for n in counts] + ["-"] * (2 - len(counts))
        omp += ["-"] * (2 - len(omp))
        print(f"| {name} | {cells[0]} | {cells[1]} | {omp[0]} | {omp[1]} | {', '.join(files)} |")
        names = [re.findall(r"^(\w+) = async_compile\.cpp_pybinding\(", code, re.M) for code in codes]
        if any(names):
            print(f"|  | {' '.join(names[0])} | {' '.join(names[1]) if len(names) > 1 else ''} | | | |")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer profiled steps")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated NxC / NxCxHxW (default {DEFAULT_SHAPES})")
    parser.add_argument("--rows", type=int, default=15, help="rows of the renorm profile tables")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--no-compiled", action="store_true", help="only the eager profiles")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, "
          f"renorm_fx from {os.path.dirname(renorm_fx.__file__)}")
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.strip().split("x"))
        conv = len(shape) == 4
        steps = (5 if args.quick else 20) if conv else (20 if args.quick else 200)
        torch.manual_seed(1)
        x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
        grad = torch.randn(shape)
        print(f"\n### {'x'.join(map(str, shape))} float32 ({'BatchNorm2d' if conv else 'BatchNorm1d'})")
        bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(shape[1])
        profile_step(make_step(renormify(bn), x, grad), steps, args.rows, "eager renormify(bn)")
        profile_step(make_step(bn, x, grad), steps, 10, "eager nn.BatchNorm (reference)")
        profile_step(make_step(RLStyleBatchRenorm(shape[1], momentum=0.1), x, grad), steps, 10,
                     "eager RL-style renorm (reference)")
        if args.no_compiled:
            continue
        variants = kernel_report(shape, x, grad)
        for name in ("renorm_c", "backend", "bn_c"):
            profile_step(make_step(variants[name], x, grad), steps, 10, f"compiled {name}")


if __name__ == "__main__":
    main()
