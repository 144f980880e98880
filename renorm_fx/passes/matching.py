"""What the passes match: batch-norm modules and functional batch-norm calls."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["BATCH_NORM_FUNCTIONS", "bind_batch_norm", "expected_ranks", "free_name", "stats_owner"]

_TORCH_SIG = inspect.Signature(
    [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in
     ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")]
)
#: The functional batch-norms, with their signatures (``torch.batch_norm`` orders its arguments differently).
BATCH_NORM_FUNCTIONS = {F.batch_norm: inspect.signature(F.batch_norm), torch.batch_norm: _TORCH_SIG}


def bind_batch_norm(node: fx.Node) -> Optional[dict[str, Any]]:
    """A functional batch-norm call's arguments by name (defaults filled in), or None."""
    if node.op != "call_function" or node.target not in BATCH_NORM_FUNCTIONS:
        return None
    try:
        bound = BATCH_NORM_FUNCTIONS[node.target].bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def expected_ranks(module: nn.Module) -> tuple[int, ...]:
    """The input ranks a batch-norm module accepts (() for any)."""
    if isinstance(module, nn.BatchNorm1d):
        return (2, 3)
    if isinstance(module, nn.BatchNorm2d):
        return (4,)
    if isinstance(module, nn.BatchNorm3d):
        return (5,)
    return ()


def stats_owner(mean: Any) -> Optional[str]:
    """The module owning a running-mean ``get_attr`` node (``a.b`` for ``a.b.running_mean``), or None."""
    if isinstance(mean, fx.Node) and mean.op == "get_attr" and "." in str(mean.target):
        return str(mean.target).rsplit(".", 1)[0]
    return None


def free_name(module: nn.Module, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ...: the first that is not an attribute of ``module``."""
    free, n = name, 0
    while hasattr(module, free):
        n += 1
        free = f"{name}_{n}"
    return free
