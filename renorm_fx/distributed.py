"""Cross-replica statistics: the process group a synchronized renorm layer reduces over.

``renormify(model, sync=True)`` takes each layer's batch moments over the global batch
of every process in a group (see :func:`renorm_fx.functional.batch_moments`). The
graph refers to the group through a module attribute (``self.renorm_sync``, or a
converted ``nn.SyncBatchNorm`` layer's own ``process_group``), resolved when the
model runs: ``None`` is the default group, and without an initialized process group,
or with one process, nothing is synchronized and nothing is communicated.

The collectives are torch's functional collectives, which run eagerly and trace
under torch.compile.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist
from torch import Tensor, nn

if dist.is_available():
    from torch.distributed import _functional_collectives as funcol

__all__ = ["RenormSync", "active_group", "all_gather", "all_reduce_sum"]


class RenormSync(nn.Module):
    """The process group synchronized renorm layers take their statistics over.

    ``process_group=None`` is the default group, resolved at run time, so a model can be
    renormified before ``init_process_group``. No state: nothing in ``state_dict``.
    """

    def __init__(self, process_group: Optional[Any] = None) -> None:
        super().__init__()
        self.process_group = process_group

    def extra_repr(self) -> str:
        group = self.process_group
        return "process_group=default" if group is None else f"process_group={group.group_name!r}"

    def __deepcopy__(self, memo: dict) -> "RenormSync":
        copy = RenormSync(self.process_group)  # a process group is shared by its run, never copied
        copy.train(self.training)
        return copy

    def __getstate__(self) -> dict:
        if self.process_group is not None:
            raise TypeError(
                "renorm_fx: a model synchronized over a specific process group cannot be pickled (process "
                "groups belong to one run); renormify with process_group=None (the default group), or save "
                "its state_dict."
            )
        return self.__dict__.copy()


def active_group(sync: Optional[nn.Module]) -> Optional[Any]:
    """The process group to synchronize over, or None: no ``sync`` module, no initialized
    process group, or one process in it (then nothing is communicated).

    ``sync`` is any module with a ``process_group`` attribute (None: the default group).
    """
    if sync is None or not dist.is_available() or not dist.is_initialized():
        return None
    group = sync.process_group if sync.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _wait(t: Tensor) -> Tensor:
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """``t`` summed over the processes of ``group`` (a new tensor)."""
    return _wait(funcol.all_reduce(t, "sum", group))


def all_gather(t: Tensor, group: Any) -> Tensor:
    """Every process's 1-D ``t`` as the rows of a ``(world_size, len(t))`` tensor, in rank order."""
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # older torch
    return _wait(gather(t, 0, group)).view(-1, t.shape[0])
