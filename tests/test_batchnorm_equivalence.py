"""With r_max = 1, d_max = 0 renorm is batchnorm: outputs, gradients, parameters, buffers."""

import copy

import pytest
import torch
from torch.testing import assert_close

import models
from renorm_fx import RenormSchedule, renormify

CASES = {
    "bn1d_2d": (models.MLP, (8, 7)),
    "bn1d_3d": (models.Seq1d, (4, 3, 9)),
    "bn2d": (models.SmallCNN, (6, 3, 8, 8)),
    "bn3d": (models.Conv3dNet, (3, 2, 4, 4, 4)),
    "residual": (models.ResidualBlock, (4, 6, 7, 7)),
    "preact": (models.PreActBlock, (4, 6, 7, 7)),
    "shared": (models.SharedBN, (8, 5)),
    "functional": (models.FunctionalBN, (6, 4, 5)),
}


def _train(model, shape, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs = []
    for _ in range(steps):
        x = torch.randn(shape, generator=g)
        opt.zero_grad()
        y = model(x)
        (y.sin() * y).sum().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return outs


@pytest.mark.parametrize("running_stats", ["variance", "sigma"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_constant_1_0_is_batchnorm(case, running_stats):
    make, shape = CASES[case]
    bn = make()
    rn = renormify(bn, RenormSchedule.constant(1, 0), running_stats=running_stats)
    ref = _train(bn, shape)
    got = _train(rn, shape)
    for (y_ref, g_ref), (y, g) in zip(ref, got):
        assert_close(y, y_ref, rtol=0, atol=0)  # bit for bit: the same batch_norm kernels
        assert g.keys() == g_ref.keys()
        for name in g:
            assert_close(g[name], g_ref[name], rtol=0, atol=0, msg=name)
    sd_ref, sd = bn.state_dict(), rn.state_dict()
    # functional batch-norms have no num_batches_tracked: renorm adds a step buffer for them
    steps = {k for k in sd if k.endswith("_renorm_step")}
    assert bool(steps) == (case == "functional")
    assert sd.keys() - steps == sd_ref.keys()
    for k in sd_ref:
        if k.endswith("running_var") and running_stats == "sigma":
            continue  # the paper averages sigma, not the variance: checked in test_reference.py
        assert_close(sd[k], sd_ref[k], rtol=1e-6, atol=1e-7, msg=k)
    # eval mode is batchnorm's eval with the same buffers
    bn.load_state_dict({k: sd[k] for k in sd_ref})
    bn.eval(), rn.eval()
    x = torch.randn(shape)
    assert_close(rn(x), bn(x), rtol=0, atol=0)
