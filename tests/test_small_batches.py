"""Small batches as people train them: virtual (ghost) batches, steps counted per optimizer
update, and the RL libraries' hard-switch schedule."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.testing import assert_close

import models
from reference import paper_renorm
from renorm_fx import RenormSchedule, bounds, count_updates, diagnostics, renormify

CLIP = RenormSchedule.constant(1.5, 0.5)
ID = RenormSchedule.constant(1, 0)


# ---- virtual batches ---------------------------------------------------------------------------


def _groups_reference(x, bn, size, r_max, d_max, g_y):
    """PAPER.md's equations on each group of ``size`` consecutive examples, in float64, and the
    moving statistics moved once toward the groups' average mean and sigma."""
    mu, var = bn.running_mean.clone(), bn.running_var.clone()
    ys, gxs, g_gamma, g_beta, sigmas, means, rs = [], [], 0, 0, [], [], []
    for xg, gg in zip(x.split(size), g_y.split(size)):
        y, _, (r, d), (gx, ggam, gbet) = paper_renorm(xg, bn.weight, bn.bias, mu, var, r_max, d_max,
                                                     bn.momentum, bn.eps, gg)
        ys.append(y), gxs.append(gx), rs.append(r)
        g_gamma, g_beta = g_gamma + ggam, g_beta + gbet
        dims = [0, *range(2, xg.dim())]
        means.append(xg.double().mean(dims))
        sigmas.append(torch.sqrt(xg.double().var(dims, unbiased=False) + bn.eps))
    alpha, sigma = bn.momentum, torch.sqrt(var + bn.eps)
    new_mu = mu + alpha * (torch.stack(means).mean(0) - mu)
    new_sigma = sigma + alpha * (torch.stack(sigmas).mean(0) - sigma)
    return torch.cat(ys), torch.cat(gxs), g_gamma, g_beta, new_mu, new_sigma**2 - bn.eps, torch.stack(rs)


@pytest.mark.parametrize("shape,size", [((8, 5), 4), ((12, 3, 2), 3), ((8, 4, 3, 3), 2)])
def test_virtual_batches_match_the_papers_equations_per_group(shape, size):
    torch.manual_seed(0)
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](shape[1]).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.6, 1.6)
    x = torch.randn(shape, dtype=torch.float64)
    x[:size] = x[:size] * 3 + 2  # the first group far from the moving statistics: clipped there, not elsewhere
    g_y = torch.randn(shape, dtype=torch.float64)
    want_y, want_gx, want_gg, want_gb, want_mu, want_var, r = _groups_reference(x, bn, size, 1.5, 0.5, g_y)
    assert (r[0] == 1.5).any() and not (r[1:] == 1.5).all()  # clipping active in some groups, not others
    rn = renormify(bn, CLIP, virtual_batch_size=size)
    xr = x.clone().requires_grad_()
    y = rn(xr)
    gx, gg, gb = torch.autograd.grad(y, [xr, rn.weight, rn.bias], g_y)
    tol = dict(rtol=1e-10, atol=1e-10)
    assert_close(y, want_y, **tol)
    assert_close(gx, want_gx, **tol)
    assert_close(gg, want_gg, **tol)
    assert_close(gb, want_gb, **tol)
    assert_close(rn.running_mean, want_mu, **tol)
    assert_close(rn.running_var, want_var, **tol)
    assert diagnostics(rn)[""].clipped_fraction > 0


def test_virtual_batch_of_the_whole_batch_is_no_virtual_batch():
    m = models.scramble_stats(models.SmallCNN()).double()
    plain, virtual = renormify(m, CLIP), renormify(m, CLIP, virtual_batch_size=6)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    for model in (plain, virtual):
        model(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), virtual.parameters()):
        assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, b), c in zip(plain.state_dict().items(), virtual.state_dict().values()):
        assert_close(c, b, rtol=1e-10, atol=1e-10, msg=name)


