"""FX pass: rewrite training-mode batch-norm calls into batch renorm.

Matches ``call_function`` nodes calling ``F.batch_norm`` / ``torch.batch_norm`` with
``training=True`` and running statistics. These are what every batch-norm becomes in a
trace: a batch-norm layer's own ``forward`` traced (``renormify``), a model's functional
calls, and the graphs Dynamo captures (the ``renorm`` backend).

Each match is replaced, in place, by the ops of
:func:`renorm_fx.functional.batch_renorm_train`: batch moments, ``r`` and ``d`` (behind
stop-gradient, clipped by bounds the schedule computes *in the graph* from the layer's
step tensor), batchnorm with the corrected affine, and the running-statistics update.
batchnorm's own step count (``num_batches_tracked.add_(1)``) is removed: the renorm
subgraph counts the step itself (not on a skipped non-finite batch).

The pass knows nothing of where a graph came from: the caller's ``bind`` callback says,
for each matched call, which layer it is and where its step and diagnostics live.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ..functional import batch_renorm_train
from .matching import bind_batch_norm

__all__ = ["PassOptions", "SiteBinding", "RenormSite", "rewrite_batch_norms"]


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """How :func:`rewrite_batch_norms` rewrites (the graph-level part of a ``RenormConfig``)."""

    schedule: str  # qualified name of the RenormSchedule module the graph calls
    momentum: Optional[float] = None  # alpha for every call; None: each call's own momentum
    running_stats: str = "sigma"
    nonfinite_guard: bool = True
    virtual_batch_size: Optional[int] = None
    caller: str = "renormify"  # the entry point, for error messages
    count_steps: bool = True  # False: the step is advanced elsewhere (once per optimizer update)


@dataclasses.dataclass(frozen=True)
class SiteBinding:
    """Where one matched batch-norm call's state lives (the caller's answer to ``bind``)."""

    name: str  # qualified name of the layer, for messages and reports
    step: fx.Node  # its step tensor (num_batches_tracked)
    step_target: str  # the step's qualified name in the graph's root
    diagnostics: Optional[fx.Node] = None  # (3, C) buffer: last step's r, d, clipped flags
    nonfinite: Optional[fx.Node] = None  # 0-d count of skipped non-finite batches
    sync: Optional[fx.Node] = None  # a module whose process_group it synchronizes over
    ranks: tuple[int, ...] = ()  # input ranks the layer accepts (() for any)
    diagnostics_target: str = ""
    nonfinite_target: str = ""
    prefix: Optional[str] = None  # of the inserted nodes' names; None: from ``name``
    label: str = ""  # how messages name the layer, if not by ``name`` (the model itself: its class)


@dataclasses.dataclass(frozen=True)
class RenormSite:
    """One converted batch-norm call, as reported to the caller."""

    name: str
    step: str  # qualified name of its step buffer in the graph's root
    momentum: float
    eps: float
    diagnostics: str = ""
    nonfinite: str = ""


#: bind(graph, node, arguments) -> SiteBinding; nodes it creates go before ``node``.
Binder = Callable[[fx.Graph, fx.Node, dict[str, Any]], SiteBinding]


def rewrite_batch_norms(
    graph: fx.Graph, options: PassOptions, bind: Binder
) -> tuple[list[RenormSite], list[fx.Node]]:
    """Rewrite the training-mode batch-norm calls of ``graph`` in place.

    Returns the converted sites and the batch-norm calls left alone because they have no
    running statistics (nothing to renormalize against).
    """
    tracer = GraphAppendingTracer(graph)
    sites: list[RenormSite] = []
    skipped: list[fx.Node] = []

    def proxy(arg: Any) -> Any:
        return Proxy(arg, tracer) if isinstance(arg, fx.Node) else arg

    for node in list(graph.nodes):
        a = bind_batch_norm(node)
        if a is None:
            continue
        if isinstance(a["training"], fx.Node):
            raise ValueError(f"{options.caller}: {node.format_node()} has a traced `training` flag; pass a Python bool.")
        if a["training"] is not True:
            continue
        mean, var = a["running_mean"], a["running_var"]
        if mean is None or var is None:
            skipped.append(node)
            continue
        with graph.inserting_before(node):
            site = bind(graph, node, a)
        alpha = a["momentum"] if options.momentum is None else options.momentum
        if alpha is None:
            raise ValueError(
                f"{options.caller}: layer {site.label or site.name!r} has momentum=None (a cumulative average), which would "
                f"let its running statistics go stale for r and d. Set a momentum: "
                f"{options.caller}(..., momentum=0.01) or the layer's own momentum."
            )
        eps = a["eps"]
        if not isinstance(alpha, (int, float)) or not isinstance(eps, (int, float)):
            raise ValueError(
                f"{options.caller}: layer {site.label or site.name!r} needs constant momentum and eps, got {alpha!r}, {eps!r}"
            )
        _drop_step_increments(graph, site.step)
        first_new = node.prev
        with graph.inserting_before(node):
            bounds = proxy(graph.call_module(options.schedule, (site.step,)))
            bounds.node._rename("bounds")
            r_max, d_max = bounds[0], bounds[1]
            r_max.node._rename("r_max")
            d_max.node._rename("d_max")
            y = batch_renorm_train(
                proxy(a["input"]), proxy(a["weight"]), proxy(a["bias"]), proxy(mean), proxy(var),
                proxy(site.step) if options.count_steps else None,
                r_max, d_max, float(alpha), float(eps), site.label or site.name, site.ranks, options.running_stats,
                proxy(site.diagnostics), proxy(site.nonfinite), proxy(site.sync), options.nonfinite_guard,
                options.virtual_batch_size,
            )
        node.replace_all_uses_with(y.node)
        last_new = node.prev
        graph.erase_node(node)
        prefix = _identifier(site.name) if site.prefix is None else site.prefix
        if prefix:
            _prefix_names(first_new, last_new, prefix)
        sites.append(RenormSite(site.name, site.step_target, float(alpha), float(eps),
                                site.diagnostics_target, site.nonfinite_target))
    graph.lint()
    return sites, skipped


def _drop_step_increments(graph: fx.Graph, step: fx.Node) -> None:
    """Erase batchnorm's own ``step.add_(1)`` (unused results only)."""
    for user in list(step.users):
        if user.op == "call_method" and user.target == "add_" and user.args[1:] == (1,) and not user.users:
            graph.erase_node(user)


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name) or "bn"


def _prefix_names(after: fx.Node, last: fx.Node, prefix: str) -> None:
    """Name the nodes a rewrite inserted (after ``after`` up to ``last``) ``{prefix}_*``."""
    node = after.next
    while True:
        if node.op not in ("get_attr", "placeholder") and not node.name.startswith(prefix):
            node._rename(f"{prefix}_{re.sub(r'_[0-9]+$', '', node.name)}")
        if node is last:
            break
        node = node.next
