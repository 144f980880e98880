"""What the passes match: batch-norm modules and functional batch-norm calls."""

from __future__ import annotations

import inspect
import re
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["BATCH_NORM_FUNCTIONS", "DYNAMO_BUFFER", "bind_batch_norm", "expected_ranks", "layer_name"]

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


DYNAMO_BUFFER = re.compile(r"^l_(?:self_)?(?:modules_)?(.*?)_buffers_running_mean_$")


def layer_name(mean: Any) -> Optional[str]:
    """The layer owning a running-mean node: ``a.b`` for ``get_attr a.b.running_mean``, and
    the same for Dynamo's lifted buffers (``l_self_modules_a_modules_b_buffers_running_mean_``)."""
    if isinstance(mean, fx.Node) and mean.op == "get_attr" and "." in mean.target:
        return mean.target.rsplit(".", 1)[0]
    if isinstance(mean, fx.Node) and mean.op == "placeholder":
        match = DYNAMO_BUFFER.match(mean.name)
        if match:
            return match.group(1).replace("_modules_", ".")
    return None
