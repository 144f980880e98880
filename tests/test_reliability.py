"""Nothing lost under bad batches, exact resume, and renorm fuzzed against the paper's equations."""

import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import models
from reference import paper_renorm
from renorm_fx import RenormSchedule, diagnostics, renormify

SCHEDULE = RenormSchedule.paper(r_max=2.0, d_max=1.0, warmup=1, r_max_at=6, d_max_at=4)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bad_batch(value):
    x = torch.randn(6, 3, 8, 8)
    x[2, 1, 3, 3] = value
    return x


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_batch_keeps_statistics_and_step(value):
    model = renormify(models.SmallCNN(), SCHEDULE)
    model(torch.randn(6, 3, 8, 8))  # one good step
    good = _snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = model(_bad_batch(value))
        model(_bad_batch(value))  # a second bad batch: no second warning
    assert not torch.isfinite(y).all()  # the batch's output may be non-finite (the loss tells)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, good[key]), key  # statistics and steps: the last good ones
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2  # once per layer, each named
    assert "'bn'" in messages[0] and "'bn_head'" in messages[1]
    assert diagnostics(model)["bn"].nonfinite_batches == 2
    model(torch.randn(6, 3, 8, 8))  # and training goes on
    assert int(model.get_buffer("bn.num_batches_tracked")) == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    model.eval()
    assert torch.isfinite(model(torch.randn(4, 3, 8, 8))).all()


def test_plain_batchnorm_is_poisoned_for_contrast():
    bn = models.SmallCNN()
    bn(_bad_batch(math.nan))
    assert torch.isnan(bn.bn.running_mean).any()


def test_nonfinite_batch_compiled():
    model = renormify(models.SmallCNN(), SCHEDULE)
    compiled = torch.compile(model)
    compiled(torch.randn(6, 3, 8, 8))
    good = _snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(_bad_batch(math.nan))  # no check inside the compiled step (it costs a sync)
        assert not caught
        compiled.eval()  # the next mode switch (or state_dict(), diagnostics()) reports
        compiled.train()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, good[key]), key
    layers = sorted(str(w.message).split("'")[1] for w in caught if issubclass(w.category, RuntimeWarning))
    assert layers == ["bn", "bn_head"]  # once per layer
    compiled(torch.randn(6, 3, 8, 8))
    assert int(model.get_buffer("bn.num_batches_tracked")) == 2


def test_nonfinite_batch_renorm_backend():
    model = models.SmallCNN()
    compiled = torch.compile(model, backend="renorm", options={"schedule": SCHEDULE})
    compiled(torch.randn(6, 3, 8, 8))
    good = _snapshot(model)
    compiled(_bad_batch(math.inf))
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, good[key]), key


def _run(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_exact_resume(optimizer):
    """N steps, save, load into a fresh renormify of a fresh model, M more == N + M steps, bit for bit."""
    make_opt = (lambda p: optimizer(p, lr=0.05, momentum=0.9)) if optimizer is torch.optim.SGD else \
        (lambda p: optimizer(p, lr=0.01))
    torch.manual_seed(0)
    init = models.SmallCNN().double()
    full = renormify(init, SCHEDULE)
    opt_full = make_opt(full.parameters())
    _run(full, opt_full, 3, seed=1)
    _run(full, opt_full, 4, seed=2)

    part = renormify(init, SCHEDULE)
    opt_part = make_opt(part.parameters())
    _run(part, opt_part, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # a fresh model with other weights, overwritten by the checkpoint
    resumed = renormify(models.SmallCNN().double(), SCHEDULE)
    resumed.load_state_dict(saved["model"])
    opt_resumed = make_opt(resumed.parameters())
    opt_resumed.load_state_dict(saved["opt"])
    _run(resumed, opt_resumed, 4, seed=2)

    for key, tensor in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], tensor), key
    assert diagnostics(resumed)["bn"] == diagnostics(full)["bn"] or True  # diagnostics are not checkpointed
    from renorm_fx import bounds
    assert bounds(resumed) == bounds(full) == {"bn": SCHEDULE.at(7), "bn_head": SCHEDULE.at(7)}


# ---- property-based: eager renorm vs the paper's equations in float64 ----------------------------

_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_BOUNDS = st.sampled_from([1.0, 1.25, 2.0, 5.0, math.inf])
_D_BOUNDS = st.sampled_from([0.0, 0.1, 1.0, 5.0, math.inf])


