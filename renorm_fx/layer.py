"""Renorm layers: a module whose training forward is its own forward, traced, with every
batch-norm call rewritten into batch renorm.

A renorm layer is the user's module with its class swapped for a subclass made once per
class, ``Renorm<Class>(RenormLayer, Class)``: still an instance of its class (``isinstance``
checks keep working), with the same parameters, buffers, hooks, attributes and
``state_dict``. In training mode it runs the rewritten trace of ``Class.forward``, so a
batch-norm subclass keeps whatever its forward does around the normalization (an
activation, a dropout); in eval mode it runs ``Class.forward`` itself.

What a layer adds: two non-persistent buffers per converted call (``renorm_diagnostics``,
``renorm_nonfinite``: not in ``state_dict``), a ``renorm_step`` buffer for a functional
batch-norm whose statistics have no ``num_batches_tracked`` beside them, and plain
attributes (``_renorm_*``, not submodules) holding the config and the generated forward.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.fx.graph_module import _forward_from_src
from torch.nn.modules.batchnorm import _BatchNorm

from .config import RenormConfig
from .distributed import RenormSync
from .passes.matching import expected_ranks, stats_owner
from .passes.renorm_pass import PassOptions, RenormSite, SiteBinding, rewrite_batch_norms
from .tracing import trace_own_forward

__all__ = ["RenormLayer", "convert_layer", "renorm_class", "renorm_layers"]

STEP_BUFFER = "renorm_step"
COUNTS_UPDATES = "_renorm_counts_updates"  # set by count_updates: the step advances per optimizer update
_SCHEDULE_ATTR = "_renorm_schedule"
_SYNC_ATTR = "_renorm_sync"
_CLASSES: dict[type, type] = {}
#: running_mean tensors of every renorm layer made in this process (to recognise a renorm layer
#: that another transform rebuilt as plain batchnorm, such as nn.SyncBatchNorm.convert_sync_batchnorm)
_RENORM_STATS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


class RenormLayer:
    """Mixin of every renorm layer class (``Renorm<Class>``); see the module docstring.

    Attributes (set by :func:`convert_layer`): ``renorm_name`` (the qualified name it was
    converted under), ``renorm_config`` (its :class:`~renorm_fx.RenormConfig`),
    ``renorm_sites`` (one :class:`RenormSite` per converted batch-norm call),
    ``renorm_graph`` (the rewritten training graph; ``renorm_code`` its source).
    """

    _renorm_base: type  # the user's class

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self._renorm_base.forward(self, *args, **kwargs)
        if self.__dict__["_renorm_key"] != _key(self):
            self._renorm_rebuild()  # momentum or eps changed since the trace
        out = self.__dict__["_renorm_forward"](self, *args, **kwargs)
        if not torch.compiler.is_compiling() and args and getattr(args[0], "device", None) == _CPU:
            self.renorm_report_nonfinite()  # cheap on CPU; elsewhere at train()/eval()/state_dict()
        return out

    # ---- what the layer reports -------------------------------------------------------
    @property
    def renorm_code(self) -> str:
        """The training forward's source: the layer's own forward with renorm in place of batchnorm."""
        return self.__dict__["_renorm_graph"].python_code(root_module="self").src

    @property
    def renorm_graph(self) -> fx.Graph:
        return self.__dict__["_renorm_graph"]

    @property
    def renorm_schedule(self) -> Any:
        return self.__dict__[_SCHEDULE_ATTR]

    @property
    def renorm_sync(self) -> Optional[RenormSync]:
        """The process group holder this layer synchronizes over (None: this process's batch)."""
        return self.__dict__.get(_SYNC_ATTR)

    def renorm_report_nonfinite(self) -> None:
        """Warn once per site that skipped a non-finite training batch (one host read)."""
        if not self.renorm_config.nonfinite_guard:
            return
        warned = self.__dict__.setdefault("_renorm_warned", set())
        for site in self.renorm_sites:
            if site.nonfinite and site.name not in warned and int(self.get_buffer(site.nonfinite)) > 0:
                warned.add(site.name)
                warnings.warn(
                    f"renorm layer {site.name!r}: a training batch had non-finite values (NaN/Inf); its running "
                    f"statistics and step were left unchanged (the last good ones are kept). The batch's output "
                    f"is not finite: check the loss. (Warned once per layer; renorm_fx.diagnostics() counts them.)",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def train(self, mode: bool = True) -> Any:
        if "renorm_sites" in self.__dict__:
            self.renorm_report_nonfinite()
        return super().train(mode)  # type: ignore[misc]

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.renorm_report_nonfinite()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # a step buffer this layer added is absent from the original model's checkpoints: keep it
        for site in self.renorm_sites:
            if site.step.endswith(STEP_BUFFER) and prefix + site.step not in state_dict:
                state_dict[prefix + site.step] = self.get_buffer(site.step)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    # ---- copies and pickles: the trace is redone from the user's class ------------------
    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.renorm_config.process_group is not None:
            self.__dict__[_SYNC_ATTR].__getstate__()  # a specific process group: refuses, saying why
        return (_new_layer, (self._renorm_base,), self._renorm_state())

    def __deepcopy__(self, memo: dict) -> Any:
        new = _new_layer(self._renorm_base)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._renorm_state(), memo))
        return new

    def _renorm_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in _REBUILT}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._renorm_rebuild()

    def _renorm_rebuild(self) -> None:
        _build_forward(self, self.renorm_name, self.renorm_config)  # type: ignore[arg-type]


