"""Graph helpers that the steps of :func:`renorm_fx.passes.fold_pass.fold_batch_norms` share
(:mod:`~renorm_fx.passes.inline_norms`, :mod:`~renorm_fx.passes.fold_pass`, :mod:`~renorm_fx.passes.merge_branches`).

Which modules are conv / linear layers whose weights a step may rewrite; the tensors a
``get_attr`` node reads and at how many call sites each parameter is used; which users of a
value read more than its shape; the rank checks on a value and its shape metadata; and
``nn.Identity`` calls, which the steps look through.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

__all__ = ["MODULE_LAYERS", "attr_tensor", "call_sites", "is_identity_module", "known_shape", "layer_class",
           "not_plain", "rank_checks", "tensor_uses", "value_users"]

# module layers: class -> (kind, spatial rank)
MODULE_LAYERS: dict[type, tuple[str, int]] = {
    nn.Linear: ("linear", 0),
    nn.Conv1d: ("conv", 1), nn.Conv2d: ("conv", 2), nn.Conv3d: ("conv", 3),
    nn.ConvTranspose1d: ("conv_transpose", 1), nn.ConvTranspose2d: ("conv_transpose", 2),
    nn.ConvTranspose3d: ("conv_transpose", 3),
}


def layer_class(module: nn.Module) -> Optional[type]:
    """The torch.nn layer class ``module`` is an instance of (``nn.Conv2d``, ...), or None."""
    return next((t for t in MODULE_LAYERS if isinstance(module, t)), None)


def not_plain(module: nn.Module, base: type, name: str) -> str:
    """Why fold cannot rewrite the weights of ``module`` (a ``base`` instance), or ""."""
    if parametrize.is_parametrized(module) or type(module).forward is not base.forward or (
            hasattr(base, "_conv_forward") and type(module)._conv_forward is not base._conv_forward):
        return f"{name!r} ({type(module).__name__}) computes its output in its own way"
    if not isinstance(module.weight, torch.Tensor) or module.weight.is_meta or isinstance(
            module.weight, nn.parameter.UninitializedParameter):
        return f"{name!r} has no materialized weight"
    return ""


def attr_tensor(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The tensor the ``get_attr`` node ``node`` reads, or None (another node or value, a non-tensor)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = _get(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _get(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def tensor_uses(gm: fx.GraphModule) -> dict[int, int]:
    """How many call sites use each parameter / buffer (by identity): each call of a module
    using it, and each user of a ``get_attr`` node reading it."""
    uses: dict[int, int] = {}
    for node in gm.graph.nodes:
        tensors: Sequence[torch.Tensor] = ()
        count = 1
        if node.op == "call_module":
            tensors = [t for _, t in gm.get_submodule(node.target).named_parameters(remove_duplicate=False)]
        elif node.op == "get_attr":
            value = attr_tensor(gm, node)
            tensors = [value] if value is not None else []
            count = max(1, len(node.users))
        for t in {id(t): t for t in tensors}.values():
            uses[id(t)] = uses.get(id(t), 0) + count
    return uses


def call_sites(weight: torch.Tensor, bias: Optional[torch.Tensor], uses: dict[int, int]) -> int:
    """At how many call sites a layer's weight or bias is used (the more of the two), by :func:`tensor_uses`."""
    return max(uses.get(id(weight), 1), uses.get(id(bias), 1) if bias is not None else 1)


_METADATA_ATTRS = ("ndim", "shape", "dtype", "device", "layout")
_METADATA_METHODS = ("dim", "ndimension", "size", "numel")


def _reads_metadata_only(node: fx.Node) -> bool:
    """``node`` reads only its input's rank, shape, dtype or device, which a fold does not change."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values, not only its rank, shape, dtype or device."""
    return [u for u in node.users if not _reads_metadata_only(u)]


def _is_rank_read(node: fx.Node) -> bool:
    """``x.ndim`` or ``x.dim()``."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] == ("ndim",)
    return node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1


def rank_checks(x: fx.Node) -> list[tuple[fx.Node, fx.Node, int]]:
    """``(rank read, comparison, k)`` for each ``torch._assert(x.ndim == k)`` (or ``x.dim()``) on ``x``."""
    out = []
    for read in x.users:
        if not _is_rank_read(read):
            continue
        for eq in read.users:
            if eq.op == "call_function" and eq.target is operator.eq and eq.args[:1] == (read,) and len(eq.args) == 2 \
                    and isinstance(eq.args[1], int) and any(u.target is torch._assert for u in eq.users):
                out.append((read, eq, eq.args[1]))
    return out


def known_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    """``node``'s shape from its metadata (``tensor_meta`` from ``ShapeProp``, or ``val``), or None."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape)
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def is_identity_module(module: nn.Module, node: fx.Node) -> bool:
    """``node`` calls ``module``, an ``nn.Identity`` without hooks, on one argument: it returns that argument."""
    return type(module) is nn.Identity and not (module._forward_hooks or module._forward_pre_hooks) \
        and len(node.args) == 1 and not node.kwargs