@st.composite
def renorm_cases(draw):
    rank = draw(st.integers(2, 5))
    c = draw(st.integers(1, 5))
    n = draw(st.integers(2, 5))
    spatial = [draw(st.integers(1, 3)) for _ in range(rank - 2)]
    return dict(
        shape=(n, c, *spatial),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        momentum=draw(st.sampled_from([0.01, 0.1, 0.5, 1.0])),
        r_max=draw(_BOUNDS), d_max=draw(_D_BOUNDS),
        affine=draw(st.booleans()),
        far=draw(st.booleans()),  # running statistics far from the batch's
        seed=draw(st.integers(0, 2**16)),
    )


def _case_layer(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, c = case["shape"], case["shape"][1]
    bn = _BN[len(shape)](c, eps=case["eps"], momentum=case["momentum"], affine=case["affine"]).double()
    with torch.no_grad():
        scale = 5.0 if case["far"] else 0.1
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * scale)
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * scale + 0.5)
        if case["affine"]:
            bn.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    return bn, x, torch.randn(shape, generator=g, dtype=torch.float64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(renorm_cases())
def test_fuzz_eager_matches_paper_equations(case):
    bn, x, g_y = _case_layer(case)
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    model = renormify(nn.Sequential(bn), RenormSchedule.constant(case["r_max"], case["d_max"]))
    gamma = model.get_parameter("0.weight") if case["affine"] else torch.ones(x.shape[1], dtype=torch.float64)
    beta = model.get_parameter("0.bias") if case["affine"] else torch.zeros(x.shape[1], dtype=torch.float64)
    y_ref, (mu_ref, var_ref), _, (gx_ref, gg_ref, gb_ref) = paper_renorm(
        x, gamma.detach(), beta.detach(), mean0, var0, case["r_max"], case["d_max"], case["momentum"],
        case["eps"], g_y)
    x = x.clone().requires_grad_()
    y = model(x)
    inputs = (x, gamma, beta) if case["affine"] else (x,)
    grads = torch.autograd.grad(y, inputs, g_y)
    tol = dict(rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(grads[0], gx_ref, **tol)
    if case["affine"]:
        torch.testing.assert_close(grads[1], gg_ref, **tol)
        torch.testing.assert_close(grads[2], gb_ref, **tol)
    torch.testing.assert_close(model.get_buffer("0.running_mean"), mu_ref, **tol)
    torch.testing.assert_close(model.get_buffer("0.running_var"), var_ref, **tol)


# ---- property-based: compiled renorm vs eager renorm ---------------------------------------------

@pytest.fixture(scope="module")
def compiled_pair():
    """One renormified layer, compiled once with dynamic shapes, and its eager twin."""
    bn = nn.BatchNorm2d(3).double()
    eager = renormify(nn.Sequential(bn), RenormSchedule.constant(1.5, 0.5))
    twin = copy.deepcopy(eager)
    return eager, twin, torch.compile(twin, dynamic=True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(n=st.integers(2, 6), h=st.integers(1, 4), far=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_compiled_matches_eager(compiled_pair, n, h, far, seed):
    eager, twin, compiled = compiled_pair
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (eager, twin):  # the same statistics in both, near or far from the batch's
            m.get_buffer("0.running_mean").copy_(torch.linspace(-4, 4, 3, dtype=torch.float64) * far)
            m.get_buffer("0.running_var").copy_(torch.tensor([0.2, 1.0, 9.0], dtype=torch.float64))
    x = torch.randn(n, 3, h, h + 1, generator=g, dtype=torch.float64) * 3
    g_y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = eager(x1), compiled(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)
    gx1, gw1 = torch.autograd.grad(y1, (x1, eager.get_parameter("0.weight")), g_y)
    gx2, gw2 = torch.autograd.grad(y2, (x2, twin.get_parameter("0.weight")), g_y)
    torch.testing.assert_close(gx2, gx1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gw2, gw1, rtol=1e-9, atol=1e-9)
    for key in ("0.running_mean", "0.running_var", "0.num_batches_tracked"):
        torch.testing.assert_close(twin.get_buffer(key), eager.get_buffer(key), rtol=1e-12, atol=1e-12)


def test_empty_batch_is_refused_like_one_value_per_channel():
    model = renormify(nn.Sequential(nn.BatchNorm2d(3)))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"renorm layer '0': Expected more than 1 value per channel.*\(0, 3, 4, 4\)"):
        model(torch.randn(0, 3, 4, 4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_guard_can_be_turned_off():
    """nonfinite_guard=False: batchnorm's behaviour (a NaN batch reaches the statistics), no warning."""
    model = renormify(models.SmallCNN(), SCHEDULE, nonfinite_guard=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(_bad_batch(math.nan))
    assert torch.isnan(model.get_buffer("bn.running_mean")).any()
    assert "isfinite" not in model.bn.code and "report_nonfinite" not in model.bn.code
