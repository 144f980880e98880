"""FX pass: fold inference-mode batch-norms into the conv / linear layer before them.

:func:`fold_batch_norms` runs three steps on a graph traced in eval mode (batch-norm modules
kept as calls), and returns a :class:`FoldReport`:

1. **Inline norm subclasses** with their own forward, so that their batch-norm call is
   matched like any other (:mod:`renorm_fx.passes.inline_norms`).
2. **Fold** (this module), below.
3. **Merge parallel branches** of convs into one conv, RepVGG / MobileOne
   re-parameterization (:mod:`renorm_fx.passes.merge_branches`).

The fold matches

* ``call_module`` nodes whose module is a plain ``_BatchNorm`` (``nn.BatchNorm1d/2d/3d``,
  ``nn.SyncBatchNorm``, renorm layers of them) in eval mode with running statistics;
* ``call_function`` nodes calling ``F.batch_norm`` / ``torch.batch_norm`` with
  ``training=False`` whose running statistics (and affine, if any) are ``get_attr``
  nodes.

At inference such a layer is a per-channel affine map of its input::

    y = gamma * (x - mu) / sqrt(running_var + eps) + beta  =  x * scale + shift
    scale = gamma / sqrt(running_var + eps),   shift = beta - mu * scale

so when its input is the output of a layer that is itself linear per output
channel — an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear``
module, or an ``F.conv*d`` / ``F.conv_transpose*d`` / ``F.linear`` call whose weight
(and bias) are ``get_attr`` nodes — the map is multiplied into that layer's weight and
added to its bias (:mod:`renorm_fx.fusion`), and the normalization node disappears.

A fold must change the layer's weights, so it needs the layer's output to feed only
the batch-norm and the weights to be used at that one call site. Where that does not
hold (another user of the conv's output, a module or weight used at several sites,
normalization before the conv as in pre-activation nets, a non-linearity in between, a
model input) the batch-norm becomes one :class:`~renorm_fx.modules.ScaleShift` — the
same map, with ``scale`` and ``shift`` as buffers — and the reason is recorded.
Batch-norms that use batch statistics in eval mode (``track_running_stats=False``, or
kept in training mode) are not affine maps of their input and stay as they are.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..fusion import batch_norm_affine, fold_weights
from ..modules import ScaleShift
from .graph_utils import (MODULE_LAYERS, attr_tensor, call_sites, known_shape, layer_class, not_plain,
                          rank_checks, tensor_uses, value_users)
from .inline_norms import inline_norm_subclasses, overrides_forward
from .matching import BATCH_NORM_FUNCTIONS, bind_batch_norm, free_name, expected_ranks, stats_owner
from .merge_branches import merge_parallel_convs

__all__ = ["FoldReport", "fold_batch_norms"]


@dataclasses.dataclass
class FoldReport:
    """What :func:`renorm_fx.fold` (the pass :func:`fold_batch_norms`) did.

    ``folded`` maps each folded batch-norm to the conv / linear it went into;
    ``not_folded`` maps each other batch-norm to the reason. ``merged`` maps each conv
    that parallel branches were merged into to the branches (convs, identity batch-norms),
    ``not_merged`` each set of branches that could not merge (``"a + b"``) to the reason.
    Names are the model's qualified names (a module's later call sites are
    ``"name (call 2)"``, ...).
    """

    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    not_folded: dict[str, str] = dataclasses.field(default_factory=dict)
    merged: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    not_merged: dict[str, str] = dataclasses.field(default_factory=dict)

    def table(self) -> str:
        rows = [(bn, "folded into " + conv) for bn, conv in self.folded.items()]
        rows += [(bn, "NOT folded: " + why) for bn, why in self.not_folded.items()]
        merges = [(conv, "merged: " + " + ".join(branches)) for conv, branches in self.merged.items()]
        merges += [(branches, "NOT merged: " + why) for branches, why in self.not_merged.items()]
        if not rows and not merges:
            return "fold: no batch-norm found"
        head = f"fold: {len(self.folded)} folded, {len(self.not_folded)} not folded"
        if merges:
            head += f"; {len(self.merged)} branch blocks merged, {len(self.not_merged)} not merged"
        lines = [head]
        for title, table in (("batch-norm", rows), ("conv", merges)):
            if table:
                width = max(len(title), *(len(name) for name, _ in table))
                lines += [f"{title:<{width}}  result", f"{'-' * width}  {'-' * 6}"]
                lines += [f"{name:<{width}}  {what}" for name, what in table]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# functional layers: target -> (kind, spatial rank); weight at args[1], bias at args[2]
_FUNCTIONAL_LAYERS: dict[Any, tuple[str, int]] = {
    F.linear: ("linear", 0),
    F.conv1d: ("conv", 1), F.conv2d: ("conv", 2), F.conv3d: ("conv", 3),
    F.conv_transpose1d: ("conv_transpose", 1), F.conv_transpose2d: ("conv_transpose", 2),
    F.conv_transpose3d: ("conv_transpose", 3),
}
# groups is positional argument 6 of both F.conv*d(input, weight, bias, stride, padding, dilation,
# groups) and F.conv_transpose*d(input, weight, bias, stride, padding, output_padding, groups, dilation)
_GROUPS_ARG = 6


# ---- the pass ----------------------------------------------------------------------------

def fold_batch_norms(gm: fx.GraphModule, *, inline_subclasses: bool = True,
                     merge_branches: bool = True) -> FoldReport:
    """Fold the inference batch-norms of ``gm`` into the layers before them, in place.

    Changes the folded layers' weight and bias (new ``nn.Parameter`` objects on their
    modules, or new attributes for functional layers): pass a copy to keep the
    original. Non-foldable batch-norms with running statistics become
    :class:`ScaleShift` modules. Nodes with shape metadata (``tensor_meta`` from
    ``ShapeProp``, or ``val``) are checked against it; elsewhere a fold whose channel
    dim the batch-norm does not pin down gets a run-time rank check. Recompiles ``gm``
    and returns what was done.

    ``inline_subclasses`` / ``merge_branches``: steps 1 and 3 of the module docstring,
    :mod:`~renorm_fx.passes.inline_norms` and :mod:`~renorm_fx.passes.merge_branches`
    (both off: batch-norm subclasses with their own forward stay calls, sums of branches
    stay sums).
    """
    graph = gm.graph
    report = FoldReport()
    kept, inlined = inline_norm_subclasses(gm) if inline_subclasses else ({}, {})
    uses = tensor_uses(gm)
    scale_shifts: dict[str, str] = {}  # batch-norm module target / node name -> ScaleShift target
    replaced: dict[fx.Node, str] = {}  # ScaleShift node -> the batch-norm it stands for
    removed_attrs: set[str] = set()

    norms: list[_Norm] = []
    seen: dict[str, int] = {}
    for node in graph.nodes:
        norm = _match_norm(gm, node, kept)
        if norm is None:
            continue
        seen[norm.name] = seen.get(norm.name, 0) + 1
        if seen[norm.name] > 1:  # a module (or statistics) used at several sites
            norm.name = f"{norm.name} (call {seen[norm.name]})"
        norms.append(norm)

    for norm in norms:
        node = norm.node
        if norm.stats is None:
            report.not_folded[norm.name] = norm.reason
            continue
        mean, var, gamma, beta, eps = norm.stats
        scale, shift = batch_norm_affine(mean, var, gamma, beta, eps)
        x = _norm_input(node)
        layer, reason = (None, "its input is not a graph value") if not isinstance(x, fx.Node) \
            else _match_layer(gm, x)
        if layer is not None:
            reason = _why_not(layer, norm, uses, scale.numel())
        if layer is None or reason:
            with graph.inserting_before(node):
                dtype = torch.promote_types(mean.dtype, torch.float32)  # half statistics: keep float32
                target = _scale_shift(gm, norm, scale.to(dtype), shift.to(dtype), scale_shifts, inlined.get(node))
                new = graph.call_module(target, (x,))
            node.replace_all_uses_with(new)
            new.name, node.name = node.name, new.name  # the replacement keeps the batch-norm's name
            replaced[new] = norm.name
            report.not_folded[norm.name] = f"{reason}; replaced by x * scale + shift"
        else:
            _fold_into(gm, layer, scale, shift)
            if _known_rank(layer.node) is None and norm.ranks != (_layer_rank(layer),):
                _insert_rank_guard(graph, layer, norm)
            node.replace_all_uses_with(layer.node)
            report.folded[norm.name] = layer.name
        inputs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        graph.erase_node(node)
        for a in inputs:
            if not a.users:
                removed_attrs.add(a.target)
                graph.erase_node(a)

    if merge_branches:
        merges = merge_parallel_convs(gm, replaced)
        for bn, conv in merges.absorbed:  # the identity batch-norm is in the merged conv now
            report.not_folded.pop(bn, None)
            report.folded[bn] = conv
        report.merged.update(merges.merged)
        report.not_merged.update(merges.not_merged)
    graph.lint()
    _drop_unused_attrs(gm, removed_attrs)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return report


# ---- step 2: matching batch-norms and the layers before them --------------------------------

@dataclasses.dataclass
class _Norm:
    """One inference batch-norm site."""

    node: fx.Node
    name: str
    stats: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], float]]
    ranks: tuple[int, ...]  # input ranks the layer accepts (() = any)
    module: Optional[nn.Module] = None
    reason: str = ""  # why it cannot be expressed as x * scale + shift


def _norm_input(node: fx.Node) -> Any:
    """The batch-norm's input, read now (an earlier fold may have rewired it)."""
    if node.op == "call_module":
        return node.args[0] if node.args else node.kwargs.get("input")
    args = bind_batch_norm(node)
    return None if args is None else args["input"]


