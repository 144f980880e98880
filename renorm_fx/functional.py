"""The batch renorm math: the one definition every path uses.

``batch_renorm_train`` is written in plain torch ops. The FX pass records it into
the model's graph by calling it on ``torch.fx.Proxy`` arguments, so eager
execution, torch.compile (Dynamo traces the recorded code) and the Inductor
lowering all run exactly these ops.

Training step, per channel (S. Ioffe, 2017; see PAPER.md)::

    mu_B, sigma_B = batch mean, sqrt(biased batch variance + eps)
    r = clip(sigma_B / sigma, 1/r_max, r_max)        # constants: stop_gradient (ops.py)
    d = clip((mu_B - mu) / sigma, -d_max, d_max)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
      = batch_norm(x, weight=gamma * r, bias=beta + gamma * d)
    mu    <- mu    + alpha * (mu_B    - mu)
    sigma <- sigma + alpha * (sigma_B - sigma)        # stored as running_var = sigma^2 - eps

Because r and d are constants, renorm *is* batchnorm with a per-step affine
(gamma * r, beta + gamma * d): the normalization and its gradient are batchnorm's
own kernels (given the batch moments), and with r = 1, d = 0 every output and
gradient equals batchnorm's to float32 rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.fx import Proxy

from . import ops
from .config import RUNNING_STATS
from .distributed import active_group, all_gather, all_reduce_sum
from .schedule import is_eager_cpu

__all__ = ["batch_moments", "batch_renorm_train", "renorm_factors", "update_running_stats_", "RUNNING_STATS"]

_F = TypeVar("_F", bound=Callable[..., Any])


def graph_leaf(fn: _F) -> _F:
    """Record ``fn`` as one ``call_function`` node when called on FX proxies."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        proxy = next((a for a in args if isinstance(a, Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", wrapper, args, {})
        return fn(*args)

    return wrapper  # type: ignore[return-value]


stop_gradient = graph_leaf(ops.stop_gradient)


def _named(value: Any, name: str) -> Any:
    """Give a traced value a readable node name (a no-op on tensors)."""
    if isinstance(value, Proxy):
        value.node._rename(name)
    return value


def _check_input(x: Tensor, running_mean: Tensor, layer: str, ranks: Sequence[int], synced: bool) -> None:
    """Check the input the way batchnorm does, naming ``layer`` in the error."""
    if ranks and x.dim() not in ranks:
        want = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(f"renorm layer {layer!r}: expected {want} input (got {x.dim()}D input)")
    if not x.is_floating_point():
        raise TypeError(f"renorm layer {layer!r}: expected a floating-point input, got {x.dtype}")
    if x.dim() < 2 or x.shape[1] != running_mean.numel():
        raise ValueError(
            f"renorm layer {layer!r}: input of shape {tuple(x.shape)} has "
            f"{x.shape[1] if x.dim() > 1 else 'no'} channels (dim 1), but the layer's running "
            f"statistics have {running_mean.numel()}; pass (N, C, ...) input with C = {running_mean.numel()}."
        )
    if not synced and x.numel() // x.shape[1] <= 1:  # synchronized: the global batch counts
        raise ValueError(
            f"renorm layer {layer!r}: Expected more than 1 value per channel when training, "
            f"got input size {tuple(x.shape)}"
        )


def _local_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel biased ``(mean, var)`` of a detached ``x``, in float32 (or float64)."""
    acc = x.dtype if x.dtype == torch.float64 else torch.float32  # as batchnorm: float32 for half
    dims = [0, *range(2, x.dim())]
    if torch.compiler.is_compiling():
        # Inductor fuses a one-pass Welford var_mean with the normalization.
        var, mean = torch.var_mean(x.to(acc), dims, correction=0)
    elif x.dim() == 2 and x.dtype == acc and x.shape[0] > 0:
        # (N, C): batchnorm's own statistics kernel, one call (over (N, H, W) it is slower than two passes)
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    else:
        # Eager: two passes of fast reductions (aten's var_mean over (N, H, W) is ~10x slower).
        mean = x.mean(dims, dtype=acc)
        var = (x - mean.view(-1, *([1] * (x.dim() - 2)))).square_().mean(dims)
    return mean, var


def _combine_moments(stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The global ``(mean, var, count)`` from each process's ``(count, mean, M2)`` (the rows of
    ``stats``), combined exactly (Chan et al.): M2 = sum(M2_k) + sum(n_k (mean_k - mean)^2)."""
    c = (stats.shape[1] - 1) // 2
    counts, means, m2s = stats[:, :1], stats[:, 1 : c + 1], stats[:, c + 1 :]
    seen = counts > 0  # a process with an empty batch contributes nothing
    means, m2s = torch.where(seen, means, 0.0), torch.where(seen, m2s, 0.0)
    count = counts.sum()
    mean = (counts * means).sum(0) / count
    var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / count
    return mean, var, count


