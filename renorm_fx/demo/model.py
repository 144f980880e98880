"""The demo's network, its batchnorm and renorm versions, the clip schedule and the optimizer."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import RenormSchedule, renormify

__all__ = ["DigitsCNN", "GhostBatchNorm1d", "GhostBatchNorm2d", "ghost_batches", "make_schedule", "schedule_steps",
           "RAMPS", "build_model", "initial_state", "make_optimizer", "METHODS"]

METHODS = ("batchnorm", "renorm")
#: How the clip bounds open after batchnorm's warm-up (the first 10 % of the run):
#: "paper" ramps d_max to 5 by 40 % and r_max to 3 by 60 %; "switch" is the RL libraries' hard switch.
RAMPS = ("paper", "switch")
# The schedule, as fractions of the run (the paper: 5k / 25k / 40k steps of a ~150k-step run).
WARMUP, D_MAX_AT, R_MAX_AT = 0.1, 0.4, 0.6


class DigitsCNN(nn.Module):
    """8x8 digits -> 10 classes: conv-BN-ReLU, conv-BN-ReLU-pool, pool, Linear-BatchNorm1d-ReLU, Linear.

    The BatchNorm1d in the head normalizes 64 features over the examples of the batch
    alone (no spatial positions), which is where small and non-i.i.d. batches hurt most.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 2 * 2, 64, bias=False)
        self.bn_fc = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(x, 2).flatten(1)
        x = F.relu(self.bn_fc(self.fc1(x)))
        return self.fc2(x)


# ---- batchnorm over virtual batches (the baseline of the one-forward micro-batch regimes) ---------
class _GhostBatches:
    """A batch-norm that, in training, normalizes each group of ``virtual_batch_size`` consecutive
    examples on its own: the plain batch-norm forward applied group by group, in order.

    Each group's output, gradient and running-statistics update are exactly those of a separate
    forward of that group, so one forward of 32 examples in groups of 4 trains exactly as 8
    forwards of 4 with gradient accumulation (tested), only faster. Eval mode is untouched.
    """

    virtual_batch_size: int

    def forward(self, x: Tensor) -> Tensor:
        size = self.virtual_batch_size
        if not self.training or x.shape[0] <= size:
            return super().forward(x)  # type: ignore[misc]
        if x.shape[0] % size:
            raise ValueError(f"a batch of {x.shape[0]} does not split into virtual batches of {size}")
        outs = []
        for group in x.split(size):
            outs.append(super().forward(group))  # type: ignore[misc]
        return torch.cat(outs)


class GhostBatchNorm1d(_GhostBatches, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over virtual batches (see :class:`_GhostBatches`)."""


class GhostBatchNorm2d(_GhostBatches, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over virtual batches (see :class:`_GhostBatches`)."""


_GHOST = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}


def ghost_batches(model: nn.Module, size: int) -> nn.Module:
    """Make every ``BatchNorm1d`` / ``BatchNorm2d`` of ``model`` normalize virtual batches of ``size``,
    in place (same parameters, buffers and ``state_dict``)."""
    for module in model.modules():
        if type(module) in _GHOST:
            module.__class__ = _GHOST[type(module)]
            module.virtual_batch_size = size
    return model


# ---- the clip schedule -----------------------------------------------------------------------------
def schedule_steps(steps: int) -> tuple[int, int, int]:
    """``(warmup, d_max_at, r_max_at)`` in optimizer steps for a run of ``steps``: 10 %, 40 %, 60 %."""
    warmup = max(1, round(WARMUP * steps))
    d_at = max(warmup + 1, round(D_MAX_AT * steps))
    return warmup, d_at, max(d_at + 1, round(R_MAX_AT * steps))


def make_schedule(steps: int, ramp: str = "paper") -> RenormSchedule:
    """The clip schedule of a run of ``steps`` optimizer steps (the demo counts optimizer steps in every
    regime: ``renorm_fx.count_updates``).

    Batchnorm (r_max = 1, d_max = 0) for the first 10 % of the run, then ``"paper"``: the paper's linear
    ramps, d_max reaching 5 at 40 % and r_max reaching 3 at 60 %; ``"switch"``: (3, 5) at once
    (``RenormSchedule.switch``, the RL libraries' schedule).
    """
    warmup, d_at, r_at = schedule_steps(steps)
    if ramp == "paper":
        return RenormSchedule.paper(warmup=warmup, r_max_at=r_at, d_max_at=d_at)
    if ramp == "switch":
        return RenormSchedule.switch(warmup)
    raise ValueError(f"unknown ramp {ramp!r}; expected one of {RAMPS}")


# ---- the two methods -------------------------------------------------------------------------------
def initial_state(seed: int) -> dict[str, Tensor]:
    """The initial weights of seed ``seed``: the same for both methods."""
    torch.manual_seed(seed)
    return DigitsCNN().state_dict()


def build_model(method: str, schedule: Optional[RenormSchedule], momentum: float,
                virtual_batch_size: Optional[int] = None) -> nn.Module:
    """``DigitsCNN`` with batchnorm, or renormified with ``schedule``; ``momentum`` is the moving-average
    rate; ``virtual_batch_size`` normalizes groups of that many examples of each forward."""
    model = DigitsCNN()
    if method == "batchnorm":
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.momentum = momentum
        return ghost_batches(model, virtual_batch_size) if virtual_batch_size else model
    if method == "renorm":
        return renormify(model, schedule, momentum=momentum, virtual_batch_size=virtual_batch_size)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 and weight decay 5e-4 (the same for both methods)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