def _match_norm(gm: fx.GraphModule, node: fx.Node, kept: dict[fx.Node, str]) -> Optional[_Norm]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, _BatchNorm):
            return None
        norm = _Norm(node, node.target, None, expected_ranks(module), module)
        if module.training:
            norm.reason = "in training mode inside an eval model: uses batch statistics, kept as batchnorm"
        elif module.running_mean is None or module.running_var is None:
            norm.reason = "track_running_stats=False: uses batch statistics in eval mode, kept as batchnorm"
        elif overrides_forward(module):
            norm.reason = kept.get(node, f"{type(module).__name__} overrides forward: not a plain batchnorm, kept as is")
        else:
            norm.stats = (module.running_mean, module.running_var, module.weight, module.bias, float(module.eps))
        return norm
    if node.op == "call_function" and node.target in BATCH_NORM_FUNCTIONS:
        a = bind_batch_norm(node)
        if a is None:
            return None
        name = stats_owner(a["running_mean"]) or node.name
        norm = _Norm(node, name, None, _asserted_rank(a["input"]))
        mean, var = attr_tensor(gm, a["running_mean"]), attr_tensor(gm, a["running_var"])
        weight, bias = attr_tensor(gm, a["weight"]), attr_tensor(gm, a["bias"])
        if a["training"] is not False:
            norm.reason = "called with training=True (or a traced flag): uses batch statistics, kept as batchnorm"
        elif a["running_mean"] is None or a["running_var"] is None:
            norm.reason = "no running statistics: uses batch statistics, kept as batchnorm"
        elif mean is None or var is None or (a["weight"] is not None and weight is None) or (
                a["bias"] is not None and bias is None) or not isinstance(a["eps"], (int, float)):
            norm.reason = "statistics, affine or eps are computed in the graph, not attributes: kept as batchnorm"
        else:
            norm.stats = (mean, var, weight, bias, float(a["eps"]))
        return norm
    return None