def test_constant_1_0_is_batchnorm_on_each_group():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    rn = renormify(bn, ID, virtual_batch_size=2)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g_y = torch.randn_like(x)
    y = rn(x)
    got = torch.autograd.grad(y, [x, rn.weight, rn.bias], g_y)
    want_y = torch.cat([F.batch_norm(xg, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for xg in x.split(2)])
    want = torch.autograd.grad(want_y, [x, bn.weight, bn.bias], g_y)
    assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_virtual_batches_refuse_bad_sizes():
    rn = renormify(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"renorm layer '1': a batch of 6 examples does not split into virtual batches of 4"):
        rn(torch.randn(6, 3))
    rn(torch.randn(8, 3))  # a multiple works
    one = renormify(nn.Sequential(nn.BatchNorm1d(4)), virtual_batch_size=1)
    with pytest.raises(ValueError, match="a virtual batch of 1 has 1 value per channel"):
        one(torch.randn(4, 4))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
            renormify(nn.BatchNorm1d(3), virtual_batch_size=bad)
    with pytest.raises(ValueError, match="virtual_batch_size and sync=True do not combine"):
        renormify(nn.BatchNorm1d(3), virtual_batch_size=2, sync=True)


def test_virtual_batches_eval_and_fold_are_unchanged():
    from renorm_fx import fold

    m = renormify(models.SmallCNN(), CLIP, virtual_batch_size=2)
    m(torch.randn(8, 3, 8, 8))
    ref = models.SmallCNN()
    ref.load_state_dict(m.state_dict(), strict=True)
    m.eval(), ref.eval()
    x = torch.randn(3, 3, 8, 8)  # any batch size in eval
    assert_close(m(x), ref(x), rtol=0, atol=0)
    assert_close(fold(m)(x), m(x), rtol=1e-5, atol=1e-6)


def _virtual_steps(model, params_of, steps=2):
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(params_of.parameters(), lr=0.05)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        y = model(torch.randn(8, 3, 8, 8, generator=g))
        (y - 1).square().mean().backward()
        out.append((y.detach(), {n: p.grad.clone() for n, p in params_of.named_parameters()}))
        opt.step()
    return out, {k: v.clone() for k, v in params_of.state_dict().items()}


def test_virtual_batches_compiled_equal_eager_on_both_paths():
    torch.manual_seed(0)
    base = models.scramble_stats(models.SmallCNN())
    eager = renormify(base, CLIP, virtual_batch_size=4)
    want = _virtual_steps(eager, eager)
    compiled_src = renormify(base, CLIP, virtual_batch_size=4)
    backend_src = models.scramble_stats(models.SmallCNN())
    backend_src.load_state_dict(base.state_dict())
    options = {"schedule": CLIP, "virtual_batch_size": 4}
    for model, params_of in ((torch.compile(compiled_src), compiled_src),
                             (torch.compile(backend_src, backend="renorm", options=options), backend_src)):
        got = _virtual_steps(model, params_of)
        for (y, grads), (y_ref, grads_ref) in zip(got[0], want[0]):
            models.assert_scaled_close(y, y_ref, 1e-4, "output")
            for name, grad in grads.items():
                models.assert_scaled_close(grad, grads_ref[name], 1e-4, name)
        for key, value in got[1].items():
            if value.is_floating_point():
                models.assert_scaled_close(value, want[1][key], 1e-4, key)


# ---- steps counted per optimizer update ----------------------------------------------------------

RAMP = RenormSchedule.paper(r_max=2.0, d_max=1.0, warmup=1, r_max_at=5, d_max_at=4)


def _critic():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16, momentum=0.01), nn.ReLU(),
                         nn.Linear(16, 16), nn.BatchNorm1d(16, momentum=0.01), nn.ReLU(), nn.Linear(16, 1))


