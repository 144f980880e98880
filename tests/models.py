"""Small models covering the architectures renorm must handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


#: renorm at (r_max, d_max) = (1, 0) vs batchnorm in float32: the same formula, moments taken
#: by a different reduction, so results agree to float32 rounding (not bit for bit).
BN_TOL = dict(rtol=1e-5, atol=1e-5)


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, msg: str = "") -> None:
    """``max|actual - expected| <= tol * max(1, max|expected|)``: rounding relative to the tensor's scale
    (sums such as weight gradients cancel, so elementwise relative error is meaningless there)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{msg}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


class SmallCNN(nn.Module):
    """conv -> BN2d -> relu -> pool -> linear -> BN1d (the classifier-head case)."""

    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)
        self.bn_head = nn.BatchNorm1d(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.bn_head(self.fc(x.mean((2, 3))))


class FunctionalBN(nn.Module):
    """Batch norm written with F.batch_norm and the module's own buffers."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels) + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, 0.1, 1e-5)


class ResidualBlock(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)  # depthwise
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class PreActBlock(nn.Module):
    """Pre-activation: BN comes before the conv."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(y)))


class SharedBN(nn.Module):
    """One BN module applied twice per forward."""

    def __init__(self, c: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(self.bn(x)))


class MLP(nn.Module):
    def __init__(self, d: int = 7) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.up = nn.ConvTranspose3d(4, 4, 2, stride=2)
        self.bn2 = nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.up(F.relu(self.bn(self.conv(x)))))


class Seq1d(nn.Module):
    """BatchNorm1d on (N, C, L) input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def scramble_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set running statistics far from any batch's, so r and d clip on some channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                rm.copy_(torch.randn(rm.shape, generator=g) * 2)
                rv.copy_(torch.rand(rv.shape, generator=g) * 8 + 0.05)
    return model