@graph_leaf
def batch_moments(
    x: Tensor, running_mean: Tensor, layer: str, ranks: Sequence[int], sync: Optional[nn.Module] = None,
) -> tuple[Tensor, ...]:
    """Per-channel biased ``(mean, var)`` of ``x`` in float32 (or float64), without gradient.

    Also checks the input the way batchnorm does, naming ``layer`` in the error. Given
    ``sync`` (a module whose ``process_group`` names the group, see :mod:`renorm_fx.distributed`):
    the moments of the global batch of every process in the group, from each one's count,
    mean and M2 (one all-gather), and their count ``m`` as a third value (a 0-d tensor).
    """
    group = active_group(sync)
    _check_input(x, running_mean, layer, ranks, synced=group is not None)
    x = x.detach()
    mean, var = _local_moments(x)
    if sync is None:
        return mean, var
    count = x.numel() // x.shape[1]
    if group is None:  # one process: its own batch is the global batch
        return mean, var, mean.new_full((), count)
    return _combine_moments(all_gather(torch.cat([mean.new_full((1,), count), mean, var * count]), group))


@graph_leaf
def batch_norm_with_stats(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], r: Tensor, d: Tensor,
    eps: float,
) -> Tensor:
    """Renorm's normalization given the batch moments and the constants ``r``, ``d``:
    ``(x - mean) / sqrt(var + eps) * (weight * r) + (bias + weight * d)``, batchnorm with a
    corrected affine.

    The gradient is batchnorm's own (through the batch moments too, with ``r`` and ``d``
    constant): one ``native_batch_norm_backward``. Unlike ``F.batch_norm`` it does not
    recompute the moments: one elementwise pass forward.
    """
    return _BatchNormWithStats.apply(x, mean, var, weight, bias, r, d, eps)


