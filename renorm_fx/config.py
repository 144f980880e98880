"""``RenormConfig``: the one options object of a conversion, accepted by every entry point.

    renormify(model, RenormConfig(schedule=RenormSchedule.switch(100_000), momentum=0.01))
    torch.compile(model, backend="renorm", options=RenormConfig(virtual_batch_size=4))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from .schedule import RenormSchedule

__all__ = ["RenormConfig", "RUNNING_STATS"]

#: How running statistics are averaged. "sigma" is the paper's (average sigma, store
#: running_var = sigma^2 - eps); "variance" is batchnorm's (average the unbiased variance).
RUNNING_STATS = ("sigma", "variance")


@dataclasses.dataclass(frozen=True)
class RenormConfig:
    """How batch-norms become batch renorm.

    Attributes:
        schedule: the clip bounds ``(r_max, d_max)`` as a function of the step; default
            :meth:`RenormSchedule.paper`.
        momentum: the moving-average rate ``alpha`` for every layer (it becomes the layer's
            ``momentum``); ``None``: each layer's own ``momentum``.
        running_stats: ``"sigma"`` (the paper: average sigma, stored as
            ``running_var = sigma**2 - eps``) or ``"variance"`` (batchnorm's: average the
            unbiased batch variance, so ``constant(1, 0)`` matches batchnorm's buffers too).
        sync: batch statistics across processes (``torch.distributed``). ``False``: each
            process normalizes over its own batch (the paper's setting); ``True``: every
            layer's moments and gradient are those of the global batch of ``process_group``;
            ``None``: ``nn.SyncBatchNorm`` layers synchronize over their own group, the others
            do not. Without an initialized process group, or with one process, nothing is
            communicated.
        process_group: the group ``sync=True`` synchronizes over; ``None``: the default group,
            resolved when the model runs.
        nonfinite_guard: a training batch with NaN / Inf leaves the running statistics and the
            step unchanged, with a warning once per layer. ``False`` lets it in, as batchnorm does.
        strict: raise, instead of warning, where a batch-norm cannot be converted
            (no running statistics, a forward the pass cannot trace or does not understand).
        virtual_batch_size: normalize each group of this many consecutive examples (dim 0)
            with its own batch moments and its own ``r`` and ``d`` (ghost batches); the moving
            statistics move once per forward toward the groups' average. ``None``: the whole batch.
    """

    schedule: Optional[RenormSchedule] = None
    momentum: Optional[float] = None
    running_stats: str = "sigma"
    sync: Optional[bool] = None
    process_group: Optional[Any] = None
    nonfinite_guard: bool = True
    strict: bool = False
    virtual_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.schedule is None:
            object.__setattr__(self, "schedule", RenormSchedule.paper())
        if not isinstance(self.schedule, RenormSchedule):
            raise TypeError(f"schedule must be a RenormSchedule, got {type(self.schedule).__name__}")
        if self.momentum is not None and not (isinstance(self.momentum, (int, float)) and 0.0 < self.momentum <= 1.0):
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum!r}")
        if self.running_stats not in RUNNING_STATS:
            raise ValueError(f"running_stats must be one of {RUNNING_STATS}, got {self.running_stats!r}")
        if self.process_group is not None and self.sync is not True:
            raise ValueError("process_group is the group sync=True synchronizes over; pass sync=True too.")
        vbs = self.virtual_batch_size
        if vbs is not None and (isinstance(vbs, bool) or not isinstance(vbs, int) or vbs < 1):
            raise ValueError(f"virtual_batch_size must be a positive int or None, got {vbs!r}")
        if vbs is not None and self.sync:
            raise ValueError("virtual_batch_size and sync=True do not combine: a virtual batch is one process's.")

    def __deepcopy__(self, memo: dict) -> "RenormConfig":
        return self  # immutable; its process group belongs to the run, its schedule has no state

    @classmethod
    def build(cls, caller: str, config: Any = None, **fields: Any) -> "RenormConfig":
        """A config from ``config`` (a RenormConfig, a mapping of its fields or None) with ``fields``
        (those not None) replacing its values; errors name ``caller``."""
        given = {k: v for k, v in fields.items() if v is not None}
        try:
            if config is None:
                return cls(**given)
            if isinstance(config, RenormConfig):
                return dataclasses.replace(config, **given) if given else config
            if isinstance(config, Mapping):
                return cls(**{**dict(config), **given})
        except TypeError as exc:
            hint = ""
            if "unexpected keyword" in str(exc):
                hint = f" (RenormConfig's fields: {', '.join(cls.field_names())})"
            raise TypeError(f"{caller}: {exc}{hint}") from None
        except ValueError as exc:
            raise ValueError(f"{caller}: {exc}") from None
        raise TypeError(f"{caller}: config must be a RenormConfig, got {type(config).__name__}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