def _updates(model, opt, updates, forwards=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        opt.zero_grad()
        loss = sum(model(torch.randn(8, 5, generator=g)).square().mean() for _ in range(forwards))
        loss.backward()
        opt.step()


def test_k_forwards_per_update_advance_the_schedule_once():
    model = renormify(_critic(), RAMP)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    handle = count_updates(model, opt)
    mean_before = model[1].running_mean.clone()
    _updates(model, opt, 2, forwards=3)
    assert int(model[1].num_batches_tracked) == int(model[4].num_batches_tracked) == 2
    assert bounds(model) == {"1": RAMP.at(2), "4": RAMP.at(2)}
    assert diagnostics(model)["1"].step == 2
    assert not torch.equal(model[1].running_mean, mean_before)  # the statistics moved every forward
    handle.remove()  # forwards count again
    _updates(model, opt, 1, forwards=3)
    assert int(model[1].num_batches_tracked) == 5


def test_update_counting_is_the_same_as_one_forward_per_update():
    """k forwards then one update, counted per update, use the bounds of one forward per update."""
    a, b = renormify(_critic(), RAMP), renormify(_critic(), RAMP)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (a, b))
    count_updates(a, opt_a)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 5, generator=g)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(t, u), name


def test_resume_mid_ramp_continues_the_count():
    model = renormify(_critic(), RAMP)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    count_updates(model, opt)
    _updates(model, opt, 3)
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    saved.seek(0)
    resumed = renormify(_critic(), RAMP)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    count_updates(resumed, opt2)
    assert bounds(resumed)["1"] == RAMP.at(3)
    _updates(resumed, opt2, 1)
    assert int(resumed[1].num_batches_tracked) == 4 and bounds(resumed)["1"] == RAMP.at(4)


def test_one_optimizer_per_layer():
    model = renormify(_critic(), RAMP)
    critic_opt = torch.optim.Adam(model.parameters())
    handle = count_updates(model, critic_opt)
    with pytest.raises(ValueError, match="already count the updates of an optimizer"):
        count_updates(model, torch.optim.SGD(model.parameters(), lr=0.1))
    actor = nn.Linear(3, 3)
    handle.remove()
    with pytest.raises(ValueError, match="none of the model's parameters are in this Adam"):
        count_updates(model, torch.optim.Adam(actor.parameters()))
    with pytest.raises(ValueError, match="no renorm layer"):
        count_updates(actor, torch.optim.Adam(actor.parameters()))


def test_update_counting_compiled_does_not_recompile():
    model = renormify(_critic(), RAMP)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    count_updates(model, opt)
    compiled = torch.compile(model)
    before = dict(counters["stats"])
    _updates(compiled, opt, 6, forwards=2)  # the bounds change at every update
    assert counters["stats"]["unique_graphs"] - before.get("unique_graphs", 0) == 1
    assert int(model[1].num_batches_tracked) == 6 and bounds(model)["1"] == RAMP.at(6)


# ---- the RL libraries' preset ----------------------------------------------------------------------


def test_switch_preset():
    s = RenormSchedule.switch(100_000)
    assert s.at(99_999) == (1.0, 0.0)
    assert s.at(100_000) == (3.0, 5.0)
    assert s.at(10**7) == (3.0, 5.0)
    steps = torch.tensor([99_999, 100_000, 100_001])
    r, d = zip(*(s.tensor_bounds(t) for t in steps))
    assert [float(v) for v in r] == [1.0, 3.0, 3.0] and [float(v) for v in d] == [0.0, 5.0, 5.0]
    assert str(s) == ("RenormSchedule(r_max(step) = Piecewise((1, step < 100000), (3, True)), "
                      "d_max(step) = Piecewise((0, step < 100000), (5, True)))")
    assert RenormSchedule.switch(10, r_max=2.0, d_max=1.0).at(10) == (2.0, 1.0)
    with pytest.raises(ValueError, match="warmup must be a non-negative int"):
        RenormSchedule.switch(-1)
