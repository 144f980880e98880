"""FX pass: merge parallel conv branches into one conv (RepVGG / MobileOne re-parameterization;
step 3 of :func:`renorm_fx.passes.fold_pass.fold_batch_norms`).

A sum (a tree of ``+``, through ``nn.Identity`` and eval-mode dropout calls) of conv outputs
that read the same input — and of that input itself, bare or through a ``ScaleShift`` (an
identity batch-norm) — is one conv: each kernel zero-padded, centered, to the largest, the
identity as a kernel, the biases summed. Merged only when every branch's output feeds only
the sum, each conv is used at one site, and the convs have the same channels, stride,
dilation and groups and paddings that align the padded kernels (and, with an identity, keep
the input's size); otherwise the fold report says why.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
from torch import fx, nn

from ..fusion import merge_conv_weights
from ..modules import ScaleShift
from .graph_utils import (call_sites, is_identity_module, known_shape, layer_class, not_plain, rank_checks,
                          tensor_uses, value_users)

__all__ = ["BranchMerges", "merge_parallel_convs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _is_inplace_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.iadd) or (
        node.op == "call_method" and node.target == "add_")


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _is_passthrough(gm: fx.GraphModule, node: Any) -> bool:
    """An ``nn.Identity`` call, or an eval-mode dropout's: the identity at inference."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return False
    module = gm.get_submodule(node.target)
    if type(module) in _DROPOUTS and not module.training and not (module._forward_hooks or module._forward_pre_hooks):
        return len(node.args) == 1 and not node.kwargs
    return is_identity_module(module, node)


def _sum_terms(gm: fx.GraphModule, root: fx.Node) -> tuple[list[Any], list[fx.Node]]:
    """The terms of the sum ``root`` computes (operands of nested adds, and of ``nn.Identity`` and
    eval-mode dropout calls, that feed only the sum), left to right, and those inner nodes (``root`` first)."""
    terms: list[Any] = []
    inner: list[fx.Node] = []
    stack: list[Any] = [root]
    while stack:
        value = stack.pop()
        if isinstance(value, fx.Node) and (value is root or len(value.users) == 1) and (
                _is_add(value) or _is_passthrough(gm, value)):
            inner.append(value)
            stack.extend(reversed(value.args))
        else:
            terms.append(value)
    return terms, inner


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem)


