"""The ``renorm`` torch.compile backend: batch renorm inside torch.compile, fused by Inductor.

    torch.compile(model, backend="renorm")                                # an untouched batchnorm model
    torch.compile(model, backend="renorm", options=RenormConfig(schedule=RenormSchedule.switch(10_000)))
    torch.compile(model, backend="renorm", options={"momentum": 0.01, "max_autotune": True})
    torch.compile(renormify(model), backend="renorm")                     # also fine (nothing left to rewrite)

Dynamo captures each batch-norm as ``F.batch_norm`` on the module's lifted buffers; the
same FX pass as :func:`renormify` rewrites the training-mode ones into renorm, and Inductor
compiles the result. The clip bounds are computed in the graph from each layer's
``num_batches_tracked``, so a schedule that changes every step never recompiles.
Registered as ``renorm`` on import of :mod:`renorm_fx` and through the
``torch_dynamo_backends`` entry point (so ``backend="renorm"`` works without an import).

What is specific to Dynamo's graphs lives here, not in the pass: the lifted buffers'
placeholder names (``l_self_modules_bn_buffers_running_mean_``) say which layer a call
belongs to and where its ``num_batches_tracked`` is. The graph's state is the user's
modules', so no buffers are added: no diagnostics are recorded on this path.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from .config import RenormConfig
from .distributed import RenormSync
from .errors import RenormCompileError
from .passes.matching import free_name
from .passes.renorm_pass import PassOptions, SiteBinding, rewrite_batch_norms

__all__ = ["renorm_backend", "rewrite_captured_graph"]

CALLER = 'torch.compile(backend="renorm")'
_SCHEDULE = "renorm_schedule"
_SYNC = "renorm_sync"
_LIFTED = re.compile(r"^l_(?:self_)?(?:modules_)?(.*?)_buffers_running_mean_$")


def _layer_name(mean: Any, node: fx.Node) -> str:
    """``a.b`` for ``get_attr a.b.running_mean`` or Dynamo's ``l_self_modules_a_modules_b_buffers_running_mean_``."""
    if isinstance(mean, fx.Node) and mean.op == "get_attr" and "." in str(mean.target):
        return str(mean.target).rsplit(".", 1)[0]
    match = _LIFTED.match(mean.name) if isinstance(mean, fx.Node) and mean.op == "placeholder" else None
    return match.group(1).replace("_modules_", ".") if match else node.name


class _DynamoBinder:
    def __init__(self, gm: fx.GraphModule, sync: str) -> None:
        self.gm, self.sync = gm, sync

    def __call__(self, graph: fx.Graph, node: fx.Node, a: dict[str, Any]) -> SiteBinding:
        mean = a["running_mean"]
        name = _layer_name(mean, node)
        step = None
        if isinstance(mean, fx.Node) and mean.op == "placeholder" and "running_mean" in mean.name:
            sibling = mean.name.replace("running_mean", "num_batches_tracked")
            step = next((n for n in graph.nodes if n.op == "placeholder" and n.name == sibling), None)
        elif isinstance(mean, fx.Node) and mean.op == "get_attr" and str(mean.target).endswith("running_mean"):
            target = str(mean.target)[: -len("running_mean")] + "num_batches_tracked"
            if isinstance(getattr(self.gm.get_submodule(target.rpartition(".")[0]), "num_batches_tracked", None),
                          torch.Tensor):
                step = graph.get_attr(target)
        if step is None:
            raise ValueError(
                f"layer {name!r}: its num_batches_tracked is not in the graph torch.compile captured, so its step "
                f"cannot be counted. Either Dynamo broke the graph inside the layer (a print, a .item(), or the "
                f"float(num_batches_tracked) of a batchnorm with momentum=None: remove the break, or set a momentum "
                f"such as 0.01), or it is a functional batch_norm whose statistics have no num_batches_tracked "
                f"beside them: renormify(model) first, which gives it a step buffer."
            )
        sync = graph.get_attr(self.sync) if self.sync else None
        return SiteBinding(name=name, step=step, step_target=step.name, sync=sync)


def rewrite_captured_graph(gm: fx.GraphModule, config: Optional[RenormConfig] = None) -> list[str]:
    """Rewrite the training-mode batch-norms of a Dynamo graph into renorm, in place; the converted layers' names."""
    config = config or RenormConfig()
    schedule = free_name(gm, _SCHEDULE)
    gm.add_module(schedule, config.schedule)
    sync = ""
    if config.sync:
        sync = free_name(gm, _SYNC)
        gm.add_module(sync, RenormSync(config.process_group))
    options = PassOptions(schedule, config.momentum, config.running_stats, config.nonfinite_guard,
                          config.virtual_batch_size, caller=CALLER)
    try:
        sites, skipped = rewrite_batch_norms(gm.graph, options, _DynamoBinder(gm, sync))
    except (ValueError, TypeError) as exc:
        raise RenormCompileError(f"{CALLER}: {exc}") from exc
    if skipped and config.strict:
        names = ", ".join(_layer_name(n.args[1] if len(n.args) > 1 else None, n) for n in skipped)
        raise RenormCompileError(f"{CALLER}: batch-norms without running statistics cannot be renormalized: {names} "
                                 f"(strict=True; give them running statistics).")
    if not sites:
        delattr(gm, schedule)
        if sync:
            delattr(gm, sync)
    gm.recompile()
    return [s.name for s in sites]


def split_options(options: Any) -> tuple[RenormConfig, dict[str, Any]]:
    """``options`` (a RenormConfig, or a dict of its fields and Inductor's) as (config, Inductor options)."""
    if options is None or isinstance(options, RenormConfig):
        return RenormConfig.build(CALLER, options), {}
    if not isinstance(options, dict):
        raise RenormCompileError(f"{CALLER}: options must be a RenormConfig or a dict, got {type(options).__name__}")
    options = dict(options)
    config = options.pop("config", None)
    fields = {k: options.pop(k) for k in RenormConfig.field_names() if k in options}
    try:
        return RenormConfig.build(CALLER, config, **fields), options
    except (TypeError, ValueError) as exc:
        raise RenormCompileError(str(exc)) from None


def renorm_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Any = None,
    mode: Optional[str] = None,
) -> Callable[..., Any]:
    """torch.compile backend: rewrite batch-norms into renorm, then compile with Inductor.

    ``options``: a :class:`RenormConfig`, or a dict of its fields (or ``"config"``: a
    RenormConfig) and Inductor config options.
    """
    config, inductor_options = split_options(options)
    rewrite_captured_graph(gm, config)
    from torch._inductor.compile_fx import compile_fx

    if mode is not None:
        inductor_options.update(torch._inductor.list_mode_options(mode))
    return compile_fx(gm, example_inputs, config_patches=inductor_options or None)


def register() -> None:
    """Register ``renorm`` with Dynamo, unless its entry point is being loaded right now."""
    from torch._dynamo.backends import registry

    if "renorm" in registry._COMPILER_FNS or registry._BACKENDS.get("renorm") is not None:
        return  # already registered, or Dynamo's entry-point lookup will register it
    registry.register_backend(renorm_backend, name="renorm")
