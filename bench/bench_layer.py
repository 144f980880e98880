"""One normalization layer's training step: renorm vs batchnorm vs an RL-style renorm, eager and compiled.

    python bench/bench_layer.py [--quick] [--shapes mlp,conv,32x64,...] [--dtypes float32,bfloat16]
                                [--json PATH] [--absolute] [--ablations] [--threads 2] [--stat lq|min|median]
    python bench/bench_layer.py --from-json PATH [--stat min] [--absolute]   # re-print a saved run

A step is the layer's training forward (which updates its running statistics) and the
backward of a fixed output gradient, with the input requiring grad (as inside a network).
Variants, all on the same input, each with its own module (its own buffers):

    bn          nn.BatchNorm1d / nn.BatchNorm2d, eager
    bn_c        the same, torch.compile
    renorm      renorm_fx.renormify(bn), eager (defaults: paper schedule, non-finite guard, diagnostics)
    renorm_c    renormify(bn), torch.compile
    backend     torch.compile(bn, backend="renorm")
    rl          bench/rl_style_renorm.py: batch renorm as TorchRL / sb3-contrib write it, eager
    rl_c        the same, torch.compile

``--ablations`` adds ``renorm_ng`` / ``renorm_ng_c``: renormify with ``nonfinite_guard=False``.

Timing: every compiled variant is compiled (and every variant warmed up) before the timed
loop; then the variants run interleaved, round-robin (each round runs every variant once,
in a shuffled order), and each variant's figure is the lower quartile of its per-step times.
Machine load then hits all variants alike, and the quartile discards the slow tail.
Compiled modules use ``dynamic=False, fullgraph=True``, and Dynamo is reset between cases,
so no case runs a dynamic-shape graph or falls back to eager after a recompile limit.

bfloat16: the input is bfloat16 (what a preceding Linear / Conv produces under autocast) and
the layer's forward runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``; parameters
and buffers stay float32. (The RL-style layer's output is float32 there: its float32 ``r``
and ``d`` promote the bfloat16 math, as in the libraries it imitates.)

Table columns: eager variants as a ratio to eager batchnorm, compiled variants to compiled
batchnorm (lower is better, 1.00 = as fast), plus the two baselines in µs, and ``noise``: the
row's largest median / lower quartile. On a shared 2-core machine two OpenMP threads stall
whenever another process holds a core (a parallel region waits for both), so a step can take
100x its quiet time; a noise above ~1.5 says most of that row's steps were hit. ``--threads 1``
is the robust setting there, and ``--stat min`` shows the quiet-machine figures of a run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rl_style_renorm import RLStyleBatchRenorm  # noqa: E402

import renorm_fx  # noqa: E402
from renorm_fx import renormify  # noqa: E402

MLP_SHAPES = [(32, 64), (8, 512), (256, 256), (512, 2048), (4096, 64)]
CONV_SHAPES = [(8, 64, 56, 56), (32, 256, 14, 14)]
QUICK_SHAPES = {"float32": [(32, 64), (32, 256, 14, 14)], "bfloat16": [(32, 64)]}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: (key, column title, baseline key); the baselines are "bn" (eager) and "bn_c" (compiled)
VARIANTS = [
    ("bn", "BN eager", None),
    ("bn_c", "BN compiled", None),
    ("renorm", "renormify", "bn"),
    ("rl", "RL-style", "bn"),
    ("renorm_ng", "renormify no-guard", "bn"),
    ("renorm_c", "renormify comp", "bn_c"),
    ("backend", "backend=renorm", "bn_c"),
    ("rl_c", "RL-style comp", "bn_c"),
    ("renorm_ng_c", "renormify no-guard comp", "bn_c"),
]
TITLES = {k: t for k, t, _ in VARIANTS}
BASELINE = {k: b for k, _, b in VARIANTS}


def build_variants(c: int, conv: bool, ablations: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(c)
    compile_ = lambda m, **kw: torch.compile(m, dynamic=False, fullgraph=True, **kw)  # noqa: E731
    variants = {
        "bn": bn,
        "bn_c": compile_(copy.deepcopy(bn)),
        "renorm": renormify(bn),  # a converted deep copy; bn itself is kept
        "renorm_c": compile_(renormify(bn)),
        "backend": compile_(copy.deepcopy(bn), backend="renorm"),
        "rl": RLStyleBatchRenorm(c, momentum=bn.momentum, eps=bn.eps),
        "rl_c": compile_(RLStyleBatchRenorm(c, momentum=bn.momentum, eps=bn.eps)),
    }
    if ablations:
        variants["renorm_ng"] = renormify(bn, nonfinite_guard=False)
        variants["renorm_ng_c"] = compile_(renormify(bn, nonfinite_guard=False))
    for m in variants.values():
        m.train()
    return variants


def make_step(module: nn.Module, x: torch.Tensor, grads: dict[torch.dtype, torch.Tensor],
              autocast: Optional[torch.dtype]) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(reset, step)``: reset clears the gradients (untimed); step is forward + backward."""
    params = list(module.parameters())
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext

    def reset() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    def step() -> None:
        with ctx():
            y = module(x)
        g = grads.get(y.dtype)
        if g is None:  # first call (warm-up): the output's dtype, e.g. float32 from RL-style under autocast
            g = grads[y.dtype] = grads["base"].to(y.dtype)
        y.backward(g)

    return reset, step