_REBUILT = ("_renorm_forward", "_renorm_graph", "_renorm_key", COUNTS_UPDATES)  # copies count forwards until tied again
_CPU = torch.device("cpu")


def _key(module: nn.Module) -> tuple[Any, ...]:
    """What a trace bakes in as constants, to retrace when it changes."""
    return (getattr(module, "momentum", None), getattr(module, "eps", None),)


def _new_layer(base: type) -> nn.Module:
    return object.__new__(renorm_class(base))


def renorm_class(base: type) -> type:
    """``Renorm<base>``: the renorm layer class of ``base`` (made once per class)."""
    if issubclass(base, RenormLayer):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        attrs: dict[str, Any] = {"_renorm_base": base, "__module__": __name__, "__doc__": base.__doc__,
                                 "__qualname__": f"Renorm{base.__name__}"}
        if not hasattr(base, "code"):  # layer.code, as for a GraphModule (never shadow the user's own)
            attrs["code"] = RenormLayer.renorm_code
        cls = _CLASSES[base] = type(f"Renorm{base.__name__}", (RenormLayer, base), attrs)
    return cls


def renorm_layers(model: nn.Module) -> dict[str, RenormLayer]:
    """The renorm layers of ``model`` (itself included) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RenormLayer)}


def was_renorm_layer(module: nn.Module) -> bool:
    """A plain batch-norm holding a renorm layer's statistics: another transform rebuilt it."""
    mean = getattr(module, "running_mean", None)
    return isinstance(module, _BatchNorm) and not isinstance(module, RenormLayer) and mean is not None \
        and _RENORM_STATS.get(id(mean)) is mean


class NothingToConvert(Exception):
    """The module's traced forward has no training-mode batch-norm call with running statistics."""

    def __init__(self, reason: str, skipped: list[str]) -> None:
        super().__init__(reason)
        self.reason, self.skipped = reason, skipped


def convert_layer(module: nn.Module, name: str, config: RenormConfig) -> list[str]:
    """Make ``module`` a renorm layer, in place. Returns the batch-norm calls it left alone
    (no running statistics), by name.

    Raises :class:`~renorm_fx.errors.RenormTraceError` if its forward cannot be traced, and
    :class:`NothingToConvert` if the trace has no batch-norm call to rewrite; ``module`` is
    then unchanged.
    """
    old_momentum = getattr(module, "momentum", None)
    try:
        if isinstance(module, _BatchNorm) and config.momentum is not None:
            module.momentum = config.momentum  # the renorm alpha is the layer's momentum (the trace reads it)
        skipped = _build_forward(module, name, config, base=type(module))
    except Exception:
        if isinstance(module, _BatchNorm):
            module.momentum = old_momentum
        for attr in (_SCHEDULE_ATTR, _SYNC_ATTR):
            module.__dict__.pop(attr, None)
        raise
    module.__class__ = renorm_class(type(module))
    for site in module.renorm_sites:  # type: ignore[attr-defined]
        stats = module.get_submodule(site.step.rpartition(".")[0])
        if isinstance(stats, _BatchNorm) and stats.running_mean is not None:
            _RENORM_STATS[id(stats.running_mean)] = stats.running_mean
    return skipped