@dataclasses.dataclass
class _Layer:
    """A conv / linear producer: where its weight and bias live."""

    node: fx.Node
    name: str
    kind: str
    spatial: int
    groups: int
    out_channels: int
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    module: Optional[nn.Module] = None


def _match_layer(gm: fx.GraphModule, node: fx.Node) -> tuple[Optional[_Layer], str]:
    """The layer ``node`` calls, or why it is not one a batch-norm can fold into."""
    if node.op == "placeholder":
        return None, f"its input {node.name!r} is a model input, not a conv / linear output"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        base = layer_class(module)
        if base is None:
            return None, (f"its input comes from {type(module).__name__} {node.target!r}, "
                          f"not a conv / linear layer")
        reason = not_plain(module, base, node.target)
        if reason:
            return None, reason
        kind, spatial = MODULE_LAYERS[base]
        groups = getattr(module, "groups", 1)
        out = module.out_features if kind == "linear" else module.out_channels
        return _Layer(node, node.target, kind, spatial, groups, out, module.weight, module.bias, module), ""
    if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
        kind, spatial = _FUNCTIONAL_LAYERS[node.target]
        args = list(node.args)
        weight_node = args[1] if len(args) > 1 else node.kwargs.get("weight")
        bias_node = args[2] if len(args) > 2 else node.kwargs.get("bias")
        weight = attr_tensor(gm, weight_node)
        bias = attr_tensor(gm, bias_node)
        if weight is None or (bias_node is not None and bias is None):
            return None, f"{node.name!r} takes its weight / bias from the graph, not from attributes"
        groups = 1
        if kind != "linear":
            groups = args[_GROUPS_ARG] if len(args) > _GROUPS_ARG else node.kwargs.get("groups", 1)
            if not isinstance(groups, int):
                return None, f"{node.name!r} has a computed groups argument"
        name = weight_node.target.rsplit(".", 1)[0] if "." in weight_node.target else node.name
        out = weight.shape[1] * groups if kind == "conv_transpose" else weight.shape[0]
        return _Layer(node, name, kind, spatial, groups, out, weight, bias), ""
    what = node.target.__name__ if callable(node.target) and hasattr(node.target, "__name__") else node.target
    return None, f"its input comes from {node.op} {what!r} ({node.name}), not a conv / linear layer"