def time_interleaved(steps: dict[str, tuple[Callable[[], None], Callable[[], None]]], warmup: int,
                     budget_s: float, min_iters: int, max_iters: int) -> dict[str, dict]:
    """Warm up every variant, then run them round-robin; per variant the per-step times (s)."""
    for reset, step in steps.values():
        for _ in range(warmup):
            reset()
            step()
    # one calibration round sets the number of rounds to fit the budget
    t0 = time.perf_counter()
    for reset, step in steps.values():
        reset()
        step()
    per_round = time.perf_counter() - t0
    iters = max(min_iters, min(max_iters, int(budget_s / max(per_round, 1e-9))))
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    gc.collect()
    gc.disable()
    try:
        for _ in range(iters):
            rng.shuffle(names)
            for n in names:
                reset, step = steps[n]
                reset()
                t = time.perf_counter()
                step()
                times[n].append(time.perf_counter() - t)
    finally:
        gc.enable()
    out = {}
    for n, ts in times.items():
        q1 = statistics.quantiles(ts, n=4)[0] if len(ts) >= 4 else min(ts)
        out[n] = {"lq_us": q1 * 1e6, "median_us": statistics.median(ts) * 1e6, "min_us": min(ts) * 1e6,
                  "iters": len(ts)}
    return out


def run_case(shape: tuple[int, ...], dtype_name: str, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()  # fresh caches: no recompile limits, no automatic dynamic shapes
    dtype = DTYPES[dtype_name]
    conv = len(shape) == 4
    variants = build_variants(shape[1], conv, args.ablations)
    torch.manual_seed(1)
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).requires_grad_()
    base_grad = torch.randn(shape)
    autocast = dtype if dtype != torch.float32 else None
    steps = {}
    for name, module in variants.items():
        steps[name] = make_step(module, x, {"base": base_grad}, autocast)
    t0 = time.perf_counter()
    for reset, step in steps.values():  # compiles each compiled variant (forward and backward)
        reset()
        step()
    compile_s = time.perf_counter() - t0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if args.quick:
        res = time_interleaved(steps, warmup=2, budget_s=0.5, min_iters=20, max_iters=60)
    else:
        res = time_interleaved(steps, warmup=5, budget_s=args.budget, min_iters=60, max_iters=2000)
    if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
        print(f"  warning: {shape} {dtype_name}: a compiled variant recompiled while being timed", file=sys.stderr)
    return {"shape": list(shape), "dtype": dtype_name, "compile_s": compile_s, "variants": res}


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "mlp":
            shapes += MLP_SHAPES
        elif part == "conv":
            shapes += CONV_SHAPES
        elif part == "all":
            shapes += MLP_SHAPES + CONV_SHAPES
        elif part:
            dims = tuple(int(v) for v in part.split("x"))
            if len(dims) not in (2, 4):
                raise SystemExit(f"--shapes: {part!r} is neither NxC nor NxCxHxW")
            shapes.append(dims)
    return list(dict.fromkeys(shapes))