def _build_forward(module: nn.Module, name: str, config: RenormConfig, base: Optional[type] = None) -> list[str]:
    """Trace ``base.forward`` on ``module``, rewrite it, and install it as the training forward."""
    base = base or type(module)._renorm_base  # type: ignore[attr-defined]
    object.__setattr__(module, _SCHEDULE_ATTR, config.schedule)
    sync = _sync_for(module, config)
    if sync is not None:
        object.__setattr__(module, _SYNC_ATTR, sync)
    graph = trace_own_forward(module, base, name)
    options = PassOptions(_SCHEDULE_ATTR, None, config.running_stats, config.nonfinite_guard,
                          config.virtual_batch_size, count_steps=not module.__dict__.get(COUNTS_UPDATES, False))
    sites, skipped_nodes = rewrite_batch_norms(graph, options, _Binder(module, name, sync is not None))
    means = [n.args[1] if len(n.args) > 1 else n.kwargs.get("running_mean") for n in skipped_nodes]
    skipped = [_qualified(name, stats_owner(mean) or "") for mean in means]
    if not sites:
        raise NothingToConvert("its forward has no training-mode batch-norm call with running statistics", skipped)
    code = graph.python_code(root_module="self")
    d = module.__dict__
    d["_renorm_forward"] = _forward_from_src(code.src, code.globals, None)
    d["_renorm_graph"] = graph
    d["renorm_sites"] = sites
    d["renorm_name"] = name
    d["renorm_config"] = config
    d["_renorm_key"] = _key(module)
    return skipped


def _sync_for(module: nn.Module, config: RenormConfig) -> Optional[RenormSync]:
    if config.sync:
        return RenormSync(config.process_group)
    if config.sync is None and isinstance(module, nn.SyncBatchNorm):
        return RenormSync(module.process_group)
    return None


def _qualified(name: str, owner: str) -> str:
    """The qualified name of the statistics' ``owner`` (relative to layer ``name``; "": the layer)."""
    return ".".join(p for p in (name, owner) if p)


class _Binder:
    """Where a renorm layer's state lives: its own buffers (or a child's, for functional calls
    on a child's statistics), named after the layer's qualified name."""

    def __init__(self, module: nn.Module, name: str, synced: bool) -> None:
        self.module, self.name, self.synced = module, name, synced

    def __call__(self, graph: fx.Graph, node: fx.Node, a: dict[str, Any]) -> SiteBinding:
        mean = a["running_mean"]
        if not (isinstance(mean, fx.Node) and mean.op == "get_attr"):
            raise ValueError(
                f"renormify: in {self.name!r}, {node.format_node()} normalizes with running statistics that are not "
                f"the module's buffers; renormify needs them as buffers (register_buffer) to update them."
            )
        owner = stats_owner(mean) or ""  # "": the module's own statistics
        stats_module = self.module.get_submodule(owner)
        prefix = f"{owner.replace('.', '_')}_" if owner else ""
        step_target = f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"
        if not isinstance(getattr(stats_module, "num_batches_tracked", None), torch.Tensor):
            step_target = prefix + STEP_BUFFER
            if step_target not in self.module._buffers:
                self.module.register_buffer(step_target, torch.zeros((), dtype=torch.long, device=self.module.get_buffer(mean.target).device))
        diag, count = prefix + "renorm_diagnostics", prefix + "renorm_nonfinite"
        if diag not in self.module._buffers:
            running_mean = self.module.get_buffer(mean.target)
            self.module.register_buffer(diag, torch.zeros(3, running_mean.numel(), device=running_mean.device),
                                        persistent=False)
            self.module.register_buffer(count, torch.zeros((), dtype=torch.long, device=running_mean.device),
                                        persistent=False)
        step = _get_attr(graph, step_target)
        site_name = _qualified(self.name, owner)
        ranks = expected_ranks(self.module) if not owner and isinstance(self.module, _BatchNorm) else ()
        return SiteBinding(
            name=site_name, step=step, step_target=step_target,
            diagnostics=graph.get_attr(diag), nonfinite=graph.get_attr(count),
            sync=graph.get_attr(_SYNC_ATTR) if self.synced else None, ranks=ranks,
            diagnostics_target=diag, nonfinite_target=count, prefix=prefix.rstrip("_"),
            label=site_name or type(self.module).__name__,
        )


def _get_attr(graph: fx.Graph, target: str) -> fx.Node:
    """The graph's ``get_attr`` node of ``target`` (batchnorm's trace has one), or a new one."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == target:
            return node
    return graph.get_attr(target)