def _writes_into(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> bool:
    """``node`` may change ``x`` in place: an in-place method or operator on it, ``inplace=True``."""
    if not node.args or node.args[0] is not x:
        return False
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


@dataclasses.dataclass
class _Branches:
    """The terms of one sum that read the same input: conv calls and identities."""

    input: fx.Node
    convs: list[fx.Node] = dataclasses.field(default_factory=list)
    identities: list[fx.Node] = dataclasses.field(default_factory=list)  # ScaleShift calls or the input itself
    order: list[fx.Node] = dataclasses.field(default_factory=list)  # both, as they appear in the sum


@dataclasses.dataclass
class BranchMerges:
    """What :func:`merge_parallel_convs` did (:class:`~renorm_fx.passes.fold_pass.FoldReport` terms)."""

    merged: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # merged conv -> its branches
    not_merged: dict[str, str] = dataclasses.field(default_factory=dict)  # "a + b" -> why not
    # (batch-norm, conv): an identity batch-norm's ScaleShift merged into a conv, in merge order
    absorbed: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def merge_parallel_convs(gm: fx.GraphModule, replaced: dict[fx.Node, str]) -> BranchMerges:
    """Merge each sum of parallel conv branches of ``gm`` into one conv, in place (the module
    docstring). ``replaced`` names the batch-norm each ``ScaleShift`` node stands for. Returns
    what merged, what did not and why; leaves linting and recompiling ``gm`` to the caller."""
    graph = gm.graph
    result = BranchMerges()
    uses = tensor_uses(gm)
    done: set[fx.Node] = set()
    outcomes: list[tuple[list[str], Optional[fx.Node], str]] = []  # per group: branches, merged conv, reason
    for root in reversed(list(graph.nodes)):  # outermost sums first
        if root in done or not _is_add(root):
            continue
        terms, inner = _sum_terms(gm, root)
        done.update(inner)
        merged_away: dict[fx.Node, Optional[fx.Node]] = {}  # branch -> the conv it is in now (None: the input)
        for group in reversed(_branch_groups(gm, terms)):
            names = [_branch_name(gm, n, group, replaced) for n in group.order]
            base, reason = _merge_group(gm, group, inner, uses)
            outcomes.append((names, base, reason))
            if base is None:
                continue
            for n in group.identities:
                if n in replaced:  # the identity batch-norm is in the merged conv now
                    result.absorbed.append((replaced[n], str(base.target)))
            first = next(n for n in graph.nodes if n in group.order and n is not group.input)
            if first is not base:
                first.prepend(base)  # it reads only the input: run it where the first branch ran
            merged_away.update((n, None if n is group.input else base) for n in group.order if n is not base)
        if merged_away:
            _rewrite_sum(graph, root, inner, terms, merged_away)
    for names, base, reason in reversed(outcomes):  # in graph order
        if base is None:
            result.not_merged[" + ".join(names)] = reason
        else:
            result.merged[str(base.target)] = names
    return result


def _branch_groups(gm: fx.GraphModule, terms: list[Any]) -> list[_Branches]:
    """The sets of terms that a conv could replace: convs on one input, with identities of it."""
    groups: dict[fx.Node, _Branches] = {}
    for t in terms:
        if isinstance(t, fx.Node) and t.op == "call_module" and isinstance(gm.get_submodule(t.target), _CONVS) \
                and len(t.args) == 1 and not t.kwargs and isinstance(t.args[0], fx.Node):
            groups.setdefault(t.args[0], _Branches(t.args[0])).convs.append(t)
    for t in terms:
        if not isinstance(t, fx.Node):
            continue
        if t in groups:
            groups[t].identities.append(t)  # the input itself
        elif t.op == "call_module" and isinstance(gm.get_submodule(t.target), ScaleShift) \
                and t.args and t.args[0] in groups:
            groups[t.args[0]].identities.append(t)
    for t in terms:
        for g in groups.values():
            if t in g.convs or t in g.identities:
                g.order.append(t)
    return [g for g in groups.values() if len(g.convs) + len(g.identities) >= 2]


def _branch_name(gm: fx.GraphModule, node: fx.Node, group: _Branches, replaced: dict[fx.Node, str]) -> str:
    if node is group.input:
        return f"{node.name} (identity)"
    return replaced.get(node, str(node.target))


def _padding(conv: nn.Module) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dim, as the conv applies it."""
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    if conv.padding == "same":
        out = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in conv.padding]


def _merge_group(gm: fx.GraphModule, group: _Branches, inner: list[fx.Node],
                 uses: dict[int, int]) -> tuple[Optional[fx.Node], str]:
    """Merge the group's branches into its largest conv (returned), or say why not."""
    for node in inner:
        target = node.args[0] if _is_inplace_add(node) else None
        if isinstance(target, fx.Node) and len(target.users) > 1:
            return None, f"an in-place add ({node.name}) writes into {target.name}, which other nodes read"
    writers = [u.name for u in group.input.users if u not in inner and _writes_into(gm, u, group.input)]
    if writers:
        return None, (f"{group.input.name}, the branches' input, is changed in place ({', '.join(writers)}): "
                      f"the branches may not read the same values")
    convs = [gm.get_submodule(n.target) for n in group.convs]
    for node, conv in zip(group.convs, convs):
        reason = not_plain(conv, layer_class(conv), node.target)
        if reason:
            return None, reason
        if len(value_users(node)) > 1:
            return None, f"the output of {node.target!r} has other users besides the sum"
        if call_sites(conv.weight, conv.bias, uses) > 1:
            return None, f"{node.target!r} is used at several call sites (shared weights)"
        if conv.padding_mode != "zeros" and any(p for lr in _padding(conv) for p in lr):
            return None, f"{node.target!r} pads with padding_mode={conv.padding_mode!r}, not zeros"
    first = convs[0]
    for what in ("in_channels", "out_channels", "stride", "dilation", "groups"):
        values = [getattr(c, what) for c in convs]
        if any(v != values[0] for v in values):
            return None, f"the convs have different {what} ({', '.join(map(str, values))})"
    types = {type(c) for c in convs}
    dtypes = {(c.weight.dtype, c.weight.device) for c in convs}
    if len(types) > 1 or len(dtypes) > 1:
        return None, "the convs are of different kinds, dtypes or devices"
    if first.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None, f"the convs have {first.weight.dtype} weights"
    kernel = tuple(max(ks) for ks in zip(*(c.kernel_size for c in convs)))
    base_index = next((i for i, c in enumerate(convs) if tuple(c.kernel_size) == kernel), None)
    if base_index is None:
        return None, f"no conv has the largest kernel {kernel} in every dimension"
    pad = _padding(convs[base_index])
    for node, conv in zip(group.convs, convs):
        for k, size, d, lr, want in zip(conv.kernel_size, kernel, conv.dilation, _padding(conv), pad):
            off = (size - k) // 2
            if (size - k) % 2 or (lr[0] + off * d, lr[1] + off * d) != want:
                return None, (f"{node.target!r} (kernel {tuple(conv.kernel_size)}, padding {conv.padding}) does not "
                              f"line up with {group.convs[base_index].target!r} (kernel {kernel}, padding "
                              f"{convs[base_index].padding}) once its kernel is padded, centered")
    shapes = {known_shape(n) for n in group.order}
    if len(shapes) > 1 and None not in shapes:
        return None, f"the branches have different shapes {sorted(shapes)}"
    identity = None
    center: Optional[list[int]] = None
    if group.identities:
        if first.in_channels != first.out_channels:
            return None, f"identity branch, but the convs map {first.in_channels} to {first.out_channels} channels"
        if any(s != 1 for s in first.stride) or any(
                lr[0] + lr[1] != d * (k - 1) or lr[0] % d for lr, d, k in zip(pad, first.dilation, kernel)):
            return None, "identity branch, but the convs do not keep the input's size (stride 1, 'same' padding)"
        center = [lr[0] // d for lr, d in zip(pad, first.dilation)]
        scale = torch.zeros(first.out_channels, dtype=torch.float64, device=first.weight.device)
        shift = torch.zeros_like(scale)
        for node in group.identities:
            if node is group.input:
                scale += 1
                continue
            ss = gm.get_submodule(node.target)
            if len(value_users(node)) > 1:
                return None, f"the output of {node.target!r} has other users besides the sum"
            if ss.scale.numel() != first.out_channels:
                return None, f"{node.target!r} scales {ss.scale.numel()} channels, the convs have {first.out_channels}"
            scale += ss.scale.detach().double().to(scale.device)
            shift += ss.shift.detach().double().to(scale.device)
        identity = (scale, shift)
    base_node, base = group.convs[base_index], convs[base_index]
    weight, bias = merge_conv_weights(
        [(c.weight, c.bias) for c in convs], kernel, identity=identity, center=center, like=base.weight,
        bias_dtype=base.bias.dtype if base.bias is not None else base.weight.dtype)
    grad = base.weight.requires_grad
    base.weight = nn.Parameter(weight, requires_grad=grad)
    base.bias = nn.Parameter(bias, requires_grad=grad)
    return base_node, ""


def _rewrite_sum(graph: fx.Graph, root: fx.Node, inner: list[fx.Node], terms: list[Any],
                 merged_away: dict[fx.Node, Optional[fx.Node]]) -> None:
    """Replace the sum ``root`` by the sum of its remaining terms (zeros dropped). What still reads
    a merged-away branch reads only its shape (a rank check): it reads the merged conv's instead."""
    kept = [t for t in terms if not (isinstance(t, fx.Node) and t in merged_away)
            and not (isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0)]
    with graph.inserting_before(root):
        total = kept[0]
        for t in kept[1:]:
            total = graph.call_function(operator.add, (total, t))
    root.replace_all_uses_with(total)
    for node in reversed(list(graph.nodes)):
        if node in inner and not node.users:
            graph.erase_node(node)
    for node, merged in merged_away.items():
        if merged is not None:
            node.replace_all_uses_with(merged)
            graph.erase_node(node)
    for merged in dict.fromkeys(m for m in merged_away.values() if m is not None):
        _drop_repeated_rank_checks(graph, merged)


def _drop_repeated_rank_checks(graph: fx.Graph, node: fx.Node) -> None:
    """Keep one of several ``torch._assert(node.ndim == k)`` checks (each merged branch had one)."""
    seen: set[int] = set()
    for read, eq, k in rank_checks(node):
        checks = [u for u in eq.users if u.target is torch._assert]
        if k not in seen or len(checks) != len(eq.users):
            seen.add(k)
            continue
        for check in checks:
            if not check.users:
                graph.erase_node(check)
        if not eq.users:
            graph.erase_node(eq)
        if not read.users:
            graph.erase_node(read)