def _asserted_rank(x: Any) -> tuple[int, ...]:
    """``(k,)`` if the graph asserts ``x.ndim == k`` (``torch._assert``, as timm's norm layers), else ()."""
    ranks = {k for _, _, k in rank_checks(x)} if isinstance(x, fx.Node) else set()
    return tuple(ranks) if len(ranks) == 1 else ()


def _why_not(layer: _Layer, norm: _Norm, uses: dict[int, int], channels: int) -> str:
    others = [u.name for u in value_users(layer.node) if u is not norm.node]
    if others:
        return (f"the output of {layer.name!r} has other users besides the batch-norm "
                f"({', '.join(others)}): folding would change them too")
    sites = call_sites(layer.weight, layer.bias, uses)
    if sites > 1:
        return f"{layer.name!r} is used at {sites} call sites (shared weights): folding would change all of them"
    if layer.out_channels != channels:
        return f"{layer.name!r} has {layer.out_channels} output channels, the batch-norm {channels}"
    if layer.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"{layer.name!r} has {layer.weight.dtype} weights"
    want, known = _layer_rank(layer), _known_rank(layer.node)
    if known is not None and known != want:
        return (f"the output of {layer.name!r} is {known}-D: the batch-norm normalizes its dim 1, "
                f"not the layer's output channels")
    if norm.ranks and want not in norm.ranks:
        return f"the output of {layer.name!r} is {want}-D, which the batch-norm does not accept"
    return ""



def _layer_rank(layer: _Layer) -> int:
    """The rank the layer's output has when its input is batched (channels on dim 1)."""
    return 2 if layer.kind == "linear" else layer.spatial + 2


def _known_rank(node: fx.Node) -> Optional[int]:
    shape = known_shape(node)
    return None if shape is None else len(shape)



