"""Folding arithmetic: batch-norms into layer weights, parallel conv branches into one conv.

Plain tensor math, no graphs (the pass that uses it is :mod:`renorm_fx.passes.fold_pass`),
as torch keeps ``fuse_conv_bn_weights`` in ``torch/nn/utils/fusion.py``. Everything is
computed in float64 and rounded once, to the layer's dtype, at the end.

* :func:`batch_norm_affine`: a batch-norm's inference map ``x * scale + shift``.
* :func:`fold_weights`: a conv / transposed conv / linear followed by such a map.
* :func:`merge_conv_weights`: convs reading the same input (and the input itself, scaled
  per channel), summed: one conv (RepVGG / MobileOne re-parameterization).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["batch_norm_affine", "fold_weights", "pad_kernel", "identity_kernel", "merge_conv_weights"]


def batch_norm_affine(
    running_mean: torch.Tensor, running_var: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` in float64: the batch-norm's inference map ``x * scale + shift``.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``
    (``weight`` / ``bias`` None: 1 / 0).
    """
    scale = torch.rsqrt(running_var.detach().double() + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -running_mean.detach().double() * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def fold_weights(
    weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor,
    kind: str, groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's ``(weight, bias)`` followed by ``x * scale + shift`` on its output channels.

    ``kind`` is ``"conv"`` (weight ``(out, in/groups, *k)``), ``"linear"`` (``(out, in)``) or
    ``"conv_transpose"`` (weight ``(in, out/groups, *k)``: output channel
    ``g * (out/groups) + j`` is ``weight[g*(in/groups):(g+1)*(in/groups), j]``). Computed in
    float64; returned in the weight's dtype and memory format (the bias's dtype, or the
    weight's when there was no bias).
    """
    w = weight.detach().double().contiguous()
    scale, shift = scale.double(), shift.double()
    if kind == "conv_transpose":
        in_c, per_group, *kernel = w.shape
        if in_c % groups or per_group * groups != scale.numel():
            raise ValueError(f"fold: transposed weight {tuple(w.shape)} with groups={groups} does not "
                             f"have {scale.numel()} output channels")
        ones = [1] * len(kernel)
        w = (w.view(groups, in_c // groups, per_group, *kernel)
             * scale.view(groups, 1, per_group, *ones)).view(weight.shape)
    elif kind in ("conv", "linear"):
        if w.shape[0] != scale.numel():
            raise ValueError(f"fold: weight {tuple(w.shape)} does not have {scale.numel()} output channels")
        w = w * scale.view(-1, *[1] * (w.dim() - 1))
    else:
        raise ValueError(f"fold: unknown layer kind {kind!r}")
    b = shift if bias is None else bias.detach().double() * scale + shift
    return _like(w, weight), b.to(device=weight.device, dtype=weight.dtype if bias is None else bias.dtype)


def pad_kernel(weight: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    """A conv weight ``(out, in/groups, *k)`` zero-padded, centered, to ``kernel_size``.

    Each ``kernel_size[i] - k[i]`` must be even and non-negative (a 1x1 kernel sits at the
    center of a 3x3 one).
    """
    kernel = weight.shape[2:]
    if len(kernel) != len(kernel_size):
        raise ValueError(f"pad_kernel: weight {tuple(weight.shape)} has {len(kernel)} kernel dims, "
                         f"kernel_size {tuple(kernel_size)} has {len(kernel_size)}")
    pad: list[int] = []
    for k, size in zip(reversed(kernel), reversed(tuple(kernel_size))):
        extra = size - k
        if extra < 0 or extra % 2:
            raise ValueError(f"pad_kernel: cannot center a {tuple(kernel)} kernel in {tuple(kernel_size)}")
        pad += [extra // 2, extra // 2]
    return F.pad(weight, pad) if any(pad) else weight


def identity_kernel(
    scale: torch.Tensor, in_per_group: int, kernel_size: Sequence[int], center: Sequence[int],
) -> torch.Tensor:
    """The conv weight ``(C, in_per_group, *kernel_size)`` computing ``x * scale`` per channel.

    For a conv with ``C`` input and output channels in ``C / in_per_group`` groups: output
    channel ``c`` reads input channel ``c``, which is channel ``c % in_per_group`` of its
    group, at kernel position ``center``. In ``scale``'s dtype.
    """
    channels = scale.numel()
    if in_per_group <= 0 or channels % in_per_group:
        raise ValueError(f"identity_kernel: {channels} channels do not split into groups of {in_per_group}")
    if len(center) != len(kernel_size) or not all(0 <= c < k for c, k in zip(center, kernel_size)):
        raise ValueError(f"identity_kernel: center {tuple(center)} is outside the kernel {tuple(kernel_size)}")
    w = scale.new_zeros((channels, in_per_group, *kernel_size))
    c = torch.arange(channels, device=scale.device)
    w[(c, c % in_per_group, *(torch.full_like(c, i) for i in center))] = scale.reshape(-1)
    return w


def merge_conv_weights(
    branches: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]],
    kernel_size: Sequence[int],
    *,
    identity: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    center: Optional[Sequence[int]] = None,
    like: Optional[torch.Tensor] = None,
    bias_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(weight, bias)`` of one conv equal to the sum of ``branches`` (and an identity).

    ``branches`` are the ``(weight, bias)`` of convs on the same input with the same stride,
    dilation, groups and output channels, whose paddings align once each kernel is padded,
    centered, to ``kernel_size`` (:func:`pad_kernel`). ``identity = (scale, shift)`` adds the
    branch ``x * scale + shift`` (the input itself through a per-channel affine map: an
    inference batch-norm), written into the kernel at ``center`` (:func:`identity_kernel`;
    needs as many input as output channels). Computed in float64; the weight is returned
    in ``like``'s dtype, device and memory format (default: the first branch's weight), the
    bias in ``bias_dtype`` (default: the weight's dtype).
    """
    if not branches:
        raise ValueError("merge_conv_weights: no conv branch")
    template = branches[0][0] if like is None else like
    out_c, in_per_group = branches[0][0].shape[:2]
    weight = torch.zeros((out_c, in_per_group, *kernel_size), dtype=torch.float64, device=template.device)
    bias = torch.zeros(out_c, dtype=torch.float64, device=template.device)
    for w, b in branches:
        if tuple(w.shape[:2]) != (out_c, in_per_group):
            raise ValueError(f"merge_conv_weights: weights {tuple(branches[0][0].shape)} and {tuple(w.shape)} "
                             f"do not have the same channels")
        weight += pad_kernel(w.detach().double(), kernel_size)
        if b is not None:
            bias += b.detach().double()
    if identity is not None:
        scale, shift = identity
        if center is None:
            raise ValueError("merge_conv_weights: an identity branch needs the kernel's center")
        if scale.numel() != out_c:
            raise ValueError(f"merge_conv_weights: identity of {scale.numel()} channels, convs of {out_c}")
        weight += identity_kernel(scale.detach().double().to(weight.device), in_per_group, kernel_size, center)
        bias += shift.detach().double().to(bias.device)
    dtype = template.dtype if bias_dtype is None else bias_dtype
    return _like(weight, template), bias.to(dtype)


def _like(value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """``value`` in ``template``'s dtype, device and memory format (its strides, when the shapes match)."""
    if value.shape != template.shape:
        return value.to(device=template.device, dtype=template.dtype)
    out = torch.empty_like(template, requires_grad=False)
    out.copy_(value)
    return out
