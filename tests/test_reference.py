"""Renorm against an independent float64 reference of the paper's equations, clipping active."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from reference import paper_renorm
from renorm_fx import RenormSchedule, renormify
from renorm_fx.functional import batch_renorm_train


def _layer(c, dims, dtype=torch.float64):
    bn = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dims](c, momentum=0.3).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c) * 0.5 + 1)
        bn.bias.copy_(torch.randn(c))
        # running statistics far from the batch's on half the channels: r and d clip there
        bn.running_mean.copy_(torch.where(torch.arange(c) % 2 == 0, torch.randn(c) * 4, torch.zeros(c)))
        bn.running_var.copy_(torch.where(torch.arange(c) % 2 == 0, torch.rand(c) * 20 + 0.01, torch.ones(c)))
    return bn


@pytest.mark.parametrize("shape", [(6, 8, 5), (4, 8, 3, 5), (3, 8, 2, 3, 2)])
def test_matches_paper_equations(shape):
    r_max, d_max, alpha, eps = 1.7, 0.6, 0.3, 1e-5
    bn = _layer(shape[1], len(shape))
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    model = renormify(nn.Sequential(bn), RenormSchedule.constant(r_max, d_max))
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
        g_y = torch.randn(shape, dtype=torch.float64)
        rm, rv = model.get_buffer("0.running_mean").clone(), model.get_buffer("0.running_var").clone()
        gamma, beta = model.get_parameter("0.weight"), model.get_parameter("0.bias")
        y_ref, (mu_ref, var_ref), (r, d), (gx_ref, gg_ref, gb_ref) = paper_renorm(
            x.detach(), gamma.detach(), beta.detach(), rm, rv, r_max, d_max, alpha, eps, g_y)
        if step == 0:  # the test is only meaningful if some channels clip and some do not
            clipped = (r == r_max) | (r == 1 / r_max) | (d.abs() == d_max)
            assert clipped.any() and not clipped.all()
        y = model(x)
        gx, gg, gb = torch.autograd.grad(y, (x, gamma, beta), g_y)
        assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        assert_close(gx, gx_ref, rtol=1e-9, atol=1e-10)
        assert_close(gg, gg_ref, rtol=1e-9, atol=1e-10)
        assert_close(gb, gb_ref, rtol=1e-9, atol=1e-10)
        assert_close(model.get_buffer("0.running_mean"), mu_ref, rtol=1e-12, atol=1e-12)
        assert_close(model.get_buffer("0.running_var"), var_ref, rtol=1e-12, atol=1e-12)
    assert int(model.get_buffer("0.num_batches_tracked")) == 3
    assert not torch.equal(model.get_buffer("0.running_mean"), start_mean)
    assert not torch.equal(model.get_buffer("0.running_var"), start_var)


@pytest.mark.parametrize("bounds", [(1.0, 0.0), (1.5, 0.4)])
def test_gradcheck(bounds):
    """Gradients of the renorm step against finite differences.

    Finite differences see r and d move with x unless they sit on their clip bounds, so the
    running statistics are put far from the batch's: every channel clips, r and d are locally
    constant, and the analytic gradient (r, d as constants) must match. (1, 0) is batchnorm.
    """
    bn = _layer(5, 4)
    rm, rv = torch.full((5,), 10.0, dtype=torch.float64), torch.tensor([0.01, 50.0, 0.02, 80.0, 0.01], dtype=torch.float64)
    r_max, d_max = bounds

    def step(x, w, b):
        # fresh copies: each call must see the same running statistics
        return batch_renorm_train(x, w, b, rm.clone(), rv.clone(), None,
                                  torch.tensor(r_max), torch.tensor(d_max), 0.1, 1e-5)

    x = (torch.randn(4, 5, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(step, (x, w, b))
    assert torch.autograd.gradgradcheck(step, (x, w, b))


def test_r_and_d_are_constants():
    """Changing the running statistics changes the output but never the gradient path through them."""
    bn = _layer(4, 4)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    y = batch_renorm_train(x.requires_grad_(), bn.weight, bn.bias, bn.running_mean.clone(),
                           bn.running_var.clone(), None, torch.tensor(2.0), torch.tensor(1.0), 0.1, 1e-5)
    names = set()
    fn = [y.grad_fn]
    while fn:
        f = fn.pop()
        if f is None:
            continue
        names.add(type(f).__name__)
        fn.extend(n for n, _ in f.next_functions)
    assert not any("Clamp" in n for n in names)  # r and d (clamps) are detached
    assert not any("VarMean" in n for n in names)  # the moments for r, d carry no gradient
