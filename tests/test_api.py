"""renormify's contract: state_dict, resume, inplace, idempotence, bounds, copies."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import models
from renorm_fx import RenormLayer, RenormSchedule, bounds, renormify

SCHED = RenormSchedule.paper(r_max=3, d_max=5, warmup=2, r_max_at=10, d_max_at=6)


def _steps(model, n, seed=0, shape=(6, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(shape, generator=g)).square().sum().backward()
        opt.step()
    return model


def test_state_dict_round_trip_both_ways():
    orig = models.SmallCNN()
    rn = renormify(orig, SCHED)
    assert list(rn.state_dict()) == list(orig.state_dict()) or set(rn.state_dict()) == set(orig.state_dict())
    _steps(rn, 3)
    fresh = models.SmallCNN()
    fresh.load_state_dict(rn.state_dict(), strict=True)  # renorm -> batchnorm model
    for k, v in rn.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    back = renormify(models.SmallCNN(), SCHED)
    back.load_state_dict(fresh.state_dict(), strict=True)  # batchnorm -> renorm model
    assert bounds(back) == bounds(rn)
    fresh.eval(), back.eval()
    x = torch.randn(4, 3, 8, 8)
    assert_close(back(x), fresh(x), rtol=0, atol=0)


def test_functional_step_buffer_loads_from_original_checkpoint():
    orig = models.FunctionalBN()
    rn = renormify(orig, SCHED)
    rn.load_state_dict(orig.state_dict(), strict=True)  # no step key in the original: kept
    assert "renorm_step" in rn.state_dict() and "renorm_step" not in orig.state_dict()
    fresh = models.FunctionalBN()
    fresh.load_state_dict(rn.state_dict(), strict=False)  # the other way: the step key is the only extra
    assert set(rn.state_dict()) - set(fresh.state_dict()) == {"renorm_step"}


def test_resume_continues_schedule():
    full = _steps(renormify(models.SmallCNN(), SCHED), 7)
    part = _steps(renormify(models.SmallCNN(), SCHED), 4)
    saved = io.BytesIO()
    torch.save(part.state_dict(), saved)
    saved.seek(0)
    resumed = renormify(models.SmallCNN(), SCHED)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert bounds(resumed) == {"bn": SCHED.at(4), "bn_head": SCHED.at(4)}
    assert int(resumed.get_buffer("bn.num_batches_tracked")) == 4
    assert bounds(full) == {"bn": SCHED.at(7), "bn_head": SCHED.at(7)}


def test_bounds_follow_each_layers_step():
    rn = renormify(models.SmallCNN(), SCHED)
    assert bounds(rn) == {"bn": (1.0, 0.0), "bn_head": (1.0, 0.0)}
    _steps(rn, 8)
    assert bounds(rn)["bn"] == SCHED.at(8)
    rn.eval()
    rn(torch.randn(2, 3, 8, 8))  # eval forwards do not count
    assert bounds(rn)["bn"] == SCHED.at(8)
    outer = nn.Sequential(rn, nn.ReLU())
    assert bounds(outer) == {"0.bn": SCHED.at(8), "0.bn_head": SCHED.at(8)}


def test_inplace_false_never_mutates():
    orig = models.SmallCNN()
    before = copy.deepcopy(orig.state_dict())
    rn = renormify(orig, SCHED)
    _steps(rn, 3)
    for k, v in orig.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert orig.training


def test_inplace_true_shares_parameters():
    orig = models.SmallCNN()
    rn = renormify(orig, SCHED, inplace=True)
    assert rn.get_parameter("conv.weight") is orig.conv.weight
    _steps(rn, 1)
    assert int(orig.bn.num_batches_tracked) == 1


def test_mode_is_kept_and_switches():
    orig = models.SmallCNN().eval()
    rn = renormify(orig)
    assert not rn.training and not orig.training
    x = torch.randn(4, 3, 8, 8)
    assert_close(rn(x), orig(x), rtol=0, atol=0)
    rn.train()
    rn(x)
    assert int(rn.get_buffer("bn.num_batches_tracked")) == 1


def test_twice_converts_nothing_twice():
    rn = renormify(models.SmallCNN())
    with pytest.warns(UserWarning, match="already renormified"):
        assert renormify(rn) is rn
    outer = nn.Sequential(rn, nn.BatchNorm1d(4))
    twice = renormify(outer)
    assert twice[0].bn is not rn.bn and isinstance(twice[0].bn, RenormLayer)
    assert set(bounds(twice)) == {"0.bn", "0.bn_head", "1"}
    assert twice[0].bn.code == rn.bn.code  # converted once: the same trace


def test_no_batchnorm_returns_unchanged_with_warning():
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="no batch-norm"):
        assert renormify(m) is m


def test_momentum_override_and_none():
    m = nn.Sequential(nn.BatchNorm1d(3, momentum=None))
    with pytest.raises(ValueError, match=r"layer '0' has momentum=None.*renormify\(model, momentum=0.01\)"):
        renormify(m)
    rn = renormify(m, RenormSchedule.constant(1, 0), momentum=0.5)
    x = torch.randn(8, 3)
    rn(x)
    assert_close(rn.get_buffer("0.running_mean"), 0.5 * x.mean(0))
    with pytest.raises(ValueError, match="momentum must be in"):
        renormify(m, momentum=0.0)


def test_deepcopy_and_pickle():
    rn = _steps(renormify(models.SmallCNN(), SCHED), 2)
    x = torch.randn(4, 3, 8, 8)
    assert copy.deepcopy(rn).bn.code == rn.bn.code
    assert copy.deepcopy(rn.eval()).bn.code == rn.bn.code  # copies of eval-mode models convert the same
    rn.train()
    for clone in (copy.deepcopy(rn), pickle.loads(pickle.dumps(rn))):
        assert type(clone) is type(rn) and type(clone.bn) is type(rn.bn)
        assert clone.bn_head.code == rn.bn_head.code  # pickling retraces the layer
        assert bounds(clone) == bounds(rn)
        assert clone.get_parameter("bn.weight") is not rn.get_parameter("bn.weight")
        a, b = copy.deepcopy(rn), clone  # same step from the same state
        assert_close(b(x), a(x), rtol=0, atol=0)
        assert_close(b.get_buffer("bn.running_var"), a.get_buffer("bn.running_var"), rtol=0, atol=0)
        a.eval(), b.eval()
        assert_close(b(x), a(x), rtol=0, atol=0)


def test_batchnorm_subclass_is_converted():
    class MyBN(nn.BatchNorm2d):
        pass

    m = nn.Sequential(nn.Conv2d(3, 4, 1), MyBN(4))
    rn = renormify(m)
    assert set(bounds(rn)) == {"1"} and isinstance(rn[1], MyBN)


def test_no_warnings_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps(renormify(models.SmallCNN()), 2)


def test_frozen_batchnorm_stays_batchnorm():
    class Frozen(models.SmallCNN):
        def train(self, mode=True):
            super().train(mode)
            self.bn.eval()  # a common fine-tuning idiom
            return self

    rn = renormify(Frozen()).train()
    x = torch.randn(4, 3, 8, 8)
    rn(x)  # the frozen layer runs batchnorm's eval forward: its statistics do not move
    assert int(rn.bn.num_batches_tracked) == 0 and int(rn.bn_head.num_batches_tracked) == 1
    ref = Frozen()
    ref.load_state_dict(models.SmallCNN().state_dict())
    rn2 = renormify(ref.train(), RenormSchedule.constant(1, 0)).train()
    assert_close(rn2.bn(x.new_ones(2, 8, 3, 3)), ref.bn(x.new_ones(2, 8, 3, 3)), rtol=0, atol=0)
