"""FX pass: rewrite training-mode batch-norms into batch renorm.

Matches, in a graph traced in training mode:

* ``call_module`` nodes whose module is an ``nn.BatchNorm1d/2d/3d`` (or any
  ``_BatchNorm`` subclass) with running statistics;
* ``call_function`` nodes calling ``F.batch_norm`` / ``torch.batch_norm`` with
  ``training=True`` and running statistics.

Each match is replaced, in place, by the ops of
:func:`renorm_fx.functional.batch_renorm_train`: batch moments, ``r`` and ``d``
(detached, clipped by bounds a :class:`~renorm_fx.schedule.RenormSchedule`
computes from the layer's step tensor), batchnorm with the corrected affine, and
the running-statistics update. Batch-norms without running statistics have
nothing to renormalize against and are skipped (reported to the caller).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.fx.proxy import GraphAppendingTracer, Proxy
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import RUNNING_STATS, batch_renorm_train
from .matching import bind_batch_norm, expected_ranks, layer_name

__all__ = ["RenormOptions", "RenormSite", "rewrite_batch_norms", "STEP_SUFFIX"]

#: Name suffix of the step buffers added for functional batch-norms (on the root module).
STEP_SUFFIX = "_renorm_step"


@dataclasses.dataclass
class RenormSite:
    """One converted batch-norm: where its state lives and how it is updated."""

    name: str  # qualified name of the layer (module) or of its running statistics' owner
    step: str  # qualified name of the step buffer (num_batches_tracked)
    schedule: str  # qualified name of the RenormSchedule module
    momentum: float
    eps: float
    running_stats: str = "sigma"
    diagnostics: str = ""  # qualified name of the (3, C) buffer: last step's r, d, clipped flags
    nonfinite: str = ""  # qualified name of the count of skipped non-finite batches
    sync: str = ""  # qualified name of the module whose process_group it synchronizes over ("": local)


def _diagnostic_buffers(root: nn.Module, name: str, running_mean: torch.Tensor) -> tuple[str, str]:
    """Non-persistent buffers on ``root`` for a layer's diagnostics (not in ``state_dict``)."""
    prefix = name.replace(".", "_")
    targets = (f"{prefix}_renorm_diagnostics", f"{prefix}_renorm_nonfinite")
    if not _has_attr(root, targets[0]):  # a copy of a converted model has them already
        c, device = running_mean.shape[0], running_mean.device
        root.register_buffer(targets[0], torch.zeros(3, c, device=device), persistent=False)
        root.register_buffer(targets[1], torch.zeros((), dtype=torch.long, device=device), persistent=False)
    return targets


def _functional_step(
    root: nn.Module, graph: fx.Graph, node: fx.Node, mean: fx.Node, name: str, new_buffers: bool
) -> tuple[fx.Node, str]:
    """The step tensor of a functional batch-norm, and its qualified name.

    The ``num_batches_tracked`` beside the running mean when there is one (a module's
    buffer, or the one Dynamo lifted as an input: its ``add_(1)`` before the batch-norm is
    removed, since the renorm subgraph counts the step itself); otherwise a new step
    buffer on ``root`` (with ``new_buffers=False``, an error).
    """
    if mean.op == "get_attr" and mean.target.endswith("running_mean"):
        target = mean.target[: -len("running_mean")] + "num_batches_tracked"
        if _has_attr(root, target):
            with graph.inserting_before(node):
                return graph.get_attr(target), target
    if mean.op == "placeholder" and "running_mean" in mean.name:
        sibling = mean.name.replace("running_mean", "num_batches_tracked")
        step = next((n for n in graph.nodes if n.op == "placeholder" and n.name == sibling), None)
        if step is not None:
            for user in list(step.users):
                if user.op == "call_method" and user.target == "add_" and user.args[1:] == (1,) and not user.users:
                    graph.erase_node(user)
            return step, sibling
    if not new_buffers:
        raise ValueError(
            f"layer {name!r}: its num_batches_tracked is not in the graph torch.compile captured, so its "
            f"step cannot be counted. Either Dynamo broke the graph inside the layer (a print, a .item(), or "
            f"the float(num_batches_tracked) of a batchnorm with momentum=None: remove the break, or set a "
            f"momentum such as 0.01), or it is a functional batch_norm whose statistics have no "
            f"num_batches_tracked beside them: renormify(model) first, which gives it a step buffer."
        )
    target = name.replace(".", "_") + STEP_SUFFIX
    if not _has_attr(root, target):  # a copy of a converted model has it already
        device = root.get_buffer(mean.target).device if mean.op == "get_attr" else None
        root.register_buffer(target, torch.zeros((), dtype=torch.long, device=device))
    with graph.inserting_before(node):
        return graph.get_attr(target), target


def _has_attr(root: nn.Module, target: str) -> bool:
    try:
        root.get_buffer(target)
        return True
    except AttributeError:
        return False


@dataclasses.dataclass(frozen=True)
class RenormOptions:
    """How :func:`rewrite_batch_norms` rewrites a graph (kept by converted models, so that
    their copies are rewritten the same way)."""

    schedule: str  # qualified name of the RenormSchedule submodule of the root
    momentum: Optional[float] = None  # alpha for every layer; None: each layer's own momentum
    running_stats: str = "sigma"  # "sigma" (the paper's) or "variance" (batchnorm's)
    frozen: tuple[str, ...] = ()  # batch-norm modules left as they are (in eval mode while training)
    new_buffers: bool = True  # False: register no buffers on the root (e.g. Dynamo's graphs)
    sync: str = ""  # qualified name of a RenormSync submodule: every layer synchronizes over it
    sync_batch_norm: bool = True  # nn.SyncBatchNorm layers synchronize over their own group
    nonfinite_guard: bool = True  # a non-finite batch leaves the statistics and step unchanged