class _BatchNormWithStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                r: Tensor, d: Tensor, eps: float) -> Tensor:
        scale, shift = _affine(weight, bias, r, d)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, r, d)
        ctx.eps = eps
        # eval-mode batch_norm with the batch's moments as its statistics: elementwise only
        return torch.native_batch_norm(x, scale, shift, mean, var, False, 0.0, eps)[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, mean, invstd, r, d = ctx.saved_tensors
        scale = r if weight is None else weight * r  # recomputed: differentiable for double backward
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        gx, g_scale, g_shift = torch.ops.aten.native_batch_norm_backward(
            grad, x, scale, None, None, mean, invstd, True, ctx.eps, [need_x, need_w, need_w or need_b])
        gw = g_scale * r + g_shift * d if need_w else None  # d(scale)/dw = r, d(shift)/dw = d
        return gx, None, None, gw, g_shift if need_b else None, None, None, None


def _affine(weight: Optional[Tensor], bias: Optional[Tensor], r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Renorm's corrected affine: ``(weight * r, bias + weight * d)``."""
    scale = r if weight is None else weight * r
    shift = d if weight is None else weight * d
    return scale, shift if bias is None else shift + bias


@graph_leaf
def sync_batch_norm_with_stats(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], r: Tensor, d: Tensor,
    eps: float, sync: nn.Module, count: Tensor,
) -> Tensor:
    """:func:`batch_norm_with_stats` over the global batch of ``sync``'s process group, given its
    moments and ``count`` from :func:`batch_moments`: the backward all-reduces per-channel ``sum(g)``
    and ``sum(g * (x - mean))`` (one all-reduce of 2C values), as ``nn.SyncBatchNorm``'s does;
    ``weight`` and ``bias`` get this process's share, which DDP reduces with the other processes'
    gradients. Without an active group (one process), exactly :func:`batch_norm_with_stats`.
    """
    group = active_group(sync)
    if group is None:
        return _BatchNormWithStats.apply(x, mean, var, weight, bias, r, d, eps)
    return _SyncBatchNormWithStats.apply(x, mean, var, weight, bias, r, d, eps, count, group)


class _SyncBatchNormWithStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                r: Tensor, d: Tensor, eps: float, count: Tensor, group: Any) -> Tensor:
        scale, shift = _affine(weight, bias, r, d)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, scale, mean, invstd, count, r, d)
        ctx.group = group
        return torch.native_batch_norm(x, scale, shift, mean, var, False, 0.0, eps)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        # g_x = (g - sum(g) / m - (x - mean) * invstd^2 * sum(g (x - mean)) / m) * invstd * scale,
        # the sums and m over the global batch
        x, scale, mean, invstd, count, r, d = ctx.saved_tensors
        channel = (1, -1, *([1] * (x.dim() - 2)))
        dims = [0, *range(2, x.dim())]
        xmu = x - mean.view(channel)
        sum_g, sum_gxmu = grad.sum(dims, dtype=mean.dtype), (grad * xmu).sum(dims, dtype=mean.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # the same on every process, so all of them reduce
            total_g, total_gxmu = all_reduce_sum(torch.cat([sum_g, sum_gxmu]), ctx.group).chunk(2)
            gx = grad - (total_g / count).view(channel) - xmu * (invstd.square() * total_gxmu / count).view(channel)
            gx = (gx * (invstd * scale).view(channel)).to(x.dtype)
        if ctx.needs_input_grad[3]:
            gw = sum_gxmu * invstd * r + sum_g * d
        if ctx.needs_input_grad[4]:
            gb = sum_g
        return gx, None, None, gw, gb, None, None, None, None, None


def renorm_factors(
    batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor,
    r_max: Tensor, d_max: Tensor, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(r, d, sigma_B, sigma, clipped)``: the clipped correction, the two deviations, and
    which channels the clip changed."""
    sigma_b = _named(torch.sqrt(batch_var + eps), "sigma_b")
    sigma = _named(torch.sqrt(running_var + eps), "sigma")
    r_raw = sigma_b / sigma
    d_raw = (batch_mean - running_mean) / sigma
    r = _named(stop_gradient(torch.clamp(r_raw, 1 / r_max, r_max)), "r")
    d = _named(stop_gradient(torch.clamp(d_raw, -d_max, d_max)), "d")
    clipped = _named((r != r_raw) | (d != d_raw), "clipped")
    return r, d, sigma_b, sigma, clipped


@graph_leaf
def update_running_stats_(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
    batch_mean: Tensor, batch_var: Tensor, sigma_b: Tensor, sigma: Tensor,
    momentum: float, eps: float, running_stats: str, count: Optional[int | Tensor] = None,
    guard: bool = True,
) -> Union[Tensor, bool, None]:
    """Move the running statistics toward the batch's, in place (after the forward), and count the step.

    With ``guard``, a batch whose moments are not finite (NaN / Inf in the input) changes
    nothing: the statistics and the step keep their last good values; returns that flag
    (a 0-d bool tensor; eagerly on the CPU, a Python bool, checked on the host). Without, None.
    """
    if running_stats == "variance":  # batchnorm's own: the unbiased variance, averaged
        target_var = batch_var * (count / (count - 1)) if count is not None else batch_var
    if is_eager_cpu(batch_var):  # eager: branch on the host, update in place
        finite = not guard or math.isfinite(float(batch_var.sum()))  # NaN / Inf anywhere make the variance NaN
        if finite:
            _lerp_(running_mean, batch_mean, momentum)
            if running_stats == "sigma":
                dtype = torch.promote_types(sigma.dtype, sigma_b.dtype)
                new_sigma = torch.lerp(sigma.to(dtype), sigma_b.to(dtype), momentum)
                running_var.copy_(new_sigma.square_().sub_(eps).clamp_min_(0.0))
            else:
                _lerp_(running_var, target_var, momentum)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
        return finite if guard else None
    keep = 1.0 - momentum
    new_mean = running_mean * keep + batch_mean * momentum
    if running_stats == "sigma":
        new_sigma = sigma * keep + sigma_b * momentum
        new_var = torch.clamp_min(new_sigma * new_sigma - eps, 0.0)
    else:
        new_var = running_var * keep + target_var * momentum
    if not guard:
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return None
    finite = torch.isfinite(batch_var.sum())  # NaN / Inf anywhere in the input make the variance NaN
    running_mean.copy_(torch.where(finite, new_mean, running_mean))
    running_var.copy_(torch.where(finite, new_var, running_var))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite)
    return finite


def _lerp_(buffer: Tensor, target: Tensor, weight: float) -> None:
    """``buffer += weight * (target - buffer)``, in the wider of the two dtypes."""
    if buffer.dtype == target.dtype:
        buffer.lerp_(target, weight)
    else:
        buffer.copy_(torch.lerp(buffer.to(target.dtype), target, weight))


@graph_leaf
def record_diagnostics_(diagnostics: Tensor, nonfinite: Tensor, r: Tensor, d: Tensor, clipped: Tensor,
                        finite: Union[Tensor, bool, None]) -> None:
    """Keep the last good step's ``r``, ``d`` and clip flags (rows of ``diagnostics``, shape (3, C))
    and count the skipped non-finite batches in ``nonfinite`` (``finite=None``: no guard)."""
    if finite is None or finite is True:
        torch.stack([r, d, clipped.to(r.dtype)], out=diagnostics) if r.dtype == diagnostics.dtype else \
            diagnostics.copy_(torch.stack([r, d, clipped.to(r.dtype)]))
        return
    if finite is False:
        nonfinite.add_(1)
        return
    step = torch.stack([r, d, clipped.to(r.dtype)])
    diagnostics.copy_(torch.where(finite, step, diagnostics))
    nonfinite.add_(~finite)


@graph_leaf
def values_per_channel(x: Tensor) -> int:
    """``m``: how many values each channel's statistics are taken over."""
    return x.numel() // x.shape[1]


def batch_renorm_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    r_max: Tensor,
    d_max: Tensor,
    momentum: float,
    eps: float,
    layer: str = "batch_renorm",
    ranks: Sequence[int] = (),
    running_stats: str = "sigma",
    diagnostics: Optional[Tensor] = None,
    nonfinite: Optional[Tensor] = None,
    sync: Optional[nn.Module] = None,
    nonfinite_guard: bool = True,
    virtual_batch_size: Optional[int] = None,
) -> Tensor:
    """One training step of batch renorm; updates the running statistics in place.

    ``r_max`` and ``d_max`` are 0-d tensors (from a :class:`RenormSchedule`). Given
    ``diagnostics`` (3, C) and ``nonfinite`` (0-d int) buffers, records the step's ``r``,
    ``d`` and clipped channels, and counts skipped non-finite batches (which
    ``RenormGraphModule.report_nonfinite`` reports). Given ``sync`` (a module
    whose ``process_group`` names a group, see :mod:`renorm_fx.distributed`), the batch is the
    global batch of the group's processes: its moments, the gradient and the update.
    ``nonfinite_guard``: see :func:`update_running_stats_`. ``virtual_batch_size``: see
    :func:`virtual_batch_renorm_train`.
    """
    if virtual_batch_size is not None:
        return virtual_batch_renorm_train(
            x, weight, bias, running_mean, running_var, num_batches_tracked, r_max, d_max, momentum, eps,
            layer, ranks, running_stats, diagnostics, nonfinite, nonfinite_guard, virtual_batch_size)
    if sync is None:
        moments = batch_moments(x, running_mean, layer, tuple(ranks))
    else:  # the global batch's moments, and its count
        moments = batch_moments(x, running_mean, layer, tuple(ranks), sync)
    batch_mean, batch_var = _named(moments[0], "batch_mean"), _named(moments[1], "batch_var")
    batch_count = None if sync is None else _named(moments[2], "batch_count")
    r, d, sigma_b, sigma, clipped = renorm_factors(
        batch_mean, batch_var, running_mean, running_var, r_max, d_max, eps)
    # Reduced-precision inputs get float32 scale / shift, which batch_norm accepts (as for autocast).
    if sync is None:
        y = batch_norm_with_stats(x, batch_mean, batch_var, weight, bias, r, d, eps)
    else:  # the global batch's gradient
        y = sync_batch_norm_with_stats(x, batch_mean, batch_var, weight, bias, r, d, eps, sync, batch_count)
    count = None
    if running_stats == "variance":  # the unbiased variance needs m
        count = values_per_channel(x) if sync is None else batch_count
    finite = update_running_stats_(
        running_mean, running_var, num_batches_tracked, batch_mean, batch_var, sigma_b, sigma,
        momentum, eps, running_stats, count, nonfinite_guard,
    )
    if diagnostics is not None and nonfinite is not None:
        record_diagnostics_(diagnostics, nonfinite, r, d, clipped, finite)
    return y


@graph_leaf
def group_batch(x: Tensor, running_mean: Tensor, layer: str, ranks: Sequence[int], size: int) -> Tensor:
    """``x`` (N, C, ...) viewed as (N / size, size, C, L): consecutive groups of ``size`` examples, the
    other dims flattened into L, in float32 (or float64). Checks the input as :func:`batch_moments` does, and that ``size`` divides N."""
    _check_input(x, running_mean, layer, ranks, synced=False)
    if x.shape[0] % size:
        raise ValueError(
            f"renorm layer {layer!r}: a batch of {x.shape[0]} examples does not split into virtual batches of "
            f"{size}; use a batch size that is a multiple of {size}, or another virtual_batch_size."
        )
    if size * (x.numel() // (x.shape[0] * x.shape[1])) <= 1:
        raise ValueError(
            f"renorm layer {layer!r}: a virtual batch of {size} has 1 value per channel (input size "
            f"{tuple(x.shape)}); batch statistics need more than one."
        )
    acc = x.dtype if x.dtype == torch.float64 else torch.float32
    return x.to(acc).reshape(x.shape[0] // size, size, x.shape[1], -1)


def virtual_batch_renorm_train(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
    num_batches_tracked: Optional[Tensor], r_max: Tensor, d_max: Tensor, momentum: float, eps: float,
    layer: str, ranks: Sequence[int], running_stats: str, diagnostics: Optional[Tensor],
    nonfinite: Optional[Tensor], nonfinite_guard: bool, size: int,
) -> Tensor:
    """Batch renorm over virtual (ghost) batches: the paper's equations applied to each group of
    ``size`` consecutive examples, each with its own moments and its own ``r`` and ``d`` against the
    shared moving statistics. The moving statistics move once, toward the groups' average: the mean of
    the group means, and the mean of the group sigmas (``running_stats="sigma"``) or of the groups'
    unbiased variances (``"variance"``). Diagnostics keep, per channel, the groups' mean ``r`` and
    ``d`` and the fraction of groups clipped.
    """
    xg = _named(group_batch(x, running_mean, layer, tuple(ranks), size), "groups")
    dims = [1, 3]
    mean_g = xg.mean(dims, keepdim=True)  # (G, 1, C, 1): with gradient, as batchnorm's
    centered = xg - mean_g
    var_g = centered.square().mean(dims, keepdim=True)
    channel = (1, 1, -1, 1)
    r, d, sigma_g, sigma, clipped = renorm_factors(
        mean_g.detach(), var_g.detach(), running_mean.view(channel), running_var.view(channel), r_max, d_max, eps)
    scale = torch.rsqrt(var_g + eps) * r
    shift = d
    if weight is not None:
        scale, shift = scale * weight.view(channel), shift * weight.view(channel)
    if bias is not None:
        shift = shift + bias.view(channel)
    y = (centered * scale + shift).reshape(x.shape).to(x.dtype)
    groups = [0, 1, 3]  # reduce (G, 1, C, 1) to (C,)
    batch_mean = _named(mean_g.detach().mean(groups).flatten(), "batch_mean")
    batch_var = _named(var_g.detach().mean(groups).flatten(), "batch_var")
    sigma_b = _named(sigma_g.mean(groups).flatten(), "sigma_b")
    count = values_per_group(xg) if running_stats == "variance" else None
    finite = update_running_stats_(
        running_mean, running_var, num_batches_tracked, batch_mean, batch_var, sigma_b, sigma.flatten(),
        momentum, eps, running_stats, count, nonfinite_guard,
    )
    if diagnostics is not None and nonfinite is not None:
        record_diagnostics_(diagnostics, nonfinite, r.mean(groups).flatten(), d.mean(groups).flatten(),
                            clipped.to(r.dtype).mean(groups).flatten(), finite)
    return y


@graph_leaf
def values_per_group(xg: Tensor) -> int:
    """``m`` of one virtual batch: the values each channel's group statistics are taken over."""
    return xg.shape[1] * xg.shape[3]
