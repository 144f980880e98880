"""The ``renorm`` torch.compile backend: batch renorm inside torch.compile, fused by Inductor.

    torch.compile(model, backend="renorm")                       # an untouched batchnorm model
    torch.compile(model, backend="renorm", options={"schedule": RenormSchedule.paper(warmup=500),
                                                    "momentum": 0.01})
    torch.compile(renormify(model), backend="renorm")            # also fine (nothing left to rewrite)

Dynamo captures each batch-norm as ``F.batch_norm`` on the module's lifted buffers;
the same FX pass as :func:`renormify` rewrites the training-mode ones into renorm,
and Inductor compiles the result. The clip bounds are computed in the graph from
each layer's ``num_batches_tracked``, so a schedule that changes every step never
recompiles. Registered as ``renorm`` on import of :mod:`renorm_fx` and through the
``torch_dynamo_backends`` entry point (so ``backend="renorm"`` works without an import).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from .passes.renorm_pass import RenormOptions, rewrite_batch_norms
from .schedule import RenormSchedule

__all__ = ["renorm_backend", "RenormCompileError"]

_OWN_OPTIONS = ("schedule", "momentum", "running_stats")
SCHEDULE_NAME = "renorm_schedule"


class RenormCompileError(RuntimeError):
    """The renorm pass could not rewrite a graph torch.compile captured."""


def rewrite_captured_graph(gm: fx.GraphModule, options: Optional[dict[str, Any]] = None) -> list[str]:
    """Rewrite the training-mode batch-norms of a Dynamo graph into renorm, in place.

    Returns the converted layers' names.
    """
    options = dict(options or {})
    schedule = options.get("schedule") or RenormSchedule.paper()
    if not isinstance(schedule, RenormSchedule):
        raise RenormCompileError(
            f"renorm backend: options['schedule'] must be a RenormSchedule, got {type(schedule).__name__}"
        )
    name = SCHEDULE_NAME
    while hasattr(gm, name):
        name = "_" + name
    gm.add_module(name, schedule)
    try:
        pass_options = RenormOptions(name, options.get("momentum"), options.get("running_stats", "sigma"),
                                     new_buffers=False)
        sites, _ = rewrite_batch_norms(gm, gm.graph, pass_options)
    except (ValueError, TypeError) as exc:
        raise RenormCompileError(f"renorm backend: {exc}") from exc
    if not sites:
        delattr(gm, name)
    gm.recompile()
    return [s.name for s in sites]


def renorm_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Optional[dict[str, Any]] = None,
    mode: Optional[str] = None,
) -> Callable[..., Any]:
    """torch.compile backend: rewrite batch-norms into renorm, then compile with Inductor.

    ``options`` may hold ``schedule`` (a :class:`RenormSchedule`), ``momentum`` and
    ``running_stats`` (as for :func:`renormify`); the rest are Inductor config options.
    """
    options = dict(options or {})
    rewrite_captured_graph(gm, {k: options.pop(k) for k in _OWN_OPTIONS if k in options})
    from torch._inductor.compile_fx import compile_fx

    if mode is not None:
        options.update(torch._inductor.list_mode_options(mode))
    return compile_fx(gm, example_inputs, config_patches=options or None)


def register() -> None:
    """Register ``renorm`` with Dynamo, unless its entry point is being loaded right now."""
    from torch._dynamo.backends import registry

    if "renorm" in registry._COMPILER_FNS or registry._BACKENDS.get("renorm") is not None:
        return  # already registered, or Dynamo's entry-point lookup will register it
    registry.register_backend(renorm_backend, name="renorm")
