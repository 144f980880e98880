"""Deploy: ``fold`` bakes inference batch-norms (and renorm layers) into the conv / linear before them.

    deploy = renorm_fx.fold(model.eval())                     # a torch.fx.GraphModule
    print(deploy.fold_report)                                  # what folded, what did not and why
    renorm_fx.export_onnx(deploy, (x,), "model.onnx")     # torch.onnx.export(dynamo=True)

At inference a batch-norm — and batch renorm, whose inference is batchnorm's — is the
per-channel map ``x * scale + shift`` with ``scale = gamma / sqrt(running_var + eps)``
and ``shift = beta - running_mean * scale``, so it vanishes into the weights and bias of
the layer before it. Batch-norm subclasses with their own forward (norm + activation
layers) are inlined first, so their normalization folds and their activation stays; conv
branches summed in parallel (RepVGG / MobileOne blocks) become one conv. The graph pass
is :mod:`renorm_fx.passes.fold_pass`, its arithmetic :mod:`renorm_fx.fusion`, the modules
it leaves in a model :mod:`renorm_fx.modules`.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import ScaleShift
from .passes.fold_pass import FoldReport, fold_batch_norms
from .tracing import trace_model

__all__ = ["fold", "FoldReport", "ScaleShift", "export_onnx"]

logger = logging.getLogger(__name__)
_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")

TRAINING_MODE_MESSAGE = (
    "fold: model is in training mode; folding bakes in the moving statistics. Call fold(model.eval())."
)


def _eval_graph(model: nn.Module) -> fx.Graph:
    return trace_model(model, "fold", (_BatchNorm, ScaleShift),
                       "Fold the traceable submodules instead (e.g. model.backbone = fold(model.backbone)).")


def fold(
    model: nn.Module,
    inplace: bool = False,
    *,
    example_inputs: Optional[Sequence[Any]] = None,
) -> fx.GraphModule:
    """Fold every inference batch-norm of ``model`` into the conv / linear before it.

    Args:
        model: an eval-mode module ``torch.fx`` can trace (renormified or not).
            Batch-norms (``_BatchNorm`` modules, ``F.batch_norm(training=False)``)
            whose input is an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or
            ``nn.Linear`` output (or an ``F.conv*`` / ``F.linear`` call on attribute
            weights) are folded into that layer's weight and bias. A batch-norm
            subclass with its own forward (``F.batch_norm``, then an activation, as
            timm's ``BatchNormAct2d``) has that forward inlined: its normalization
            folds, the rest stays. Convs on one input whose outputs are summed, with
            or without the input itself (RepVGG / MobileOne blocks), become one conv.
        inplace: reuse ``model``'s modules: the folded layers' weights are replaced
            on them, so ``model`` itself is no longer valid afterwards. By default
            the result owns copies and ``model`` is untouched.
        example_inputs: optional inputs; if given, shapes are propagated first and
            each fold is checked against them instead of by a run-time rank check.

    Returns:
        A ``torch.fx.GraphModule`` in eval mode, with the :class:`FoldReport` of what
        was done as its ``fold_report`` attribute (kept by ``copy.deepcopy`` and
        pickling). Batch-norms that cannot fold (the layer's output has other users,
        the layer is called at several sites, nothing foldable before them) become one
        :class:`ScaleShift` each; those with batch statistics stay batchnorm, and so do
        subclasses whose forward fold cannot follow. The report is also logged at INFO
        level on ``renorm_fx.deploy``.

    Raises:
        RuntimeError: ``model`` is in training mode.
    """
    return _fold(model, inplace, example_inputs)


def _fold(model: nn.Module, inplace: bool = False, example_inputs: Optional[Sequence[Any]] = None,
          **pass_options: bool) -> fx.GraphModule:
    """:func:`fold`, with the pass's options (``fold_batch_norms(gm, **pass_options)``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected an nn.Module, got {type(model).__name__}")
    if model.training:
        raise RuntimeError(TRAINING_MODE_MESSAGE)
    graph = _eval_graph(model)
    gm = fx.GraphModule(model, graph, class_name="FoldedModule")
    if not inplace:
        gm = copy.deepcopy(gm)
    gm.eval()
    if example_inputs is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    report = fold_batch_norms(gm, **pass_options)
    gm.eval()
    _attach_report(gm, report)
    logger.info("%s", report.table())
    return gm


def _attach_report(gm: fx.GraphModule, report: FoldReport) -> None:
    gm.fold_report = report
    # GraphModule's deepcopy rebuilds the module and keeps only the attributes listed here
    gm.meta.setdefault(_PRESERVED, {})["fold_report"] = report


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[Any],
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    fold_first: bool = True,
    dynamic_batch: bool = False,
    optimize: bool = True,
    **kwargs: Any,
) -> Any:
    """Export ``model`` (folded first, unless ``fold_first=False``) to ONNX.

    Uses ``torch.onnx.export(..., dynamo=True)`` (needs the ``deploy`` extra:
    ``onnx``, ``onnxscript``). ``dynamic_batch=True`` makes dim 0 of every input
    dynamic. Saves to ``path`` if given; returns the ``torch.onnx.ONNXProgram``.
    """
    if fold_first and not _is_folded(model):
        model = fold(model)
    if model.training:
        raise RuntimeError(TRAINING_MODE_MESSAGE.replace("fold(model.eval())", "export_onnx(model.eval(), ...)"))
    args = tuple(example_inputs)
    if dynamic_batch and "dynamic_shapes" not in kwargs:
        batch = torch.export.Dim("batch")
        kwargs["dynamic_shapes"] = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    kwargs.setdefault("verbose", False)
    program = torch.onnx.export(model, args, dynamo=True, optimize=optimize, **kwargs)
    if path is not None:
        program.save(os.fspath(path))
    return program


def _is_folded(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and type(model).__name__ == "FoldedModule"
