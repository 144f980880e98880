"""With r_max = 1, d_max = 0 renorm is batchnorm: outputs, gradients, parameters, buffers."""


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


def _train(model, shape, dtype, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    outs = []
    for _ in range(steps):
        x = torch.randn(shape, generator=g, dtype=dtype)
        opt.zero_grad()
        y = model(x)
        target = torch.randn(y.shape, generator=g, dtype=dtype)
        ((y - target) ** 2).mean().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("running_stats", ["variance", "sigma"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_constant_1_0_is_batchnorm(case, running_stats, dtype):
    """Equal to rounding: 3e-5 of each tensor's scale in float32, 1e-10 in float64."""
    make, shape = CASES[case]
    bn = make().to(dtype)
    rn = renormify(bn, RenormSchedule.constant(1, 0), running_stats=running_stats)
    tol = 3e-5 if dtype == torch.float32 else 1e-10
    ref = _train(bn, shape, dtype)
    got = _train(rn, shape, dtype)
    for (y_ref, g_ref), (y, g) in zip(ref, got):
        models.assert_scaled_close(y, y_ref, tol, "output")
        assert g.keys() == g_ref.keys()
        # a bias feeding a batch-norm has gradient 0 up to cancellation: judge every gradient
        # against the scale of the step's gradients
        scale = max(g_ref[name].abs().max().item() for name in g_ref)
        for name in g:
            models.assert_scaled_close(g[name], g_ref[name], tol * max(1.0, scale), name)
    sd_ref, sd = bn.state_dict(), rn.state_dict()
    # functional batch-norms have no num_batches_tracked: renorm adds a step buffer for them
    steps = {k for k in sd if k.endswith("renorm_step")}
    assert bool(steps) == (case == "functional")
    assert sd.keys() - steps == sd_ref.keys()
    for k in sd_ref:
        if k.endswith("running_var") and running_stats == "sigma":
            continue  # the paper averages sigma, not the variance: checked in test_reference.py
        if sd[k].is_floating_point():
            models.assert_scaled_close(sd[k], sd_ref[k], tol, k)
        else:
            assert torch.equal(sd[k], sd_ref[k]), k
    # eval mode is batchnorm's eval with the same buffers
    bn.load_state_dict({k: sd[k] for k in sd_ref})
    bn.eval(), rn.eval()
    x = torch.randn(shape, dtype=dtype)
    assert_close(rn(x), bn(x), rtol=0, atol=0)  # eval runs batchnorm itself
