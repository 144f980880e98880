"""A hand-written batch renorm layer in the style of the reinforcement-learning libraries.

This is the comparison point for ``bench_layer.py``: batch renorm as CrossQ-style RL code
writes it, namely TorchRL's ``torchrl.modules.BatchRenorm1d``
(torchrl/modules/models/batchrenorm.py, itself adapted from google-research/corenet) and
sb3-contrib's ``sb3_contrib.common.torch_layers.BatchRenorm1d`` (a port of sbx's flax
``BatchRenorm`` in sbx/common/jax_layers.py). It is written here from scratch, not copied,
but it keeps what those layers have in common:

* batch moments from plain reductions, ``x.mean(0)`` and ``x.var(0, unbiased=False)``
  (dims ``(0, 2, 3, ...)`` for conv inputs), with autograd through them;
* ``r`` and ``d`` computed from the moments and the running statistics, made constants with
  ``.detach()`` and clipped with ``torch.clamp`` against Python-float bounds;
* the normalization as elementwise autograd ops (no fused batch-norm kernel);
* the running statistics updated in place under ``torch.no_grad()`` (batchnorm's unbiased
  variance, averaged), and a ``num_batches_tracked`` step counter;
* a warm-up switch: plain batchnorm (``r = 1``, ``d = 0``) for the first ``warmup_steps``
  steps. As in TorchRL it is a tensor factor computed from the step counter (no host sync,
  no graph break under ``torch.compile``); sb3-contrib branches in Python on the tensor
  instead (``if self.steps > self.warmup_steps``), which syncs every step.

What it does not have, unlike ``renormify``: a non-finite guard, diagnostics, a clip
schedule, input checks, and protection against the compiled partitioner recomputing ``r``
and ``d`` from already-updated buffers in the backward (see ``renorm_fx/ops.py``). That last
one is not hypothetical: under ``torch.compile`` this layer's gradients differ from its eager
gradients whenever the running statistics move (measured on torch 2.13 CPU, (8, 16) input
with the clip active: input-gradient error ~3.5 % of its max at momentum 0.1, ~0.35 % at
0.01; none at momentum 0). The benchmark times it anyway, as the code people run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RLStyleBatchRenorm"]


class RLStyleBatchRenorm(nn.Module):
    """Batch renorm over dim 1 of an ``(N, C)`` or ``(N, C, *spatial)`` input, RL-library style."""

    def __init__(self, num_features: int, momentum: float = 0.01, eps: float = 1e-5,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0) -> None:
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast a per-channel vector over x
        if not self.training:
            scale = self.weight / torch.sqrt(self.running_var + self.eps)
            return x * scale.view(shape) + (self.bias - self.running_mean * scale).view(shape)

        dims = 0 if x.dim() == 2 else (0, *range(2, x.dim()))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        std = torch.sqrt(var + self.eps)
        running_std = torch.sqrt(self.running_var + self.eps)

        r = torch.clamp(std.detach() / running_std, 1.0 / self.r_max, self.r_max)
        d = torch.clamp((mean.detach() - self.running_mean) / running_std, -self.d_max, self.d_max)
        if self.warmup_steps > 0:  # 0 while warming up (plain batchnorm), 1 after
            on = (self.num_batches_tracked >= self.warmup_steps).to(r.dtype)
            r = 1.0 + (r - 1.0) * on
            d = d * on

        x_hat = (x - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
        y = x_hat * self.weight.view(shape) + self.bias.view(shape)

        with torch.no_grad():
            m = x.numel() // x.shape[1]
            self.running_mean += self.momentum * (mean.detach() - self.running_mean)
            self.running_var += self.momentum * (var.detach() * (m / (m - 1)) - self.running_var)
            self.num_batches_tracked += 1
        return y
