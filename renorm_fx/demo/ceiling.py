"""Where renorm's gain ends: the 1-class regime, with and without renorm's stop-gradient on r and d.

    python -m renorm_fx.demo.ceiling                     # seeds 0 1 2, the test split, eager
    python -m renorm_fx.demo.ceiling --seeds 0 --validation

Every batch holds one class. Renorm's forward pass then matches inference (once the clip
opens, few channels are clipped), but ``r`` and ``d`` are constants of the backward pass:
the gradient still flows through the batch's own mean and deviation, as batchnorm's does,
and with one class per batch that removes the part of it that would separate the classes
in the layers below each normalization. This script trains, on the same batches from the
same initial weights, with each method's default recipe (renorm's for the variants):

- ``batchnorm`` and ``renorm`` (the demo's two methods);
- ``renorm, (3, 5) from step 0``: no batchnorm warm-up, the clip open from the start;
- ``renorm, gradient through r and d``: the same equations and schedule, ``r`` and ``d``
  not detached, so an unclipped channel's gradient is that of normalizing by the moving
  statistics, the gradient of inference (a diagnostic, not a method: the paper detaches
  them because training on it alone is unstable); ``same, never clipped``: that from step 0;
- ``no normalization``: the network with every batch-norm removed (what SGD alone gets
  from 1-class batches).

If the stop-gradient is what caps renorm, the third variant gets well above renorm. Each
model is evaluated twice: with its moving statistics (as deployed, the demo's number), and
with every normalization's statistics re-estimated on the whole training set (layer by
layer, in eval mode: the population statistics, "precise BN"), which separates what the
weights learned from what the moving averages hold at the end.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import RenormSchedule, count_updates
from .config import DEFAULT_RECIPES, Recipe
from .data import REGIMES, Digits, batch_stream, load_digits_split
from .model import build_model, initial_state, make_optimizer
from .training import read_diagnostics, torch_threads

__all__ = ["FullGradientRenorm", "VARIANTS", "run_ceiling", "main"]


class FullGradientRenorm(nn.Module):
    """Batch renorm (the paper's equations, sigma averaged) with ``r`` and ``d`` left in the gradient.

    Wraps a batch-norm's parameters and buffers; eval mode is the batch-norm's inference.
    The step is ``self.step``, advanced by the training loop once per optimizer step.
    """

    def __init__(self, bn: _BatchNorm, schedule: RenormSchedule, alpha: float) -> None:
        super().__init__()
        self.bn, self.schedule, self.alpha, self.step = bn, schedule, alpha, 0

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        if not self.training:
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        mu_b = x.mean(dims)
        sigma_b = torch.sqrt(x.var(dims, unbiased=False) + bn.eps)
        sigma = torch.sqrt(bn.running_var + bn.eps)
        r_max, d_max = _bounds(self.schedule, self.step)
        r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)  # not detached
        d = torch.clamp((mu_b - bn.running_mean) / sigma, -d_max, d_max)
        x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
        with torch.no_grad():
            bn.running_mean.add_(self.alpha * (mu_b - bn.running_mean))
            new_sigma = sigma + self.alpha * (sigma_b - sigma)
            bn.running_var.copy_((new_sigma * new_sigma - bn.eps).clamp_min(0))
        return x_hat * bn.weight.view(shape) + bn.bias.view(shape)


_BOUNDS: dict[tuple[int, int], tuple[float, float]] = {}


def _bounds(schedule: RenormSchedule, step: int) -> tuple[float, float]:
    key = (id(schedule), step)
    if key not in _BOUNDS:
        _BOUNDS[key] = schedule.at(step)
    return _BOUNDS[key]


def _replace_batch_norms(model: nn.Module, make: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(model, name, make(child))
        else:
            _replace_batch_norms(child, make)
    return model


#: name -> (kind, schedule): kind is "batchnorm", "renorm", "full" (FullGradientRenorm) or "none"; the
#: schedule None is the recipe's (renorm's: batchnorm for 10 %, then the paper's ramp).
NO_CLIP = ("constant", float("inf"), float("inf"))
VARIANTS: dict[str, tuple[str, Optional[tuple]]] = {
    "batchnorm": ("batchnorm", None),
    "renorm": ("renorm", None),
    "renorm, (3, 5) from step 0": ("renorm", ("switch", 0)),
    "renorm, gradient through r and d": ("full", None),
    "same, never clipped": ("full", NO_CLIP),
    "no normalization": ("none", None),
}


def _schedule(recipe: Recipe, spec: Optional[tuple]) -> RenormSchedule:
    if spec is None:
        return recipe.schedule()
    return getattr(RenormSchedule, spec[0])(*spec[1:])


def _build(variant: str, recipe: Recipe, seed: int) -> nn.Module:
    """The variant's model, from seed ``seed``'s initial weights (the same as the demo's)."""
    kind, spec = VARIANTS[variant]
    if kind in ("batchnorm", "renorm"):
        model = build_model(kind, _schedule(recipe, spec) if kind == "renorm" else None, recipe.momentum)
        model.load_state_dict(initial_state(seed))
        return model
    model = build_model("batchnorm", None, recipe.momentum)
    model.load_state_dict(initial_state(seed))
    if kind == "none":
        return _replace_batch_norms(model, lambda bn: nn.Identity())
    schedule = _schedule(recipe, spec)
    return _replace_batch_norms(model, lambda bn: FullGradientRenorm(bn, schedule, recipe.momentum))


def train_variant(variant: str, recipe: Recipe, seed: int, data: Digits,
                  regime: str = "1-class") -> tuple[float, float, str]:
    """Train one variant on ``regime`` from seed ``seed``'s initial weights; its eval accuracy with the moving
    statistics and with the population statistics, and a note."""
    model = _build(variant, recipe, seed)
    optimizer = make_optimizer(model, recipe.lr)
    if VARIANTS[variant][0] == "renorm":
        count_updates(model, optimizer)
    full = [m for m in model.modules() if isinstance(m, FullGradientRenorm)]
    stream = batch_stream(REGIMES[regime], data.y_train, torch.Generator().manual_seed(seed))
    model.train()
    for step in range(1, recipe.steps + 1):
        indices = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.x_train[indices]), data.y_train[indices]).backward()
        optimizer.step()
        for m in full:
            m.step += 1
    note = ""
    if VARIANTS[variant][0] == "renorm":
        d = read_diagnostics(model, recipe.steps)
        note = f"last step: {d.clipped:.0%} of channels clipped, r in [{d.r_low:.2f}, {d.r_high:.2f}], " \
               f"d in [{d.d_low:.2f}, {d.d_high:.2f}]"
    return _accuracy(model, data), _accuracy(population_statistics(model, data), data), note


