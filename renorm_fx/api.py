"""``renormify`` and ``bounds``: the one-call model transform."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Optional

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import RenormSync
from .graph_module import RenormGraphModule
from .passes.renorm_pass import RenormOptions
from .schedule import RenormSchedule

__all__ = ["renormify", "bounds", "diagnostics", "LayerDiagnostics", "RenormTraceError"]

SCHEDULE_NAME = "renorm_schedule"
SYNC_NAME = "renorm_sync"


class RenormTraceError(RuntimeError):
    """torch.fx could not trace the model."""


class _Tracer(fx.Tracer):
    """Keeps modules of the ``leaves`` types (and torch.nn's own) as leaves."""

    def __init__(self, leaves: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def trace(
    model: nn.Module,
    training: bool,
    caller: str = "renormify",
    fallback: str = "",
    leaves: tuple[type, ...] = (_BatchNorm, RenormGraphModule),
) -> fx.Graph:
    """Trace ``model`` in training or eval mode, batch-norms (subclasses too) and the other
    ``leaves`` kept as modules. Raises :class:`RenormTraceError` naming what failed, with
    ``fallback`` as the way out.
    """
    model.train(training)
    try:
        graph = _Tracer(leaves).trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError, ...
        fallback = fallback or (
            "Use the torch.compile path instead, which captures graphs with Dynamo and "
            "handles these: torch.compile(model, backend='renorm')."
        )
        raise RenormTraceError(
            f"{caller}: torch.fx could not trace {type(model).__name__} in "
            f"{'training' if training else 'eval'} mode: {type(exc).__name__}: {exc}\n"
            f"Symbolic tracing cannot follow data-dependent control flow or non-torch calls. {fallback}"
        ) from exc
    for node in graph.nodes:
        if isinstance(node.type, str):  # postponed annotations: unpicklable as code globals
            node.type = None
    return graph


def renormify(
    model: nn.Module,
    schedule: Optional[RenormSchedule] = None,
    momentum: Optional[float] = None,
    inplace: bool = False,
    *,
    strict: bool = False,
    running_stats: str = "sigma",
    sync: Optional[bool] = None,
    process_group: Optional[Any] = None,
    nonfinite_guard: bool = True,
) -> nn.Module:
    """Turn every training-mode batch-norm of ``model`` into batch renorm.

    Args:
        model: any module torch.fx can trace; ``nn.BatchNorm1d/2d/3d`` (subclasses
            too) and ``F.batch_norm`` / ``torch.batch_norm`` calls are converted.
        schedule: the clip bounds; default :meth:`RenormSchedule.paper`.
        momentum: the moving-average rate ``alpha`` for every layer; default each
            layer's own ``momentum``.
        inplace: reuse ``model``'s parameters and buffers instead of copies.
        strict: raise, instead of warning, on batch-norms that cannot be converted
            (no running statistics: ``track_running_stats=False``).
        running_stats: ``"sigma"`` (the paper: average sigma, stored as
            ``running_var = sigma**2 - eps``) or ``"variance"`` (batchnorm's: average
            the unbiased batch variance, so ``constant(1, 0)`` matches batchnorm's
            buffers too).
        sync: batch statistics across processes (``torch.distributed``). ``False``: each
            process normalizes over its own batch (the paper's setting); ``True``: every
            layer's moments and gradient are those of the global batch of ``process_group``;
            ``None`` (default): ``nn.SyncBatchNorm`` layers synchronize over their own
            ``process_group``, the other layers do not. Without an initialized process
            group, or with one process, nothing is synchronized or communicated.
        process_group: the group ``sync=True`` synchronizes over; default the default
            group, resolved when the model runs.
        nonfinite_guard: a training batch with NaN / Inf leaves the running statistics and
            the step unchanged, with a warning once per layer. ``False`` lets such a batch
            into the statistics, as batchnorm does (it saves a few per-channel operations).

    Returns:
        A :class:`RenormGraphModule` with the same ``state_dict`` keys as ``model``
        (plus a step buffer per functional batch-norm whose statistics have none),
        or ``model`` itself when it has nothing to convert.
    """
    if isinstance(model, RenormGraphModule):
        warnings.warn("renormify: the model is already renormified; returning it unchanged.", stacklevel=2)
        return model
    schedule = RenormSchedule.paper() if schedule is None else schedule
    if not isinstance(schedule, RenormSchedule):
        raise TypeError(f"renormify: schedule must be a RenormSchedule, got {type(schedule).__name__}")
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise ValueError(f"renormify: momentum must be in (0, 1], got {momentum}")
    if process_group is not None and sync is not True:
        raise ValueError("renormify: process_group is the group sync=True synchronizes over; pass sync=True too.")

    was_training = model.training
    # process groups (of SyncBatchNorm layers) are shared by the copy, never copied
    groups = {id(m.process_group): m.process_group for m in model.modules() if isinstance(m, nn.SyncBatchNorm)}
    root = model if inplace else copy.deepcopy(model, groups)
    try:
        eval_graph = trace(root, training=False)
        train_graph = trace(root, training=True)
        # batch-norms a model keeps in eval mode while it trains (frozen) stay batchnorm
        frozen = tuple(n for n, m in root.named_modules() if isinstance(m, _BatchNorm) and not m.training)
    finally:
        model.train(was_training)
        root.train(was_training)

    schedule_name = SCHEDULE_NAME
    while hasattr(root, schedule_name):
        schedule_name = "_" + schedule_name
    root.add_module(schedule_name, schedule)
    sync_name = ""
    if sync:
        sync_name = SYNC_NAME
        while hasattr(root, sync_name):
            sync_name = "_" + sync_name
        root.add_module(sync_name, RenormSync(process_group))
    options = RenormOptions(schedule_name, momentum, running_stats, frozen, sync=sync_name,
                            sync_batch_norm=sync is not False, nonfinite_guard=nonfinite_guard)
    result = RenormGraphModule(root, train_graph, eval_graph, options)
    result.train(was_training)
    if result.renorm_skipped:
        message = (
            f"renormify: {len(result.renorm_skipped)} batch-norm(s) without running statistics "
            f"(track_running_stats=False) have nothing to renormalize against and stay batchnorm: "
            f"{', '.join(result.renorm_skipped)}."
        )
        if strict:
            raise ValueError(message + " Give them running statistics (track_running_stats=True).")
        warnings.warn(message, stacklevel=2)
    if not result.renorm_sites:
        if not result.renorm_skipped:
            warnings.warn(f"renormify: {type(model).__name__} has no batch-norm to convert; returned unchanged.",
                          stacklevel=2)
        root._modules.pop(schedule_name)
        root._modules.pop(sync_name, None)
        return model
    return result


def bounds(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The ``(r_max, d_max)`` the next training step of each renorm layer will use.

    Keys are the layers' qualified names in ``model`` (renormified parts may be nested).
    """
    out: dict[str, tuple[float, float]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, RenormGraphModule):
            for site in module.renorm_sites.values():
                step = int(module.get_buffer(site.step))
                schedule: RenormSchedule = module.get_submodule(site.schedule)  # type: ignore[assignment]
                out[f"{prefix}.{site.name}" if prefix else site.name] = schedule.at(step)
    return out


@dataclasses.dataclass(frozen=True)
class LayerDiagnostics:
    """A renorm layer's last good training step (all zeros before the first)."""

    step: int  # training steps counted so far (num_batches_tracked)
    bounds: tuple[float, float]  # the (r_max, d_max) that step used
    r_range: tuple[float, float]  # min and max of r over the channels
    d_range: tuple[float, float]  # min and max of d over the channels
    clipped_fraction: float  # fraction of channels whose r or d the clip changed
    nonfinite_batches: int  # training batches skipped for NaN / Inf


def diagnostics(model: nn.Module) -> dict[str, LayerDiagnostics]:
    """Per renorm layer (by qualified name): its last step's r, d and clipping.

    Always recorded, in the graph (a few per-channel values a step, no host sync);
    reading them here syncs once per layer.
    """
    out: dict[str, LayerDiagnostics] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, RenormGraphModule):
            module.report_nonfinite()
            for site in module.renorm_sites.values():
                r, d, clipped = module.get_buffer(site.diagnostics).detach().cpu().double()
                step = int(module.get_buffer(site.step))
                schedule: RenormSchedule = module.get_submodule(site.schedule)  # type: ignore[assignment]
                out[f"{prefix}.{site.name}" if prefix else site.name] = LayerDiagnostics(
                    step=step,
                    bounds=schedule.at(max(step - 1, 0)),
                    r_range=(r.min().item(), r.max().item()),
                    d_range=(d.min().item(), d.max().item()),
                    clipped_fraction=clipped.mean().item(),
                    nonfinite_batches=int(module.get_buffer(site.nonfinite)),
                )
    return out
