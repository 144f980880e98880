"""renormify keeps the user's model: class, methods, containers, hooks, names and checkpoints."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import models
from renorm_fx import RenormConfig, RenormLayer, RenormSchedule, bounds, diagnostics, fold, renormify

ID = RenormSchedule.constant(1, 0)
CLIP = RenormSchedule.constant(1.5, 0.5)


class Net(nn.Module):
    """The issue's example: methods, a Sequential container, a head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def features(self, x):
        return self.backbone(x).mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _x(n=4, seed=0):
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_the_issue_example_keeps_class_methods_and_containers():
    net = Net()
    m = renormify(net, CLIP)
    assert isinstance(m, Net) and type(m) is Net and m is not net
    assert isinstance(m.backbone, nn.Sequential) and type(m.backbone) is nn.Sequential
    assert isinstance(m.backbone[1], nn.BatchNorm2d) and isinstance(m.backbone[1], RenormLayer)
    assert [n for n, _ in m.named_modules()] == [n for n, _ in net.named_modules()]
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert m.features(_x()).shape == (4, 4)
    assert m.backbone(_x()).shape == (4, 4, 4, 4)
    assert int(m.backbone[1].num_batches_tracked) == 2  # both calls trained the renorm layer
    assert int(net.backbone[1].num_batches_tracked) == 0  # the user's model is untouched


def test_submodule_call_in_training_is_renorm_against_the_paper():
    """Calling the container alone runs renorm: compare with PAPER.md's equations in float64."""
    from reference import paper_renorm

    m = models.scramble_stats(renormify(Net().double(), CLIP))
    bn = m.backbone[1]
    conv_out = m.backbone[0](_x().double())
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    y = m.backbone[1](conv_out)
    want, (new_mu, new_var), (r, d), _ = paper_renorm(conv_out, bn.weight, bn.bias, mean0, var0, 1.5, 0.5,
                                                      bn.momentum, bn.eps)
    assert not torch.all(r == 1)  # clipping active
    assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert_close(bn.running_mean, new_mu, rtol=1e-10, atol=1e-10)
    assert_close(bn.running_var, new_var, rtol=1e-10, atol=1e-10)


def test_inplace_is_the_same_object():
    net = Net()
    assert renormify(net, inplace=True) is net
    assert isinstance(net.backbone[1], RenormLayer)


def test_eval_is_the_original_layer():
    net = Net().eval()
    m = renormify(net)
    assert_close(m(_x()), net(_x()), rtol=0, atol=0)


def test_bare_batch_norm_layer_converts():
    bn = nn.BatchNorm1d(3)
    rn = renormify(bn, ID)
    assert isinstance(rn, nn.BatchNorm1d) and isinstance(rn, RenormLayer) and rn is not bn
    x = torch.randn(5, 3)
    assert_close(rn(x), bn(x), **models.BN_TOL)
    assert set(bounds(rn)) == {""}


def test_hooks_and_isinstance_code_keep_working():
    net = Net()
    seen = []
    net.backbone[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    m = renormify(net)
    m(_x())
    assert seen == [torch.Size([4, 4, 4, 4])]
    # weight-decay exclusion by isinstance, as training code does
    no_decay = [p for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm) for p in mod.parameters()]
    assert len(no_decay) == 2


def test_state_dict_equals_original_with_metadata_and_loads_both_ways():
    net = Net()
    m = renormify(net, CLIP)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for s in range(3):
        opt.zero_grad()
        m(_x(seed=s)).sum().backward()
        opt.step()
    sd, orig_sd = m.state_dict(), net.state_dict()
    assert list(sd) == list(orig_sd)
    assert sd._metadata == orig_sd._metadata  # module versions: what versioned loaders read
    fresh = Net()
    fresh.load_state_dict(sd, strict=True)
    back = renormify(Net(), CLIP)
    back.load_state_dict(fresh.state_dict(), strict=True)
    assert bounds(back) == bounds(m)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    Net().load_state_dict(torch.load(buf, weights_only=True), strict=True)


