"""The two torch.fx tracers renorm-fx uses.

* :func:`trace_own_forward` traces one module's *own* forward: its submodules stay calls,
  its parameters and buffers become ``get_attr`` values (so in-place buffer updates such
  as batchnorm's ``num_batches_tracked.add_(1)`` are recorded, not run). Renorm layers
  are built from these traces, so only the layers are traced, never the whole model.
* :func:`trace_model` traces a whole model with batch-norms as leaves (for ``fold``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import RenormTraceError

__all__ = ["trace_own_forward", "trace_model", "UNTRACEABLE_HINT"]

UNTRACEABLE_HINT = (
    "torch.fx cannot follow data-dependent control flow or non-torch calls; "
    "torch.compile(model, backend='renorm') captures such code with Dynamo instead."
)

# batchnorm's input checks branch on the input's rank (Python control flow on a traced value);
# the renorm subgraph checks the rank itself, naming the layer.
_INPUT_CHECKS = ("_check_input_dim", "_check_non_zero_input_channels")


class _OwnForwardTracer(fx.Tracer):
    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True  # every submodule is called as it is, renormified or not


class _ModelTracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def _traced_class(cls: type) -> type:
    """``cls``, or a subclass whose forward is the one to trace: ``nn.SyncBatchNorm``'s forward
    branches on the process group (the renorm subgraph synchronizes by itself), so it traces as
    batchnorm's, which it equals without a process group."""
    if cls.forward is nn.SyncBatchNorm.forward:
        return type(cls.__name__, (cls,), {"forward": _BatchNorm.forward})
    return cls


@contextlib.contextmanager
def _as_class(module: nn.Module, cls: type, training: bool) -> Iterator[None]:
    """``module`` seen as an instance of ``cls`` in training / eval mode, with batchnorm's
    rank checks skipped, for the length of a trace."""
    old_cls, old_training = module.__class__, module.training
    cls = _traced_class(cls)
    patched = [name for name in _INPUT_CHECKS if isinstance(module, _BatchNorm) and hasattr(module, name)]
    try:
        module.__class__ = cls
        module.training = training
        for name in patched:
            object.__setattr__(module, name, lambda *args: None)
        yield
    finally:
        for name in patched:
            module.__dict__.pop(name, None)
        module.__class__ = old_cls
        module.training = old_training


def trace_own_forward(module: nn.Module, cls: type, name: str, training: bool = True) -> fx.Graph:
    """Trace ``cls.forward`` on ``module`` (``cls``: the module's own class or a base of it).

    Raises :class:`RenormTraceError` naming ``name`` if torch.fx cannot trace it.
    """
    try:
        with _as_class(module, cls, training):
            graph = _OwnForwardTracer().trace(module)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError, ...
        raise RenormTraceError(
            f"{name!r} ({cls.__name__}): torch.fx could not trace its forward: {type(exc).__name__}: {exc}"
        ) from exc
    _drop_string_annotations(graph)
    return graph


def trace_model(model: nn.Module, caller: str, leaves: tuple[type, ...], fallback: str) -> fx.Graph:
    """Trace all of ``model`` in eval mode (its own ``training`` flag only: submodules keep theirs),
    modules of the ``leaves`` types (and torch.nn's) kept as calls."""
    base = getattr(type(model), "_renorm_base", type(model))  # a renorm layer traces as its own class
    try:
        with _as_class(model, base, training=False):
            graph = _ModelTracer(leaves).trace(model)
    except Exception as exc:
        raise RenormTraceError(
            f"{caller}: torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n{fallback}"
        ) from exc
    _drop_string_annotations(graph)
    return graph


def _drop_string_annotations(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if isinstance(node.type, str):  # postponed annotations: unresolvable as code globals
            node.type = None
