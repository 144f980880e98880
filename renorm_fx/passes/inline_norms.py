"""FX pass: inline eval-mode batch-norm subclasses that have their own forward, so that their
normalization folds (step 1 of :func:`renorm_fx.passes.fold_pass.fold_batch_norms`).

A ``_BatchNorm`` subclass with its own forward (a norm + activation layer such as
``F.batch_norm`` then dropout then activation; a renorm layer made from one) is traced on
its own, in eval mode, and its forward copied into the graph in place of the call, so that
its batch-norm call is matched like any other and the rest of its forward stays. A subclass
whose forward cannot be traced (or has no ``F.batch_norm(training=False)`` call) stays a
call; the fold report says why.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import RenormTraceError
from ..modules import Inlined
from ..tracing import trace_own_forward
from .graph_utils import is_identity_module
from .matching import bind_batch_norm

__all__ = ["inline_norm_subclasses", "overrides_forward"]

# batch-norm forwards fold understands as they are (SyncBatchNorm's is batchnorm's without a process group)
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_NESTING = 8  # how deep norm subclasses inlined into norm subclasses are followed


def _own_class(module: nn.Module) -> type:
    return getattr(type(module), "_renorm_base", type(module))  # a renorm layer: the user's class


def overrides_forward(module: nn.Module) -> bool:
    """The batch-norm's class (the user's, for a renorm layer) has a forward of its own, not batchnorm's."""
    return _own_class(module).forward not in _PLAIN_FORWARDS


def inline_norm_subclasses(gm: fx.GraphModule) -> tuple[dict[fx.Node, str], dict[fx.Node, str]]:
    """Inline the eval forward of every eval-mode ``_BatchNorm`` subclass with running statistics
    and its own forward. Returns the call sites left as they are (with the reason) and the
    batch-norm nodes inlined (with the module's qualified name)."""
    kept: dict[fx.Node, str] = {}
    inlined: dict[fx.Node, str] = {}
    for _ in range(_NESTING):
        sites: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and node not in kept:
                module = gm.get_submodule(node.target)
                if isinstance(module, _BatchNorm) and not module.training and module.running_mean is not None \
                        and module.running_var is not None and overrides_forward(module):
                    sites.setdefault(node.target, []).append(node)
        if not sites:
            break
        for target, nodes in sites.items():
            module = gm.get_submodule(target)
            own, reason = _own_eval_graph(module, target)
            bindings = []
            for node in nodes if own is not None else ():
                binding, reason = _bind_call(own, module, node)
                if reason:
                    break
                bindings.append(binding)
            if own is None or reason:
                kept.update((node, reason) for node in nodes)
                continue
            names: set[str] = set()
            for node, binding in zip(nodes, bindings):
                inlined.update(_inline_call(gm, node, module, own, binding, target, names))
            names.update(str(n.target)[len(target) + 1:].split(".")[0] for n in gm.graph.nodes  # other reads
                         if n.op in ("get_attr", "call_module") and str(n.target).startswith(target + "."))
            owner, _, leaf = target.rpartition(".")
            setattr(gm.get_submodule(owner), leaf, Inlined(module, sorted(names)))
    return kept, inlined


def _own_eval_graph(module: nn.Module, name: str) -> tuple[Optional[fx.Graph], str]:
    """The eval-mode trace of the module's own forward, or why fold leaves the module as it is."""
    cls = _own_class(module).__name__
    if module._forward_hooks or module._forward_pre_hooks:
        return None, f"{cls} has forward hooks, which inlining its forward would drop: kept as is"
    try:
        graph = trace_own_forward(module, _own_class(module), name, training=False)
    except RenormTraceError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return None, (f"{cls} has its own forward, which torch.fx could not trace "
                      f"({type(cause).__name__}: {first}): kept as is")
    if not any((a := bind_batch_norm(n)) is not None and a["training"] is False for n in graph.nodes):
        return None, (f"{cls} has its own forward, with no F.batch_norm(training=False) call in eval mode: "
                      f"fold does not know what it computes; kept as is")
    for n in graph.nodes:
        if n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).endswith("__") \
                and n.args and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            return None, f"{cls}'s eval forward updates its own tensors in place ({n.format_node()}): kept as is"
    output = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        return None, f"{cls}'s forward returns {type(output.args[0]).__name__}, not one tensor: kept as is"
    return graph, ""


def _bind_call(own: fx.Graph, module: nn.Module, node: fx.Node) -> tuple[dict[fx.Node, Any], str]:
    """The value of each placeholder of ``own`` at the call site ``node``."""
    cls = _own_class(module)
    try:
        bound = inspect.signature(cls.forward).bind(module, *node.args, **node.kwargs)
    except TypeError as exc:
        return {}, f"its call does not match {cls.__name__}.forward's signature ({exc}): kept as is"
    bound.apply_defaults()
    binding: dict[fx.Node, Any] = {}
    for p in own.nodes:
        if p.op != "placeholder":
            continue
        if str(p.target).startswith("*") or p.target not in bound.arguments:
            return {}, f"{cls.__name__}.forward takes *args / **kwargs: kept as is"
        binding[p] = bound.arguments[p.target]
    result = next(n for n in own.nodes if n.op == "output").args[0]
    if result in binding and not isinstance(binding[result], fx.Node):
        return {}, f"{cls.__name__}.forward returns an argument that is not a graph value: kept as is"
    return binding, ""


def _inline_call(gm: fx.GraphModule, node: fx.Node, module: nn.Module, own: fx.Graph,
                 binding: dict[fx.Node, Any], prefix: str, names: set[str]) -> dict[fx.Node, str]:
    """Copy ``own`` into ``gm.graph`` in place of the call ``node`` (targets prefixed with the
    module's name; ``nn.Identity`` calls dropped). Adds the attribute names the copy reads to
    ``names``; returns its batch-norm nodes."""
    env: dict[fx.Node, Any] = dict(binding)
    stem = prefix.replace(".", "_")
    batch_norms: dict[fx.Node, str] = {}
    graph = gm.graph
    with graph.inserting_before(node):
        for n in own.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = fx.map_arg(n.args[0], env.__getitem__)
                break
            if n.op == "call_module" and is_identity_module(module.get_submodule(n.target), n):
                env[n] = env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
                continue
            if not n.users and n.op == "call_function" and n.target is getattr:
                continue  # an attribute read for an error message only
            target = n.target
            if n.op in ("get_attr", "call_module"):
                names.add(str(n.target).split(".")[0])
                target = f"{prefix}.{n.target}"
            new = graph.create_node(n.op, target, fx.map_arg(n.args, env.__getitem__),
                                    fx.map_arg(n.kwargs, env.__getitem__), name=f"{stem}_{n.name}", type_expr=n.type)
            env[n] = new
            if bind_batch_norm(new) is not None:
                batch_norms[new] = prefix
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return batch_norms