class Versioned(nn.Module):
    """A class that versions its state_dict, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        version = local_metadata.get("version", None)
        if version != 2:
            raise RuntimeError(f"old checkpoint (version {version}): cannot load")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, x):
        return self.layers(x)


def test_versioned_checkpoint_round_trip():
    orig = Versioned()
    rn = renormify(orig)
    rn(torch.randn(6, 3))
    fresh = Versioned()
    fresh.load_state_dict(rn.state_dict(), strict=True)  # the renorm checkpoint is a version-2 checkpoint
    assert torch.equal(fresh.layers[1].running_mean, rn.layers[1].running_mean)
    again = renormify(Versioned())
    again.load_state_dict(fresh.state_dict(), strict=True)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this model
            h = h * 2
        return self.bn(h)


def test_untraceable_model_converts_and_trains():
    m = renormify(DataDependent(), CLIP)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for s in range(3):
        opt.zero_grad()
        m(torch.randn(8, 3, generator=torch.Generator().manual_seed(s))).square().mean().backward()
        opt.step()
    assert int(m.bn.num_batches_tracked) == 3 and isinstance(m.bn, RenormLayer)
    assert diagnostics(m)["bn"].step == 3


class BatchNormAct2d(nn.BatchNorm2d):
    """A norm+activation layer in the style of model libraries: F.batch_norm, then dropout and activation."""

    def __init__(self, c, act=None):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act or nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


def test_subclass_with_own_forward_keeps_its_activation():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)).double()
    rn = renormify(ref, ID)
    assert isinstance(rn[1], BatchNormAct2d)
    x = _x().double().requires_grad_()
    y, y_ref = rn(x), ref(x)
    assert (y >= 0).all()  # the ReLU is still there
    assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g, g_ref = torch.autograd.grad(y.sum(), x), torch.autograd.grad(y_ref.sum(), x)
    assert_close(g[0], g_ref[0], rtol=1e-10, atol=1e-10)
    assert int(rn[1].num_batches_tracked) == 1  # counted once: batchnorm's own add_(1) is replaced
    assert "self.act(" in rn[1].code


def test_subclass_without_batch_norm_call_is_named():
    class OwnMath(nn.BatchNorm1d):
        def forward(self, x):  # normalizes without a batch-norm call: nothing the pass understands
            return (x - x.mean(0)) / (x.var(0) + self.eps).sqrt()

    m = nn.Sequential(OwnMath(3), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match=r"(?s)'0'.*not one renormify understands"):
        rn = renormify(m)
    assert type(rn[0]) is OwnMath and set(bounds(rn)) == {"1"}


class FunctionalNet(nn.Module):
    """F.batch_norm in a model's own forward, on its own buffers, beside a batch-norm child."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))
        self.bn = nn.BatchNorm1d(4)

    def embed(self, x):
        return self.fc(x)

    def forward(self, x):
        h = F.batch_norm(self.embed(x), self.running_mean, self.running_var, training=self.training)
        return self.bn(h)


def test_functional_batch_norm_in_a_models_forward_keeps_the_class():
    ref = FunctionalNet()
    rn = renormify(ref, ID)
    assert isinstance(rn, FunctionalNet) and isinstance(rn, RenormLayer) and isinstance(rn.bn, RenormLayer)
    assert rn.embed(torch.ones(2, 3)).shape == (2, 4)
    x = torch.randn(8, 3)
    assert_close(rn(x), ref(x), **models.BN_TOL)
    assert set(bounds(rn)) == {"", "bn"}
    assert_close(rn.running_mean, ref.running_mean, **models.BN_TOL)


