"""The clip schedule: r_max and d_max as sympy expressions of the training step.

A schedule is an ``nn.Module`` with no state: calling it on a step *tensor*
returns ``(r_max, d_max)`` as 0-d tensors, so the bounds enter a graph as
values computed at run time from the step, never as Python constants. A
schedule that changes every step therefore never recompiles a compiled graph.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import sympy
import torch
from torch import Tensor, nn

__all__ = ["RenormSchedule", "step"]

#: The one free symbol a schedule expression may use.
step = sympy.Symbol("step", integer=True, nonnegative=True)

_Expr = Union[sympy.Expr, float, int, str]
_Fn = Callable[[Tensor], Union[Tensor, float]]

# Steps at which a symbolic schedule is checked for valid bounds at construction.
_CHECK_STEPS = (0, 1, 10, 100, 1_000, 5_000, 10_000, 25_000, 40_000, 100_000, 10**6, 10**7)


def _sympify(name: str, value: _Expr) -> sympy.Expr:
    expr = sympy.sympify(value)
    # Accept any symbol *named* "step" (users build them with sympy.Symbol("step")).
    for sym in expr.free_symbols:
        if sym.name != "step":
            raise ValueError(
                f"RenormSchedule: {name} = {expr} uses the symbol {sym.name!r}; a schedule may "
                f"only depend on 'step' (renorm_fx.schedule.step)."
            )
        expr = expr.subs(sym, step)
    return expr


def _source(expr: sympy.Expr) -> str:
    """Python source computing ``expr`` from ``s``, a float64 step tensor (constants inline)."""
    if not expr.free_symbols:
        return repr(float(expr)) if float(expr) not in (math.inf, -math.inf) else f"{'-' if expr < 0 else ''}math.inf"
    if expr == step:
        return "s"
    if isinstance(expr, sympy.Piecewise):
        body = "s.new_full((), math.nan)"
        for value, cond in reversed(expr.args):
            v = _tensor_source(value)
            body = v if cond is sympy.true else f"torch.where({_source(cond)}, {v}, {body})"
        return body
    src = [_source(a) for a in expr.args]
    if isinstance(expr, sympy.Add):
        return "(" + " + ".join(src) + ")"
    if isinstance(expr, sympy.Mul):
        return "(" + " * ".join(src) + ")"
    if isinstance(expr, sympy.Pow):
        return f"({src[0]} ** {src[1]})"
    if isinstance(expr, (sympy.Min, sympy.Max)):
        bound = [a for a in expr.args if not a.free_symbols]
        out = [x for a, x in zip(expr.args, src) if a.free_symbols]
        pick = "torch.minimum" if isinstance(expr, sympy.Min) else "torch.maximum"
        body = out[0]
        for other in out[1:]:
            body = f"{pick}({body}, {other})"
        if bound:  # Min(3, x) -> clamp(x, max=3.0)
            return f"torch.clamp({body}, {'max' if isinstance(expr, sympy.Min) else 'min'}={_source(bound[0])})"
        return body
    relations = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
                 sympy.GreaterThan: ">="}
    if type(expr) in relations:
        return f"({src[0]} {relations[type(expr)]} {src[1]})"
    name = type(expr).__name__.lower()
    if len(src) == 1 and hasattr(torch, name):  # exp, log, sqrt, tanh, cos, ...
        return f"torch.{name}({_tensor_source(expr.args[0])})"
    raise NotImplementedError(f"RenormSchedule: cannot evaluate {expr} on tensors ({type(expr).__name__})")


def _tensor_source(expr: sympy.Expr) -> str:
    src = _source(expr)
    return src if expr.free_symbols else f"s.new_full((), {src})"


def _compile(expr: sympy.Expr) -> _Fn:
    """Turn a sympy expression of ``step`` into one flat function of a float64 step tensor.

    Generated source with the constants inline, so that Dynamo traces (and guards) one plain
    function of tensor arithmetic, not a tree of closures.
    """
    source = f"def schedule(s):\n    return {_source(expr)}\n"
    namespace: dict = {"torch": torch, "math": math}
    exec(compile(source, f"<renorm schedule: {expr}>", "exec"), namespace)
    fn = namespace["schedule"]
    fn.source = source
    return fn


class RenormSchedule(nn.Module):
    """Clip bounds ``r_max(step)`` and ``d_max(step)`` for batch renorm.

    ``step`` counts a layer's training forwards (its ``num_batches_tracked``) before
    the current one. ``r_max >= 1`` and ``d_max >= 0`` at every step; ``oo`` (or
    ``float('inf')``) means no clip. ``r_max = 1, d_max = 0`` is exactly batchnorm.

    >>> s = RenormSchedule.paper()
    >>> s.at(25000)
    (2.142857142857143, 5.0)
    """

    def __init__(self, r_max: _Expr, d_max: _Expr) -> None:
        super().__init__()
        self.r_max = _sympify("r_max", r_max)
        self.d_max = _sympify("d_max", d_max)
        self._build()
        self._validate()

    def _build(self) -> None:
        self._r_fn = _compile(self.r_max)
        self._d_fn = _compile(self.d_max)
        # eager, on the host: the bounds as Python floats of an int step
        r_host, d_host = (sympy.lambdify(step, e, modules="math") for e in (self.r_max, self.d_max))
        self._host = lambda at: (float(r_host(at)), float(d_host(at)))

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def paper(
        cls,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup: int = 5000,
        r_max_at: int = 40000,
        d_max_at: int = 25000,
    ) -> "RenormSchedule":
        """The paper's schedule: batchnorm (1, 0) for ``warmup`` steps, then linear ramps
        reaching ``r_max`` at step ``r_max_at`` and ``d_max`` at step ``d_max_at``."""
        if not warmup < r_max_at or not warmup < d_max_at:
            raise ValueError(
                f"RenormSchedule.paper: warmup ({warmup}) must come before r_max_at ({r_max_at}) "
                f"and d_max_at ({d_max_at})."
            )
        r_ramp = 1 + (sympy.nsimplify(r_max) - 1) * (step - warmup) / (r_max_at - warmup)
        d_ramp = sympy.nsimplify(d_max) * (step - warmup) / (d_max_at - warmup)
        return cls(
            sympy.Min(sympy.nsimplify(r_max), sympy.Max(1, r_ramp)),
            sympy.Min(sympy.nsimplify(d_max), sympy.Max(0, d_ramp)),
        )

    @classmethod
    def switch(cls, warmup: int, r_max: float = 3.0, d_max: float = 5.0) -> "RenormSchedule":
        """The RL libraries' schedule (CrossQ; TorchRL's, sb3-contrib's and sbx's ``BatchRenorm``):
        batchnorm ``(1, 0)`` for steps ``< warmup``, then ``(r_max, d_max)`` at once."""
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"RenormSchedule.switch: warmup must be a non-negative int, got {warmup!r}")
        conv = lambda v: sympy.oo if v == math.inf else sympy.nsimplify(v)  # noqa: E731
        after_r, after_d = conv(r_max), conv(d_max)
        return cls(sympy.Piecewise((1, step < warmup), (after_r, True)),
                   sympy.Piecewise((0, step < warmup), (after_d, True)))

    @classmethod
    def constant(cls, r_max: float, d_max: float) -> "RenormSchedule":
        """Fixed bounds; ``float('inf')`` means no clip. ``constant(1, 0)`` is batchnorm."""
        conv = lambda v: sympy.oo if v == math.inf else sympy.nsimplify(v)  # noqa: E731
        for name, v in (("r_max", r_max), ("d_max", d_max)):
            if not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"RenormSchedule.constant: {name} must be a number, got {v!r}")
        return cls(conv(r_max), conv(d_max))

    # ---- evaluation ---------------------------------------------------------------
    def at(self, at_step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` at an integer step, evaluated exactly by sympy."""
        return float(self.r_max.subs(step, at_step)), float(self.d_max.subs(step, at_step))

    def forward(self, num_batches_tracked: Tensor) -> tuple[Union[Tensor, float], Union[Tensor, float]]:
        """``(r_max, d_max)`` for a step tensor: 0-d float64 tensors computed in the graph (no
        host sync), so a compiled graph never sees them as constants and never recompiles.

        0-d tensors do not promote the per-channel math they clip: float32 stays float32.
        Eagerly, for a step on the CPU (reading it costs no sync), Python floats evaluated on
        the host instead: the same values, without a dozen tiny tensor ops per layer and step.
        """
        if is_eager_cpu(num_batches_tracked):
            return self._host(int(num_batches_tracked))
        return self.tensor_bounds(num_batches_tracked)

    def tensor_bounds(self, num_batches_tracked: Tensor) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` as 0-d float64 tensors computed from the step tensor (what graphs run)."""
        s = num_batches_tracked.to(torch.float64)
        r = torch.as_tensor(self._r_fn(s), dtype=torch.float64, device=s.device)
        d = torch.as_tensor(self._d_fn(s), dtype=torch.float64, device=s.device)
        return r, d

    def _validate(self) -> None:
        for at_step in _CHECK_STEPS:
            r, d = self.at(at_step)
            if not r >= 1:  # also catches NaN
                raise ValueError(f"RenormSchedule: r_max({at_step}) = {r}; r_max must be >= 1 at every step.")
            if not d >= 0:
                raise ValueError(f"RenormSchedule: d_max({at_step}) = {d}; d_max must be >= 0 at every step.")

    def __str__(self) -> str:
        return f"RenormSchedule(r_max(step) = {self.r_max}, d_max(step) = {self.d_max})"

    def extra_repr(self) -> str:
        return f"r_max={self.r_max}, d_max={self.d_max}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_r_fn"], state["_d_fn"], state["_host"]  # closures: rebuilt from the expressions
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()


def is_eager_cpu(t: Tensor) -> bool:
    """Whether ``t`` is a plain CPU tensor outside compilation (reading its values costs no sync)."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()
