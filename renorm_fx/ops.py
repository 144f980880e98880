"""``renorm_fx::stop_gradient``: the paper's stop_gradient as an operator compilers respect.

``r`` and ``d`` are constants of a training step, computed from the running
statistics *before* the step updates them. Under torch.compile the step's
buffer updates become in-place copies after the forward; AOTAutograd's
partitioner may then choose to *recompute* a cheap value such as ``r`` in the
backward from the (already updated) buffers, which silently corrupts the
gradients. A ``.detach()`` does not prevent that; this opaque operator does: the
partitioner never recomputes an operator outside its allowlist, so ``r`` and
``d`` are computed once, in the forward, and saved.

For Inductor the operator is lowered to a plain copy (registered lazily, the
first time it is traced while Inductor is loaded), which fuses into the
surrounding kernel: it costs nothing at run time.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
from torch import Tensor

__all__ = ["stop_gradient", "report_nonfinite"]


@torch.library.custom_op("renorm_fx::stop_gradient", mutates_args=())
def _stop_gradient(x: Tensor) -> Tensor:
    return x.clone()


@_stop_gradient.register_fake
def _(x: Tensor) -> Tensor:
    if "torch._inductor.lowering" in sys.modules:  # being compiled by Inductor
        register_inductor_lowering()
    return torch.empty_like(x)


# The paper's stop_gradient: the gradient through it is zero.
_stop_gradient.register_autograd(lambda ctx, grad: None)


def stop_gradient(x: Tensor) -> Tensor:
    """``x`` as a constant: no gradient flows through it, and compilers compute it once.

    Eagerly a ``detach`` (the operator's Python dispatch would cost ~50 us); while
    compiling, the operator, which the partitioner cannot recompute.
    """
    if torch.compiler.is_compiling():
        return torch.ops.renorm_fx.stop_gradient(x)
    return x.detach()


@functools.cache
def register_inductor_lowering() -> None:
    """Lower ``renorm_fx::stop_gradient`` to Inductor's copy, which fuses."""
    from torch._inductor.lowering import lowerings, user_lowerings

    clone = lowerings[torch.ops.aten.clone.default]
    user_lowerings[torch.ops.renorm_fx.stop_gradient.default] = lambda x: clone(x)


# ---- warnings about skipped non-finite batches ------------------------------------------------


def _warn_nonfinite(counts: list[Tensor], warned: list[Tensor], layers: str) -> None:
    """Warn once per layer whose count of skipped non-finite batches is positive, and set
    its ``warned`` flag (reads the counts and flags: one host sync)."""
    values = torch.stack([t.reshape(()).to(torch.long) for t in [*counts, *warned]]).tolist()
    n = len(counts)
    for name, count, done, flag in zip(layers.split(","), values[:n], values[n:], warned):
        if count > 0 and not done:
            flag.fill_(1)
            warnings.warn(
                f"renorm layer {name!r}: a training batch had non-finite values (NaN/Inf); its running "
                f"statistics and step were left unchanged (the last good ones are kept). The batch's "
                f"output is not finite: check the loss. (Warned once per layer; renorm_fx.diagnostics() "
                f"counts them.)",
                RuntimeWarning,
                stacklevel=3,
            )


def report_nonfinite(counts: list[Tensor], warned: list[Tensor], layers: str) -> None:
    """Warn once per layer (``layers``: comma-separated names) that skipped a non-finite batch.

    Eagerly, after every training forward. While compiling, nothing: a Python call in the
    compiled step would cost more than the step's normalization (~0.2 ms on CPU); compiled
    models are checked at their next ``train()`` / ``eval()``, ``state_dict()`` or
    ``renorm_fx.diagnostics()`` instead (see ``RenormGraphModule.report_nonfinite``).
    """
    if not torch.compiler.is_compiling():
        _warn_nonfinite(counts, warned, layers)