def test_untraceable_functional_forward_warns_and_points_to_compile():
    class Branchy(FunctionalNet):
        def forward(self, x):
            h = self.embed(x)
            if h.mean() > 0:
                h = -h
            return self.bn(F.batch_norm(h, self.running_mean, self.running_var, training=self.training))

    with pytest.warns(UserWarning, match=r"(?s)''|Branchy.*backend='renorm'"):
        rn = renormify(Branchy())
    assert not isinstance(rn, RenormLayer) and isinstance(rn.bn, RenormLayer)  # the rest still converts


def test_convert_sync_batchnorm_order():
    net = Net()
    good = renormify(nn.SyncBatchNorm.convert_sync_batchnorm(net))  # convert first, then renormify
    assert isinstance(good.backbone[1], nn.SyncBatchNorm) and isinstance(good.backbone[1], RenormLayer)
    bad = nn.SyncBatchNorm.convert_sync_batchnorm(renormify(net))  # the other order: plain SyncBatchNorm again
    assert not isinstance(bad.backbone[1], RenormLayer)
    with pytest.warns(UserWarning, match=r"(?s)'backbone.1'.*convert_sync_batchnorm.*first, then renormify"):
        fixed = renormify(bad)
    assert isinstance(fixed.backbone[1], RenormLayer)


def test_one_config_object_for_every_entry_point():
    config = RenormConfig(schedule=CLIP, momentum=0.05, running_stats="variance", nonfinite_guard=False)
    a = renormify(Net(), config)
    b = renormify(Net(), config=config)
    c = renormify(Net(), CLIP, momentum=0.05, running_stats="variance", nonfinite_guard=False)
    assert a.backbone[1].renorm_config == b.backbone[1].renorm_config == c.backbone[1].renorm_config
    assert a.backbone[1].momentum == 0.05
    assert renormify(Net(), config, momentum=0.2).backbone[1].momentum == 0.2  # keywords override the config
    with pytest.raises(TypeError, match="fields: schedule, momentum"):
        RenormConfig.build("renormify", {"shedule": CLIP})
    with pytest.raises(ValueError, match="renormify: running_stats must be one of"):
        renormify(Net(), running_stats="mean")


def test_copies_pickles_and_saves_keep_the_class():
    m = renormify(Net(), CLIP)
    m(_x())
    for clone in (copy.deepcopy(m), _torch_save_load(m)):
        assert type(clone) is Net and type(clone.backbone[1]) is type(m.backbone[1])
        assert clone.backbone[1].code == m.backbone[1].code
        assert_close(clone(_x(seed=3)), copy.deepcopy(m)(_x(seed=3)), rtol=0, atol=0)


def _torch_save_load(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_changed_momentum_is_respected():
    m = renormify(nn.Sequential(nn.BatchNorm1d(3)), ID)
    m[0].momentum = 0.5  # as batchnorm reads self.momentum each forward, so does the renorm layer
    x = torch.randn(6, 3)
    m(x)
    assert_close(m[0].running_mean, 0.5 * x.mean(0))


def test_fold_of_a_kept_model():
    m = renormify(Net(), CLIP)
    m(_x())
    m.eval()
    assert_close(fold(m)(_x(seed=2)), m(_x(seed=2)), rtol=1e-5, atol=1e-6)


def test_no_warnings_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = renormify(Net())
        m(_x())
        m.eval()(_x())


def test_a_layer_left_alone_is_untouched_even_inplace():
    class Branchy(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x  # untraceable: left as batchnorm

    m = nn.Sequential(Branchy(3, momentum=0.3), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match="'0'"):
        renormify(m, momentum=0.05, inplace=True)
    assert type(m[0]) is Branchy and m[0].momentum == 0.3 and not any(k.startswith("_renorm") for k in vars(m[0]))
    assert isinstance(m[1], RenormLayer) and m[1].momentum == 0.05


def test_a_refused_model_is_not_converted_half_way():
    m = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, momentum=None))
    with pytest.raises(ValueError, match=r"layer '1' has momentum=None"):
        renormify(m, inplace=True)
    assert not any(isinstance(layer, RenormLayer) for layer in m)  # nothing converted before the refusal