def _accuracy(model: nn.Module, data: Digits) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data.x_test).argmax(1) == data.y_test).float().mean().item()


def _norm_sites(model: nn.Module) -> list[tuple[nn.Module, _BatchNorm]]:
    """(module called, batch-norm holding the statistics) for every normalization, in call order."""
    wrapped = {id(m.bn) for m in model.modules() if isinstance(m, FullGradientRenorm)}
    sites = [(m, m.bn) if isinstance(m, FullGradientRenorm) else (m, m) for m in model.modules()
             if isinstance(m, FullGradientRenorm) or (isinstance(m, _BatchNorm) and id(m) not in wrapped)]
    return sites


def population_statistics(model: nn.Module, data: Digits) -> nn.Module:
    """A copy of ``model`` whose normalizations use the mean and variance of their input over the whole
    training set (eval mode, estimated layer by layer in call order)."""
    model = copy.deepcopy(model).eval()
    for called, bn in _norm_sites(model):
        seen: list[Tensor] = []
        handle = called.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        with torch.no_grad():
            model(data.x_train)
        handle.remove()
        x = seen[0]
        dims = [0, *range(2, x.dim())]
        bn.running_mean.copy_(x.mean(dims))
        bn.running_var.copy_(x.var(dims, unbiased=False))
    return model


def run_ceiling(seeds: Sequence[int], validation: bool = False, regime: str = "1-class") -> dict[str, list[tuple[float, float]]]:
    data = load_digits_split(validation=validation)
    out: dict[str, list[tuple[float, float]]] = {}
    for variant in VARIANTS:
        recipe = DEFAULT_RECIPES["batchnorm" if VARIANTS[variant][0] == "batchnorm" else "renorm"]
        for seed in seeds:
            moving, population, note = train_variant(variant, recipe, seed, data, regime)
            out.setdefault(variant, []).append((moving, population))
            print(f"{regime} {variant:34s} seed {seed}: {data.test_name} accuracy {moving:.3f} "
                  f"(population statistics {population:.3f})" + (f"  {note}" if note else ""), flush=True)
    print(f"\n{regime}, {data.test_name} accuracy in eval mode, seeds {list(seeds)} "
          f"(recipes: {'; '.join(f'{m}: {r.describe(m)}' for m, r in DEFAULT_RECIPES.items())}):")
    print(f"  {'':34s} {'moving statistics':>22s}   {'population statistics':>22s}")
    for variant, values in out.items():
        cells = []
        for column in zip(*values):
            std = statistics.stdev(column) if len(column) > 1 else 0.0
            cells.append(f"{statistics.fmean(column):.3f} ± {std:.3f}")
        print(f"  {variant:34s} {cells[0]:>22s}   {cells[1]:>22s}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m renorm_fx.demo.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--validation", action="store_true", help="the validation split instead of the test set")
    parser.add_argument("--regime", default="1-class", choices=list(REGIMES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        run_ceiling(args.seeds, args.validation, args.regime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