def fmt_shape(shape: list[int] | tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def table(cases: list[dict], dtype_name: str, absolute: bool, stat: str = "lq") -> str:
    """Ratios (or, ``absolute``, µs) per shape; the last column, ``noise``, is the largest
    median / lower-quartile of the row's variants (near 1: a quiet run; above ~1.5: the
    machine's load reached most steps, so read that row's ratios with care)."""
    key = f"{stat}_us"
    rows = [c for c in cases if c["dtype"] == dtype_name]
    present = [k for k, _, _ in VARIANTS if any(k in c["variants"] for c in rows)]
    ratio_cols = [k for k in present if BASELINE[k]]
    head = ["shape", "BN eager µs", "BN comp µs", "comp/eager"] + [
        f"{TITLES[k]} ÷{'BNc' if BASELINE[k] == 'bn_c' else 'BN'}" for k in ratio_cols]
    if absolute:
        head = ["shape"] + [f"{TITLES[k]} µs" for k in present]
    head.append("noise")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in rows:
        v = c["variants"]
        if absolute:
            cells = [fmt_shape(c["shape"])] + [f"{v[k][key]:.0f}" for k in present]
        else:
            bn, bnc = v["bn"][key], v["bn_c"][key]
            cells = [fmt_shape(c["shape"]), f"{bn:.0f}", f"{bnc:.0f}", f"{bnc / bn:.2f}"]
            cells += [f"{v[k][key] / v[BASELINE[k]][key]:.2f}" for k in ratio_cols]
        cells.append(f"{max(r['median_us'] / r['lq_us'] for r in v.values()):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


STAT_NAMES = {"lq": "lower quartile", "min": "minimum", "median": "median"}


def print_tables(cases: list[dict], dtypes: list[str], absolute: bool, stat: str) -> None:
    for d in dtypes:
        if not any(c["dtype"] == d for c in cases):
            continue
        label = "float32" if d == "float32" else f"{d} input, torch.autocast('cpu', dtype=torch.{d})"
        print(f"### {label}: eager ÷ eager BN, compiled ÷ compiled BN ({STAT_NAMES[stat]})\n")
        print(table(cases, d, absolute=False, stat=stat) + "\n")
        if absolute:
            print(f"### {label}: µs per step ({STAT_NAMES[stat]})\n")
            print(table(cases, d, absolute=True, stat=stat) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few shapes, few iterations")
    parser.add_argument("--shapes", help="comma-separated: mlp, conv, all, or NxC / NxCxHxW (default: all)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--bf16-shapes", default="mlp",
                        help="shapes run in bfloat16 when --shapes is not given (default: mlp)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per case (default 4)")
    parser.add_argument("--ablations", action="store_true", help="add renormify with nonfinite_guard=False")
    parser.add_argument("--absolute", action="store_true", help="also print every variant's µs")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", help="save the results to this file")
    parser.add_argument("--stat", choices=sorted(STAT_NAMES), default="lq",
                        help="statistic of the tables (default lq, the lower quartile; all three are in --json)")
    parser.add_argument("--from-json", metavar="PATH", help="print the tables of a saved run instead of running")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(f"{args.from_json}: {saved['meta']}\n")
        cases = saved["cases"]
        print_tables(cases, list(dict.fromkeys(c["dtype"] for c in cases)), args.absolute, args.stat)
        return
    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown {d!r} (float32, bfloat16)")
    plan = []
    for d in dtypes:
        if args.shapes:
            shapes = parse_shapes(args.shapes)
        elif args.quick:
            shapes = QUICK_SHAPES[d]
        else:
            shapes = parse_shapes("all" if d == "float32" else args.bf16_shapes)
        plan += [(s, d) for s in shapes]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}; {STAT_NAMES[args.stat]} of interleaved steps (forward + backward + "
          f"running-stat update).\nrenorm_fx {renorm_fx.__version__} from {os.path.dirname(renorm_fx.__file__)}",
          flush=True)
    cases = []
    t_start = time.perf_counter()
    for shape, d in plan:
        t0 = time.perf_counter()
        case = run_case(shape, d, args)
        cases.append(case)
        n = next(iter(case["variants"].values()))["iters"]
        print(f"  {d} {fmt_shape(shape)}: compile+first step {case['compile_s']:.1f}s, {n} rounds, "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        if args.json:  # saved as it goes: a long run that is stopped keeps its finished cases
            save(args, cases, partial=True)
    print(f"total {time.perf_counter() - t_start:.0f}s, load average {os.getloadavg()[0]:.2f}\n")
    print_tables(cases, dtypes, args.absolute, args.stat)
    if args.json:
        save(args, cases, partial=False)
        print(f"saved {args.json}")


def save(args: argparse.Namespace, cases: list[dict], partial: bool) -> None:
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
            "argv": sys.argv[1:], "renorm_fx": os.path.dirname(renorm_fx.__file__), "partial": partial,
            "statistics": "lq_us / median_us / min_us of interleaved per-step times",
            "load_average": os.getloadavg()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
