"""Inputs renorm must handle, or refuse with an error naming the layer and the fix."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import models
from renorm_fx import RenormLayer, bounds, RenormSchedule, RenormTraceError, renormify

ID = RenormSchedule.constant(1, 0)


def _buffers(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_track_running_stats_false_is_skipped_with_one_warning():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                      nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rn = renormify(m)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "'1'" in message and "'3'" in message and "'2'" not in message and "track_running_stats=False" in message
    assert set(bounds(rn)) == {"2"}
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning):
        assert_close(renormify(m, ID)(x), m(x), **models.BN_TOL)
    with pytest.raises(ValueError, match=r"(?s)'1'.*track_running_stats=True.*'3'"):
        renormify(m, strict=True)


def test_one_value_per_channel_gives_batchnorms_error_and_keeps_stats():
    rn = renormify(models.MLP())
    before = _buffers(rn)
    with pytest.raises(ValueError, match=r"'net.1'.*Expected more than 1 value per channel when training"):
        rn(torch.randn(1, 7))
    for k, v in rn.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing lost or advanced
    rn.eval()
    assert rn(torch.randn(1, 7)).shape == (1, 3)  # inference on one example is fine


def test_wrong_rank_and_channel_count():
    rn = renormify(nn.Sequential(nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match=r"renorm layer '0': expected 4D input \(got 3D input\)"):
        rn(torch.randn(2, 3, 8))
    rn1 = renormify(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"renorm layer '0': expected 2D or 3D input \(got 4D input\)"):
        rn1(torch.randn(2, 3, 8, 8))
    f = renormify(models.FunctionalBN(4))
    with pytest.raises(ValueError, match=r"has 5 channels.*statistics have 4.*C = 4"):
        f(torch.randn(3, 5, 2))


def test_integer_input():
    rn = renormify(models.FunctionalBN(4))
    with pytest.raises(TypeError, match="floating-point"):
        rn(torch.ones(3, 4, 2, dtype=torch.long))


def test_untraceable_layer_points_to_compile():
    class DataDependentBN(nn.BatchNorm1d):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return super().forward(x)
            return x

    m = nn.Sequential(nn.Linear(3, 3), DataDependentBN(3), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match=r"(?s)'1'.*DataDependentBN.*control flow.*backend='renorm'"):
        rn = renormify(m)
    assert set(bounds(rn)) == {"2"} and not isinstance(rn[1], RenormLayer)  # left as it was, named
    with pytest.raises(ValueError, match=r"(?s)'1'.*control flow"):
        renormify(m, strict=True)


def test_affine_false():
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False))
    rn = renormify(m, ID)
    x = torch.randn(5, 4)
    assert_close(rn(x), m(x), **models.BN_TOL)
    assert set(rn.state_dict()) == set(m.state_dict())


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 7)])
def test_batchnorm1d_shapes(shape):
    m = nn.BatchNorm1d(4)
    rn = renormify(nn.Sequential(m), ID)
    x = torch.randn(shape)
    assert_close(rn(x), m(x), **models.BN_TOL)


def test_channels_last():
    m = models.ResidualBlock().to(memory_format=torch.channels_last)
    rn = renormify(m, ID)
    x = torch.randn(4, 6, 7, 7).to(memory_format=torch.channels_last)
    y = rn(x)
    assert_close(y, m(x), **models.BN_TOL)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inputs(dtype):
    """Half inputs with float32 parameters (as under mixed precision): float32 statistics."""
    m = nn.BatchNorm2d(4)
    rn = renormify(nn.Sequential(m), ID)
    x = torch.randn(6, 4, 5, 5).to(dtype)
    y, y_ref = rn(x), m(x)
    assert y.dtype == dtype
    assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    assert rn.get_buffer("0.running_mean").dtype == torch.float32
    assert_close(rn.get_buffer("0.running_mean"), m.running_mean, rtol=1e-5, atol=1e-6)


def test_half_model():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).to(torch.bfloat16)
    rn = renormify(m, RenormSchedule.constant(2, 1))
    y = rn(torch.randn(4, 3, 5, 5, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert rn.get_buffer("1.running_var").dtype == torch.bfloat16
    assert torch.isfinite(rn.get_parameter("1.weight").grad).all()


def test_autocast():
    m = models.SmallCNN()
    rn = renormify(m, ID)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = rn(x), m(x)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, **models.BN_TOL)
    for k in ("bn.running_mean", "bn_head.running_mean"):
        assert_close(rn.state_dict()[k], m.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_torch_batch_norm_function():
    class TorchBN(models.FunctionalBN):
        def forward(self, x):
            return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                    self.training, 0.1, 1e-5, False)

    m = TorchBN()
    rn = renormify(m, ID)
    assert len(bounds(rn)) == 1
    x = torch.randn(4, 4, 3)
    assert_close(rn(x), m(x), **models.BN_TOL)


def test_functional_without_running_stats_is_skipped():
    class NoStats(nn.Module):
        def forward(self, x):
            return F.batch_norm(x, None, None, training=True)

    with pytest.warns(UserWarning, match="without running statistics"):
        renormify(NoStats())
