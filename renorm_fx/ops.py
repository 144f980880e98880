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

import torch
from torch import Tensor

__all__ = ["stop_gradient"]


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