def _insert_rank_guard(graph: fx.Graph, layer: _Layer, norm: _Norm) -> None:
    """Assert at run time that the folded layer's channels are dim 1, as the fold assumed.

    Only where the batch-norm alone does not imply it: ``BatchNorm1d`` accepts 2-D and
    3-D input, so ``Linear`` on ``(N, C, L)`` input followed by ``BatchNorm1d(C)`` with
    ``C == out_features`` would normalize dim 1, not the linear's features. Shapes are
    static under ``torch.export``, so the check costs nothing in an exported model.
    """
    want = _layer_rank(layer)
    message = (f"fold: {norm.name!r} was folded into {layer.name!r} assuming a {want}-D output; "
               f"for another rank, refold with fold(model, example_inputs=...)")
    prefix = layer.node.name
    with graph.inserting_after(layer.node):
        dim = graph.call_method("dim", (layer.node,))
    with graph.inserting_after(dim):
        same = graph.call_function(operator.eq, (dim, want))
    with graph.inserting_after(same):
        check = graph.call_function(torch._assert, (same, message))
    for node, suffix in ((dim, "dim"), (same, f"is_{want}d"), (check, "rank_check")):
        node._rename(f"{prefix}_{suffix}")


def _fold_into(gm: fx.GraphModule, layer: _Layer, scale: torch.Tensor, shift: torch.Tensor) -> None:
    weight, bias = fold_weights(layer.weight, layer.bias, scale, shift, layer.kind, layer.groups)
    grad = layer.weight.requires_grad
    if layer.module is not None:
        layer.module.weight = nn.Parameter(weight, requires_grad=grad)
        layer.module.bias = nn.Parameter(bias, requires_grad=grad)
        return
    node = layer.node
    weight_node = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    _set_attr(gm, weight_node.target, weight, grad)
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias_node is not None:
        _set_attr(gm, bias_node.target, bias, grad)
        return
    owner, _, leaf = weight_node.target.rpartition(".")
    target = free_name(gm.get_submodule(owner), f"{leaf}_folded_bias")
    target = f"{owner}.{target}" if owner else target
    _set_attr(gm, target, bias, grad)
    with gm.graph.inserting_before(node):
        bias_node = gm.graph.get_attr(target)
    if len(node.args) > 2:
        node.update_arg(2, bias_node)
    else:
        node.update_kwarg("bias", bias_node)


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor, grad: bool) -> None:
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner)
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        if hasattr(module, leaf) and leaf not in module._parameters:
            delattr(module, leaf)
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=grad))


def _scale_shift(gm: fx.GraphModule, norm: _Norm, scale: torch.Tensor, shift: torch.Tensor,
                 done: dict[str, str], inlined_from: Optional[str] = None) -> str:
    """The target of the :class:`ScaleShift` standing in for ``norm`` (one per batch-norm module):
    the module's own name, ``<module>.scale_shift`` for an inlined subclass's batch-norm call,
    ``<node>_scale_shift`` for another functional call."""
    node = norm.node
    key = node.target if node.op == "call_module" else node.name
    if key not in done:
        if node.op == "call_module":
            target = node.target  # takes the batch-norm module's place and name
        elif inlined_from is not None:
            target = f"{inlined_from}.{free_name(gm.get_submodule(inlined_from), 'scale_shift')}"
        else:
            target = free_name(gm, f"{node.name}_scale_shift")
        gm.add_submodule(target, ScaleShift(scale, shift))
        done[key] = target
    return done[key]


def _drop_unused_attrs(gm: fx.GraphModule, targets: set[str]) -> None:
    """Remove tensors only the erased batch-norms read (a functional layer's statistics)."""
    still = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for target in targets:
        if any(t == target or target.startswith(t + ".") for t in still):
            continue
        owner, _, leaf = target.rpartition(".")
        try:
            module = gm.get_submodule(owner)
        except AttributeError:
            continue
        for table in (module._parameters, module._buffers):
            table.pop(leaf, None)
        if leaf in module.__dict__:
            del module.__dict__[leaf]
