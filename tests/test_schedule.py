"""The clip schedule: paper values, constants, printing, tensor evaluation, validation."""

import math

import pytest
import sympy
import torch

from renorm_fx import RenormSchedule
from renorm_fx.schedule import step


def test_paper_values():
    s = RenormSchedule.paper()
    assert s.at(0) == (1.0, 0.0)
    assert s.at(5000) == (1.0, 0.0)
    r, d = s.at(25000)
    assert r == pytest.approx(2.142857142857143, abs=1e-12) and d == 5.0
    assert s.at(40000) == (3.0, 5.0)
    assert s.at(10**6) == (3.0, 5.0)
    assert s.at(12500) == pytest.approx((1 + 2 * 7500 / 35000, 5 * 7500 / 20000))


@pytest.mark.parametrize("sched", [RenormSchedule.paper(), RenormSchedule.paper(2, 1, 10, 30, 20),
                                   RenormSchedule.constant(1.5, 0.25),
                                   RenormSchedule(sympy.Piecewise((1, step < 7), (2 - sympy.exp(-step / 100), True)),
                                                  sympy.sqrt(step) / 10)])
def test_tensor_evaluation_matches_sympy(sched):
    for at in [0, 1, 6, 7, 10, 20, 25, 5000, 12345, 25000, 40000, 99999]:
        r, d = sched.tensor_bounds(torch.tensor(at))  # what graphs compute
        assert r.dtype == torch.float64 and r.dim() == 0
        assert (r.item(), d.item()) == pytest.approx(sched.at(at), rel=1e-12, abs=1e-12)
        assert sched(torch.tensor(at)) == pytest.approx(sched.at(at), rel=1e-12, abs=1e-12)  # eager CPU: floats


def test_constant_inf_means_no_clip():
    s = RenormSchedule.constant(math.inf, math.inf)
    assert s.at(3) == (math.inf, math.inf)
    r, d = s.tensor_bounds(torch.tensor(3))
    assert math.isinf(r.item()) and math.isinf(d.item())
    assert s(torch.tensor(3)) == (math.inf, math.inf)
    assert (1 / r).item() == 0.0


def test_str_is_readable():
    text = str(RenormSchedule.paper())
    assert text == "RenormSchedule(r_max(step) = Min(3, Max(1, step/17500 + 5/7)), d_max(step) = Min(5, Max(0, step/4000 - 5/4)))"
    assert "oo" in str(RenormSchedule.constant(math.inf, 0))


def test_user_symbol_named_step_is_accepted():
    s = RenormSchedule(1 + sympy.Symbol("step") / 10, 0)
    assert s.at(20) == (3.0, 0.0)


@pytest.mark.parametrize("r_max, d_max, match", [
    (sympy.Symbol("t") + 1, 0, "only depend on 'step'"),
    (0.5, 0, "r_max must be >= 1"),
    (1, -1, "d_max must be >= 0"),
    (2 - step / 1000, 0, r"r_max\(5000\)"),
])
def test_bad_schedules(r_max, d_max, match):
    with pytest.raises(ValueError, match=match):
        RenormSchedule(r_max, d_max)


def test_nan_bounds():
    with pytest.raises(ValueError, match="must be a number"):
        RenormSchedule.constant(float("nan"), 0)
    with pytest.raises(ValueError, match="warmup"):
        RenormSchedule.paper(warmup=50000)
