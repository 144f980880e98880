"""Runtime modules that :func:`renorm_fx.fold` puts into the models it returns.

* :class:`ScaleShift`: ``x * scale + shift`` per channel, a batch-norm's inference map, where
  it cannot vanish into the layer before it.
* :class:`Inlined`: what is left of a module whose forward fold copied into the graph (a
  batch-norm subclass with its own forward, such as a norm + activation layer): its
  submodules (the activation) and the tensors the graph still reads. It is never called.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["ScaleShift", "Inlined"]


class ScaleShift(nn.Module):
    """``x * scale + shift`` per channel (dim 1): a batch-norm's inference map.

    ``scale`` and ``shift`` are 1-D buffers, reshaped to broadcast over dim 1 of
    inputs of any rank. Computed in the wider of the input's and the buffers'
    dtype, returned in the input's, as batchnorm does for half-precision input.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        dtype = torch.promote_types(x.dtype, self.scale.dtype)
        y = x.to(dtype) * self.scale.view(shape) + self.shift.view(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


class Inlined(nn.Module):
    """The submodules and tensors of ``module`` that a graph reads after inlining its forward.

    ``names`` are the attribute names the graph uses (``act``, ``running_mean``, ...);
    submodules are shared with ``module``, parameters and buffers too (buffers keep their
    persistence), other tensor attributes are set as they are. ``inlined_from`` is the
    name of ``module``'s class.
    """

    def __init__(self, module: nn.Module, names: Iterable[str]) -> None:
        super().__init__()
        self.inlined_from = _class_name(module)
        for name in dict.fromkeys(names):
            if name in module._modules:
                self.add_module(name, module._modules[name])
            elif name in module._parameters:
                self.register_parameter(name, module._parameters[name])
            elif name in module._buffers:
                self.register_buffer(name, module._buffers[name],
                                     persistent=name not in module._non_persistent_buffers_set)
            else:
                setattr(self, name, getattr(module, name))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.inlined_from}'s forward was inlined into the folded graph; "
                           f"this module only holds what that graph reads")

    def extra_repr(self) -> str:
        return f"inlined {self.inlined_from}"


def _class_name(module: nn.Module) -> str:
    cls = getattr(type(module), "_renorm_base", type(module))  # a renorm layer: the user's class
    return cls.__name__