def rewrite_batch_norms(
    root: nn.Module, graph: fx.Graph, options: RenormOptions
) -> tuple[list[RenormSite], list[str]]:
    """Rewrite the batch-norms of ``graph`` (owned by ``root``) in place.

    Functional batch-norms whose running statistics belong to no module with a
    ``num_batches_tracked`` get a step buffer registered on ``root``, and every layer
    gets non-persistent diagnostics buffers, unless ``options.new_buffers`` is False
    (graphs whose state the caller does not own, such as Dynamo's): then no
    diagnostics are recorded, and a functional batch-norm must have a
    ``num_batches_tracked`` beside it. Returns the converted sites and the names of the
    skipped ones.

    With ``options.sync`` every layer takes its statistics over that
    :class:`~renorm_fx.distributed.RenormSync`'s process group. Without it,
    ``nn.SyncBatchNorm`` layers synchronize over their own ``process_group`` if
    ``options.sync_batch_norm``, and the other layers use this process's batch.
    """
    schedule, momentum, running_stats = options.schedule, options.momentum, options.running_stats
    sync, new_buffers = options.sync, options.new_buffers
    if running_stats not in RUNNING_STATS:
        raise ValueError(f"running_stats must be one of {RUNNING_STATS}, got {running_stats!r}")
    tracer = GraphAppendingTracer(graph)
    sites: list[RenormSite] = []
    skipped: list[str] = []

    def proxy(arg: Any) -> Any:
        return Proxy(arg, tracer) if isinstance(arg, fx.Node) else arg

    for node in list(graph.nodes):
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            if not isinstance(module, _BatchNorm) or node.target in options.frozen:
                continue
            name = node.target
            if module.running_mean is None or module.running_var is None:
                skipped.append(name)
                continue
            if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
                raise ValueError(f"renormify: layer {name!r} is a lazy batchnorm; run one forward first.")
            alpha = module.momentum if momentum is None else momentum
            with graph.inserting_before(node):
                get = lambda attr: graph.get_attr(f"{name}.{attr}")  # noqa: E731
                x = node.args[0]
                weight = get("weight") if module.weight is not None else None
                bias = get("bias") if module.bias is not None else None
                mean, var = get("running_mean"), get("running_var")
                step = get("num_batches_tracked")
            ranks, eps, step_target = expected_ranks(module), module.eps, f"{name}.num_batches_tracked"
            group = sync or (name if options.sync_batch_norm and isinstance(module, nn.SyncBatchNorm) else "")
        elif (a := bind_batch_norm(node)) is not None:
            if a["training"] is not True:
                if isinstance(a["training"], fx.Node):
                    raise ValueError(
                        f"renormify: {node.format_node()} has a traced `training` flag; pass a Python bool."
                    )
                continue
            mean, var, x, weight, bias = a["running_mean"], a["running_var"], a["input"], a["weight"], a["bias"]
            name = layer_name(mean) or node.name
            if mean is None or var is None:
                skipped.append(name)
                continue
            alpha, eps, ranks = a["momentum"] if momentum is None else momentum, a["eps"], ()
            step, step_target = _functional_step(root, graph, node, mean, name, new_buffers)
            group = sync
        else:
            continue

        if alpha is None:
            raise ValueError(
                f"renormify: layer {name!r} has momentum=None (a cumulative average), which would let "
                f"its running statistics go stale for r and d. Pass renormify(model, momentum=0.01) "
                f"or set the layer's momentum."
            )
        if not isinstance(alpha, (int, float)) or not isinstance(eps, (int, float)):
            raise ValueError(f"renormify: layer {name!r} needs constant momentum and eps, got {alpha!r}, {eps!r}")
        diag_target = count_target = ""
        diagnostics = nonfinite = None
        if new_buffers:
            diag_target, count_target = _diagnostic_buffers(
                root, name, module.running_mean if node.op == "call_module" else root.get_buffer(mean.target))
            with graph.inserting_before(node):
                diagnostics, nonfinite = graph.get_attr(diag_target), graph.get_attr(count_target)
        group_node = None
        if group:  # the module holding the process group (read at run time)
            with graph.inserting_before(node):
                group_node = graph.get_attr(group)
            group_node._rename(f"{name.replace('.', '_')}_sync")
        first_new = node.prev
        with graph.inserting_before(node):
            bounds = proxy(graph.call_module(schedule, (step,)))
            r_max, d_max = bounds[0], bounds[1]
            r_max.node._rename("r_max")
            d_max.node._rename("d_max")
            y = batch_renorm_train(
                proxy(x), proxy(weight), proxy(bias), proxy(mean), proxy(var), proxy(step),
                r_max, d_max, float(alpha), float(eps), name, ranks, running_stats,
                proxy(diagnostics), proxy(nonfinite), proxy(group_node), options.nonfinite_guard,
            )
        node.replace_all_uses_with(y.node)
        last_new = node.prev
        graph.erase_node(node)
        _prefix_names(first_new, last_new, name.replace(".", "_"))
        sites.append(RenormSite(name, step_target, schedule, float(alpha), float(eps), running_stats,
                                diag_target, count_target, group))
    graph.lint()
    return sites, skipped


def _prefix_names(after: fx.Node, last: fx.Node, prefix: str) -> None:
    """Name the nodes a rewrite inserted (after ``after`` up to ``last``) ``{prefix}_*``."""
    node = after.next
    while True:
        if node.op != "get_attr" and not node.name.startswith(prefix):
            node._rename(f"{prefix}_{re.sub(r'_[0-9]+$', '', node.name)}")
        if node is last:
            break
        node = node.next
