"""Deploy: ``fold`` bakes inference batch-norms (and renorm layers) into the conv / linear before them.

    deploy = renorm_fx.fold(model.eval())                     # a torch.fx.GraphModule
    deploy, report = renorm_fx.fold(model.eval(), report=True)
    print(report)                                              # what folded, what did not and why
    renorm_fx.export_onnx(deploy, (x,), "model.onnx")     # torch.onnx.export(dynamo=True)

At inference a batch-norm — and batch renorm, whose inference is batchnorm's — is the
per-channel map ``x * scale + shift`` with ``scale = gamma / sqrt(running_var + eps)``
and ``shift = beta - running_mean * scale``, so it vanishes into the weights and bias of
the layer before it. The graph pass is :mod:`renorm_fx.passes.fold_pass`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from .layer import RenormLayer
from .tracing import trace_model
from .passes.fold_pass import ScaleShift, fold_batch_norms

__all__ = ["fold", "FoldReport", "ScaleShift", "export_onnx"]

logger = logging.getLogger(__name__)

TRAINING_MODE_MESSAGE = (
    "fold: model is in training mode; folding bakes in the moving statistics. Call fold(model.eval())."
)


@dataclasses.dataclass
class FoldReport:
    """What :func:`fold` did.

    ``folded`` maps each folded batch-norm to the conv / linear it went into;
    ``not_folded`` maps each other batch-norm to the reason. Names are the model's
    qualified names (a module's later call sites are ``"name (call 2)"``, ...).
    """

    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    not_folded: dict[str, str] = dataclasses.field(default_factory=dict)

    def table(self) -> str:
        rows = [(bn, "folded into " + conv) for bn, conv in self.folded.items()]
        rows += [(bn, "NOT folded: " + why) for bn, why in self.not_folded.items()]
        if not rows:
            return "fold: no batch-norm found"
        width = max(len("batch-norm"), *(len(bn) for bn, _ in rows))
        lines = [f"fold: {len(self.folded)} folded, {len(self.not_folded)} not folded",
                 f"{'batch-norm':<{width}}  result", f"{'-' * width}  {'-' * 6}"]
        lines += [f"{bn:<{width}}  {what}" for bn, what in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _eval_graph(model: nn.Module) -> fx.Graph:
    return trace_model(model, "fold", (_BatchNorm, ScaleShift),
                       "Fold the traceable submodules instead (e.g. model.backbone = fold(model.backbone)).")


def fold(
    model: nn.Module,
    inplace: bool = False,
    report: bool = False,
    *,
    example_inputs: Optional[Sequence[Any]] = None,
) -> Union[fx.GraphModule, tuple[fx.GraphModule, FoldReport]]:
    """Fold every inference batch-norm of ``model`` into the conv / linear before it.

    Args:
        model: an eval-mode module ``torch.fx`` can trace (renormified or not).
            Batch-norms (``_BatchNorm`` modules, ``F.batch_norm(training=False)``)
            whose input is an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or
            ``nn.Linear`` output (or an ``F.conv*`` / ``F.linear`` call on attribute
            weights) are folded into that layer's weight and bias.
        inplace: reuse ``model``'s modules: the folded layers' weights are replaced
            on them, so ``model`` itself is no longer valid afterwards. By default
            the result owns copies and ``model`` is untouched.
        report: also return a :class:`FoldReport`.
        example_inputs: optional inputs; if given, shapes are propagated first and
            each fold is checked against them instead of by a run-time rank check.

    Returns:
        A ``torch.fx.GraphModule`` in eval mode (and the report, if ``report=True``).
        Batch-norms that cannot fold (the layer's output has other users, the layer is
        called at several sites, nothing foldable before them) become one
        :class:`ScaleShift` each; those with batch statistics stay batchnorm. The
        report is also logged at INFO level on ``renorm_fx.deploy``.

    Raises:
        RuntimeError: ``model`` is in training mode.
    """
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
    result = fold_batch_norms(gm)
    gm.eval()
    out = FoldReport(dict(result.folded), dict(result.not_folded))
    logger.info("%s", out.table())
    return (gm, out) if report else gm


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
        model = fold(model)  # type: ignore[assignment]
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
