"""``renormify``: the one-call model transform. The user's model is kept; its batch-norms become renorm."""

from __future__ import annotations

import copy
import types
import warnings
from typing import Any, Optional, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import RenormConfig
from .errors import RenormTraceError
from .layer import NothingToConvert, RenormLayer, convert_layer, renorm_layers, was_renorm_layer
from .schedule import RenormSchedule
from .tracing import UNTRACEABLE_HINT

__all__ = ["renormify"]

SYNC_ORDER_HINT = (
    "nn.SyncBatchNorm.convert_sync_batchnorm rebuilds batch-norm layers from scratch, so it turns renorm layers "
    "back into plain batchnorm. Call it first, then renormify (which converts SyncBatchNorm layers): "
    "renormify(nn.SyncBatchNorm.convert_sync_batchnorm(model))."
)


def renormify(
    model: nn.Module,
    schedule: Union[RenormSchedule, RenormConfig, None] = None,
    momentum: Optional[float] = None,
    inplace: bool = False,
    *,
    config: Optional[RenormConfig] = None,
    running_stats: Optional[str] = None,
    sync: Optional[bool] = None,
    process_group: Optional[Any] = None,
    nonfinite_guard: Optional[bool] = None,
    strict: Optional[bool] = None,
    virtual_batch_size: Optional[int] = None,
) -> nn.Module:
    """Turn every training-mode batch-norm of ``model`` into batch renorm, keeping the model.

    Returns ``model``'s deep copy (``inplace=True``: ``model`` itself), of the same class,
    with every attribute, method, container, hook and qualified name. Each batch-norm layer
    (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and subclasses with their own forward)
    becomes a renorm layer: still an instance of its class, with the same parameters,
    buffers and ``state_dict``, that runs renorm in training mode (its own forward, traced,
    with the batch-norm call rewritten: ``print(layer.code)``) and its original forward in
    eval mode. A module whose own forward calls ``F.batch_norm`` / ``torch.batch_norm``
    gets the same treatment. Only these layers are traced, never the whole model.

    Args:
        model: any module (a bare batch-norm layer too).
        schedule: the clip bounds (default :meth:`RenormSchedule.paper`), or a whole
            :class:`RenormConfig`.
        momentum: the moving-average rate ``alpha`` for every layer (becomes its ``momentum``).
        inplace: convert ``model`` itself instead of a copy.
        config: a :class:`RenormConfig`; the other keyword arguments (its fields) override it.

    Warns (``strict=True``: raises) naming each batch-norm it cannot convert: no running
    statistics, or a forward torch.fx cannot trace or that has no batch-norm call to rewrite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"renormify: expected an nn.Module, got {type(model).__name__}")
    if isinstance(schedule, RenormConfig):
        if config is not None:
            raise TypeError("renormify: pass the RenormConfig once (as the second argument or as config=).")
        schedule, config = None, schedule
    config = RenormConfig.build("renormify", config, schedule=schedule, momentum=momentum,
                                running_stats=running_stats, sync=sync, process_group=process_group,
                                nonfinite_guard=nonfinite_guard, strict=strict,
                                virtual_batch_size=virtual_batch_size)
    rebuilt = [n for n, m in model.named_modules() if was_renorm_layer(m)]
    if rebuilt:
        warnings.warn(f"renormify: {', '.join(map(repr, rebuilt))} held a renorm layer's statistics but are plain "
                      f"batchnorm now; converting them again. {SYNC_ORDER_HINT}", stacklevel=2)
    _check_momentum(model, config)  # before anything is converted: never a model converted half-way
    if renorm_layers(model) and not _convertible(model):
        warnings.warn("renormify: the model is already renormified; returning it unchanged.", stacklevel=2)
        return model
    # process groups (of SyncBatchNorm layers) are shared by the copy, never copied
    groups = {id(m.process_group): m.process_group for m in model.modules() if isinstance(m, nn.SyncBatchNorm)}
    root = model if inplace else copy.deepcopy(model, groups)
    converted, problems = _convert_all(root, config)
    if problems:
        message = "renormify: left as batchnorm (never converted half-way):\n" + "\n".join(
            f"  - {name!r}: {why}" for name, why in problems)
        if config.strict:
            raise ValueError(message + "\n(strict=True; strict=False converts the others and warns.)")
        warnings.warn(message, stacklevel=2)
    if not converted:
        if not problems:
            warnings.warn(f"renormify: {type(model).__name__} has no batch-norm to convert; returned unchanged.",
                          stacklevel=2)
        return model
    _ignore_diagnostics_in_ddp(root)
    return root


def _convertible(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and not isinstance(m, RenormLayer) and m.running_mean is not None
               for m in model.modules())


def _convert_all(root: nn.Module, config: RenormConfig) -> tuple[list[str], list[tuple[str, str]]]:
    converted: list[str] = []
    problems: list[tuple[str, str]] = []
    for name, module in list(root.named_modules()):
        if isinstance(module, RenormLayer):
            continue
        shown = name or type(module).__name__
        if isinstance(module, _BatchNorm):
            why = _unconvertible(module)
            if why:
                problems.append((shown, why))
                continue
        elif not _calls_batch_norm(type(module)):
            continue
        try:
            skipped = convert_layer(module, name, config)
        except RenormTraceError as exc:
            problems.append((shown, f"{exc}. {UNTRACEABLE_HINT}"))
            continue
        except NothingToConvert as exc:
            if isinstance(module, _BatchNorm) and not exc.skipped:  # a forward the pass does not understand
                problems.append((shown, f"{exc.reason}; its forward is not one renormify understands"))
            skipped = exc.skipped
        else:
            converted.append(name)
        problems += [(s or shown, "a batch-norm call without running statistics (nothing to renormalize against)")
                     for s in skipped]
    return converted, problems


def _unconvertible(module: _BatchNorm) -> str:
    if module.running_mean is None or module.running_var is None:
        return ("no running statistics (track_running_stats=False): nothing to renormalize against; "
                "give it running statistics (track_running_stats=True)")
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "a lazy batch-norm with uninitialized parameters; run one forward first"
    return ""


def _check_momentum(model: nn.Module, config: RenormConfig) -> None:
    """Refuse ``momentum=None`` layers (cumulative averages) before anything is converted."""
    if config.momentum is not None:
        return
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, RenormLayer) and module.momentum is None \
                and module.running_mean is not None:
            raise ValueError(
                f"renormify: layer {name or type(module).__name__!r} has momentum=None (a cumulative average), which "
                f"would let its running statistics go stale for r and d. Pass renormify(model, momentum=0.01) or "
                f"set the layer's momentum."
            )


def _calls_batch_norm(cls: type) -> bool:
    """Whether a module class of the user's own (not torch.nn's) mentions a functional batch-norm."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass.__module__.startswith("torch.") or klass is object:
            continue
        for value in vars(klass).values():
            code = getattr(value, "__code__", None)
            if code is not None and _mentions(code, "batch_norm"):
                return True
    return False


def _mentions(code: types.CodeType, name: str) -> bool:
    return name in code.co_names or any(isinstance(c, types.CodeType) and _mentions(c, name) for c in code.co_consts)


def _ignore_diagnostics_in_ddp(root: nn.Module) -> None:
    """Diagnostics are each process's own: DDP must not overwrite them with rank 0's every forward."""
    own = [f"{name}.{buf}" if name else buf for name, layer in renorm_layers(root).items()
           for site in layer.renorm_sites for buf in (site.diagnostics, site.nonfinite) if buf]
    ignored = [*getattr(root, "_ddp_params_and_buffers_to_ignore", ()), *own]
    root._ddp_params_and_buffers_to_ignore = list(dict.fromkeys(ignored))
