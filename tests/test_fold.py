"""fold: batch-norms (and renorm layers) baked into the conv / linear before them."""

import copy
import logging
import operator
import pickle

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.testing import assert_close

import renorm_fx
from renorm_fx import FoldReport, RenormSchedule, fold, renormify
from renorm_fx.deploy import ScaleShift, export_onnx
from renorm_fx.fusion import fold_weights
from renorm_fx.passes.fold_pass import fold_batch_norms

import models

BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine and running statistics on every batch-norm."""
    models.scramble_stats(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def _norm_nodes(gm: fx.GraphModule) -> list:
    """Normalization nodes left in a folded graph."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   (nn.modules.batchnorm._BatchNorm, ScaleShift)):
            out.append(node.target)
        elif node.op == "call_function" and node.target in BN_FUNCTIONS:
            out.append(node.name)
    return out


def _check_folded(model: nn.Module, x: torch.Tensor, rtol: float = 1e-12, atol: float = 1e-12):
    model.eval()
    folded = fold(model)
    report = folded.fold_report
    assert isinstance(folded, fx.GraphModule) and not folded.training
    assert not report.not_folded, report
    assert _norm_nodes(folded) == [], folded.code
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert_close(folded(x), model(x), rtol=rtol, atol=atol)
    return folded, report


# ---- every layer kind ---------------------------------------------------------------------

LAYERS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d, 6, (3, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d, 6, (3, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, dilation=2, padding=2), nn.BatchNorm3d, 6, (2, 4, 5, 5, 5)),
    "conv2d_grouped_no_bias": (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d, 6, (3, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d, 6, (3, 6, 7, 7)),
    "conv2d_circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d, 6,
                        (3, 4, 7, 7)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d, 6, (3, 4, 9)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1), nn.BatchNorm2d, 6,
                         (3, 4, 5, 5)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2), nn.BatchNorm3d, 6, (2, 4, 3, 3, 3)),
    "conv_transpose2d_groups2": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d, 6, (3, 4, 5, 5)),
    "conv_transpose2d_groups2_no_bias": (lambda: nn.ConvTranspose2d(6, 4, 3, groups=2, bias=False),
                                         nn.BatchNorm2d, 4, (3, 6, 5, 5)),
    "conv_transpose2d_depthwise": (lambda: nn.ConvTranspose2d(6, 6, 3, groups=6), nn.BatchNorm2d, 6, (3, 6, 5, 5)),
    "conv_transpose3d_groups3": (lambda: nn.ConvTranspose3d(6, 9, 2, groups=3), nn.BatchNorm3d, 9, (2, 6, 3, 3, 3)),
    "linear": (lambda: nn.Linear(5, 6), nn.BatchNorm1d, 6, (7, 5)),
    "linear_no_bias": (lambda: nn.Linear(5, 6, bias=False), nn.BatchNorm1d, 6, (7, 5)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_fold_each_layer_kind_float64(kind):
    layer, bn, channels, shape = LAYERS[kind]
    model = _randomize(nn.Sequential(layer(), bn(channels)))
    model = model.double().eval()
    folded, report = _check_folded(model, torch.randn(shape, dtype=torch.float64))
    assert report.folded == {"1": "0"}
    assert folded.get_submodule("0").bias is not None  # created where there was none


def test_two_batch_norms_in_a_row_both_fold():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.BatchNorm2d(5))).double()
    _, report = _check_folded(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert report.folded == {"1": "0", "2": "0"}


def test_affine_false_folds():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, affine=False))).double()
    _check_folded(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))


def test_sync_batch_norm_folds_in_eval():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 5, 3), nn.SyncBatchNorm(5))).double()
    _, report = _check_folded(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert report.folded == {"1": "0"}


def test_mlp_linear_batchnorm1d():
    model = _randomize(models.MLP()).double()
    folded, report = _check_folded(model, torch.randn(9, 7, dtype=torch.float64))
    assert report.folded == {"net.1": "net.0"}


class FunctionalNet(nn.Module):
    """F.conv2d / F.conv_transpose2d / F.linear on attribute weights, F.batch_norm and modules."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(6))
        self.register_buffer("rm1", torch.randn(6))
        self.register_buffer("rv1", torch.rand(6) + 0.5)
        self.g1 = nn.Parameter(torch.randn(6))
        self.beta1 = nn.Parameter(torch.randn(6))
        self.wt = nn.Parameter(torch.randn(6, 2, 2, 2) * 0.3)  # conv_transpose, groups=2: 6 -> 4
        self.bn_t = nn.BatchNorm2d(4)
        self.w2 = nn.Parameter(torch.randn(5, 4) * 0.3)  # linear without bias
        self.bn2 = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w1, self.b1, padding=1)
        y = F.relu(F.batch_norm(y, self.rm1, self.rv1, self.g1, self.beta1, self.training, 0.1, 1e-3))
        y = self.bn_t(F.conv_transpose2d(y, self.wt, None, 2, 0, 0, 2))
        return self.bn2(F.linear(y.mean((2, 3)), self.w2))


def test_functional_conv_and_linear():
    model = _randomize(FunctionalNet()).double().eval()
    folded, report = _check_folded(model, torch.randn(3, 3, 6, 6, dtype=torch.float64))
    assert set(report.folded) == {"batch_norm", "bn_t", "bn2"}, report
    assert report.folded["bn2"] == "linear"
    # the statistics of the folded functional batch-norm are gone from the result
    assert not {"rm1", "rv1", "g1", "beta1"} & set(folded.state_dict())
    assert model.rm1 is not None and "rm1" in model.state_dict()  # and the caller keeps them


# ---- layouts and dtypes -------------------------------------------------------------------

def test_channels_last_weights_keep_their_memory_format():
    model = _randomize(nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.ConvTranspose2d(8, 6, 3, groups=2), nn.BatchNorm2d(6)))
    model = model.double().to(memory_format=torch.channels_last).eval()
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    folded, _ = _check_folded(model, x)
    for name in ("0", "3"):
        w = folded.get_submodule(name).weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous(), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_weights_fold_in_float64(dtype):
    ref = _randomize(nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                   nn.ConvTranspose2d(6, 6, 3, groups=3), nn.BatchNorm2d(6))).eval()
    model = copy.deepcopy(ref).to(dtype)
    folded = fold(model)
    for name, bn in (("0", "1"), ("3", "4")):
        w = folded.get_submodule(name).weight
        assert w.dtype == dtype and folded.get_submodule(name).bias.dtype == dtype
        # the fold is rounded once, from float64
        conv, norm = model.get_submodule(name), model.get_submodule(bn)
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        shift = norm.bias.double() - norm.running_mean.double() * scale
        want, _ = fold_weights(conv.weight, conv.bias, scale, shift,
                               "conv" if name == "0" else "conv_transpose", conv.groups)
        assert torch.equal(w, want)
    x = torch.randn(2, 4, 8, 8)
    exact = ref.double()(x.double())
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]
    with torch.no_grad():
        got, unfolded = folded(x.to(dtype)).double(), model(x.to(dtype)).double()
    scale = exact.abs().max()
    assert (got - exact).abs().max() <= tol * scale
    # no worse than the unfolded low-precision model, give or take rounding
    assert (got - exact).abs().max() <= 2 * (unfolded - exact).abs().max() + tol * scale / 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scale_and_shift(dtype):
    model = _randomize(models.PreActBlock()).eval()
    x = torch.randn(2, 6, 5, 5)
    exact = model.double()(x.double())
    model = model.to(dtype)
    folded = fold(model)
    report = folded.fold_report
    assert set(report.not_folded) == {"bn1"}
    assert folded.bn1.scale.dtype == torch.float32  # statistics kept in float32, as batchnorm computes
    with torch.no_grad():
        got = folded(x.to(dtype))
    assert got.dtype == dtype
    assert (got.double() - exact).abs().max() <= 5e-2 * exact.abs().max()


def test_grouped_conv_transpose_where_torch_fuse_is_wrong():
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).double().eval()
    bn = _randomize(nn.BatchNorm2d(6)).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    want = bn(conv(x))
    folded = fold(nn.Sequential(conv, bn).eval())
    assert_close(folded(x), want, rtol=1e-12, atol=1e-12)
    # torch.nn.utils.fusion gets grouped ConvTranspose wrong (upstream issue 180995):
    # it scales weight dim 1 (out/groups) by all `out` channels' factors.
    try:
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias, transpose=True)
        theirs = F.conv_transpose2d(x, w, b, groups=2)
        torch_ok = theirs.shape == want.shape and torch.allclose(theirs, want)
    except RuntimeError:
        torch_ok = False
    assert not torch_ok, "torch's fuse_conv_bn_weights handles grouped ConvTranspose now"


def test_depthwise_conv_transpose_where_torch_fuse_is_wrong():
    conv = nn.ConvTranspose2d(4, 4, 3, groups=4).double().eval()
    bn = _randomize(nn.BatchNorm2d(4)).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    folded = fold(nn.Sequential(conv, bn).eval())
    assert_close(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
    w, _ = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                bn.weight, bn.bias, transpose=True)
    assert w.shape != conv.weight.shape  # (4, 1, 3, 3) * (1, 4, 1, 1) broadcasts to (4, 4, 3, 3)


# ---- networks and the cases that cannot fold ----------------------------------------------

def test_residual_net():
    model = _randomize(models.ResidualBlock()).double()
    _, report = _check_folded(model, torch.randn(2, 6, 7, 7, dtype=torch.float64))
    assert report.folded == {"bn1": "conv1", "bn2": "conv2"}


def test_pre_activation_net_scale_and_shift():
    model = _randomize(models.PreActBlock()).double().eval()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {"bn2": "conv1"}
    assert set(report.not_folded) == {"bn1"} and "model input" in report.not_folded["bn1"]
    assert isinstance(folded.bn1, ScaleShift) and _norm_nodes(folded) == ["bn1"]
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


class TwoBranches(nn.Module):
    """One conv's output feeds a batch-norm and a skip; another conv feeds two batch-norms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.act = nn.BatchNorm2d(4)
        self.after_relu = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn(y) + y
        z = self.conv2(y)
        return self.after_relu(F.relu(self.bn_a(z) * self.bn_b(z)))


def test_conv_output_with_other_users():
    model = _randomize(TwoBranches()).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {}
    assert set(report.not_folded) == {"bn", "bn_a", "bn_b", "after_relu"}
    assert "other users" in report.not_folded["bn"] and "'conv'" in report.not_folded["bn"]
    assert "other users" in report.not_folded["bn_a"] and "other users" in report.not_folded["bn_b"]
    assert "relu" in report.not_folded["after_relu"]
    assert all("x * scale + shift" in why for why in report.not_folded.values())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(folded.conv.weight, model.conv.weight)  # not folded twice, not at all


class ReusedConv(nn.Module):
    """A conv module called at two sites (shared weights), each followed by a batch-norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.alias = self.conv  # the same module under a second name
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2)) + self.bn3(self.alias(-x))


def test_conv_called_at_several_sites_is_not_folded():
    model = _randomize(ReusedConv()).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {}
    for bn in ("bn1", "bn2", "bn3"):
        assert "3 call sites (shared weights)" in report.not_folded[bn], report
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


class TiedFunctional(nn.Module):
    """F.conv2d on one weight at two sites (one get_attr each), and on another weight whose
    get_attr node feeds two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.v = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn1(F.conv2d(x, self.w)) + F.conv2d(x * 2, self.w)
        v = self.v
        return a + self.bn2(F.conv2d(x, v)) + self.bn3(F.conv2d(-x, v))


def test_shared_functional_weights_are_not_folded():
    model = _randomize(TiedFunctional()).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    gm = fx.symbolic_trace(model)
    v_nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "v"]
    assert len(v_nodes) == 1 and len(v_nodes[0].users) == 2  # one get_attr node feeding two convs
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {}
    assert "2 call sites" in report.not_folded["bn1"] and "2 call sites" in report.not_folded["bn2"]
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_batch_norm_module_called_twice():
    model = _randomize(models.SharedBN()).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {"bn (call 2)": "lin"}
    assert set(report.not_folded) == {"bn"}
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_batch_statistics_cannot_fold_and_are_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {"3": "2"}
    assert "track_running_stats=False" in report.not_folded["1"]
    assert isinstance(folded.get_submodule("1"), nn.BatchNorm2d)  # kept: batch statistics
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_linear_on_3d_input_is_guarded():
    # BatchNorm1d on (N, C, L) normalizes dim 1, not the linear's output features: folding
    # Linear(L -> L) + BatchNorm1d(C) with C == L would be wrong.
    model = _randomize(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).double().eval()
    x3 = torch.randn(2, 4, 4, dtype=torch.float64)
    x2 = torch.randn(5, 4, dtype=torch.float64)
    folded = fold(model)
    assert_close(folded(x2), model(x2), rtol=1e-12, atol=1e-12)
    with pytest.raises(Exception, match="assuming a 2-D output"):
        folded(x3)
    checked = fold(model, example_inputs=(x3,))
    report = checked.fold_report
    assert "is 3-D" in report.not_folded["1"]
    assert_close(checked(x3), model(x3), rtol=1e-12, atol=1e-12)
    checked2 = fold(model, example_inputs=(x2,))
    assert "_assert" not in checked2.code
    assert_close(checked2(x2), model(x2), rtol=1e-12, atol=1e-12)


def test_report_table_and_logging(caplog):
    model = _randomize(models.PreActBlock()).eval()
    with caplog.at_level(logging.INFO, logger="renorm_fx.deploy"):
        report = fold(model).fold_report
    assert isinstance(report, FoldReport)
    table = str(report)
    assert "bn2" in table and "folded into conv1" in table and "NOT folded" in table
    assert table in caplog.text


# ---- renormified models -------------------------------------------------------------------

def _train(model, steps=6, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(shape, generator=g) * 3 + 1
        model(x).square().mean().backward()
        opt.step()
    return model


def test_renormified_model_after_training():
    rn = renormify(models.SmallCNN(), RenormSchedule.constant(2.0, 1.0))
    _train(rn)
    bn = rn.get_submodule("bn")
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert int(bn.num_batches_tracked) == 6
    before = copy.deepcopy(rn.state_dict())
    with pytest.raises(RuntimeError, match="training mode"):
        fold(rn)
    rn.eval()
    folded = fold(rn)
    report = folded.fold_report
    assert report.folded == {"bn": "conv", "bn_head": "fc"} and not report.not_folded
    assert _norm_nodes(folded) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = rn(x)
        assert_close(folded(x), want, rtol=0, atol=1e-5 * want.abs().max().item())
    for k, v in rn.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_renormified_functional_and_nested():
    rn = renormify(FunctionalNet(), RenormSchedule.constant(2.0, 1.0))
    _train(rn, shape=(4, 3, 6, 6))
    outer = nn.Sequential(rn, nn.ReLU()).eval()  # a renormified part inside a plain model
    x = torch.randn(3, 3, 6, 6)
    folded = fold(outer)
    report = folded.fold_report
    assert len(report.folded) == 3 and not report.not_folded, report
    with torch.no_grad():
        want = outer(x)
        assert_close(folded(x), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert _norm_nodes(folded) == []


# ---- the contract -------------------------------------------------------------------------

def test_training_mode_is_refused():
    model = models.SmallCNN()
    with pytest.raises(RuntimeError, match=r"training mode; folding bakes in the moving statistics\. "
                                           r"Call fold\(model\.eval\(\)\)"):
        fold(model)


def test_caller_model_not_mutated_and_parameters_are_new():
    model = _randomize(models.ResidualBlock()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ours = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    assert not ours & {id(t) for t in list(folded.parameters()) + list(folded.buffers())}
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None


def test_inplace_reuses_modules():
    model = _randomize(models.ResidualBlock()).double().eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    want = model(x)
    folded = fold(model, inplace=True)
    assert folded.conv1 is model.conv1  # its weights were replaced on the caller's module
    assert_close(folded(x), want, rtol=1e-12, atol=1e-12)


def test_folded_module_copies_and_pickles():
    model = _randomize(models.PreActBlock()).eval()
    folded = fold(model)
    x = torch.randn(2, 6, 5, 5)
    for other in (copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))):
        assert_close(other(x), folded(x), rtol=0, atol=0)
        assert other.fold_report == folded.fold_report  # the report travels with the module
    refolded = fold(folded)  # idempotent
    report = refolded.fold_report
    assert report.folded == {} and _norm_nodes(refolded) == ["bn1"]


def test_model_without_batch_norm():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {} and report.not_folded == {} and "no batch-norm" in str(report)
    x = torch.randn(2, 3)
    assert_close(folded(x), model(x))


# ---- deploy: torch.export and ONNX --------------------------------------------------------

class DeployNet(nn.Module):
    """Everything fold meets: conv, grouped transposed conv, depthwise, linear, a pre-activation
    batch-norm (scale-and-shift) and a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_dw = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(self.pre(x))))
        y = y + F.relu(self.bn_dw(self.dw(y)))
        y = F.relu(self.bn_up(self.up(y)))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def _deploy_model():
    model = renormify(DeployNet(), RenormSchedule.constant(2.0, 1.0))
    _train(model, steps=3, shape=(4, 3, 8, 8))
    return model.eval()


def test_torch_export_round_trip():
    model = _deploy_model()
    x = torch.randn(3, 3, 8, 8)
    folded = fold(model)
    ep = torch.export.export(folded, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops), ops
    with torch.no_grad():
        want = model(x)
        got = ep.module()(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _onnx_session(model: nn.Module, x: torch.Tensor, path) -> tuple[list[str], Any]:
    """``model`` exported (no ONNX optimizer, dynamic batch) and loaded into onnxruntime: its op types and session."""
    ort = pytest.importorskip("onnxruntime", reason="the deploy extra (pip install 'renorm-fx[deploy]') is absent")
    onnx = pytest.importorskip("onnx", reason="the deploy extra (pip install 'renorm-fx[deploy]') is absent")
    pytest.importorskip("onnxscript", reason="the deploy extra (pip install 'renorm-fx[deploy]') is absent")
    # optimize=False: no help from the ONNX optimizer, which would fuse Conv + BatchNormalization itself
    export_onnx(model, (x,), path, optimize=False, dynamic_batch=True)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return ops, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_session_matches(session: Any, model: nn.Module, shapes, tol: float) -> None:
    for shape in shapes:
        xb = torch.randn(shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
        with torch.no_grad():
            want = model(xb)
        assert got.shape == tuple(want.shape)
        assert (torch.from_numpy(got) - want).abs().max() <= tol * want.abs().max()


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch's own exporter internals
def test_onnx_round_trip(tmp_path):
    model = _deploy_model()
    ops, session = _onnx_session(model, torch.randn(3, 3, 8, 8), tmp_path / "model.onnx")
    assert "BatchNormalization" not in ops and "Conv" in ops and "ConvTranspose" in ops, ops
    _assert_session_matches(session, model, [(3, 3, 8, 8), (7, 3, 8, 8)], 1e-4)


def test_helpers_are_reachable_from_the_package():
    assert renorm_fx.export_onnx is export_onnx and renorm_fx.FoldReport is FoldReport


# ---- norm + activation subclasses (their own forward) --------------------------------------

class BNAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: F.batch_norm, then dropout, then an activation."""

    def __init__(self, c: int, act: type = nn.ReLU, drop: float = 0.1) -> None:
        super().__init__(c)
        self.drop = nn.Dropout(drop)
        self.act = act()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or self.running_mean is None, self.momentum, self.eps)
        return self.act(self.drop(x))


class BNSiLU(nn.BatchNorm2d):
    """batchnorm's own forward, then an activation."""

    def forward(self, x):
        return F.silu(super().forward(x))


class SyncBNAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct: SyncBatchNorm's forward, then an activation module."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(super().forward(x))


class NormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BNAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = BNSiLU(8)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.bn3 = SyncBNAct(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(self.bn3(self.conv3(y)).mean((2, 3)))


def test_norm_activation_subclasses_fold_and_keep_the_activation():
    model = _randomize(NormActNet()).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    folded, report = _check_folded(model, x)
    assert report.folded == {"bn1": "conv1", "bn2": "conv2", "bn3": "conv3"}
    calls = [(n.op, n.target) for n in folded.graph.nodes if n.op in ("call_module", "call_function")]
    assert ("call_module", "bn1.drop") in calls and ("call_module", "bn1.act") in calls  # the rest stays
    assert ("call_function", F.silu) in calls and ("call_module", "bn3.act") in calls
    assert isinstance(folded.bn1, renorm_fx.modules.Inlined) and folded.bn1.inlined_from == "BNAct2d"
    assert not list(folded.bn1.buffers()) and not list(folded.bn1.parameters())  # statistics folded away
    # BNAct2d asserts its input's rank itself: no guard added; BNSiLU's check was batchnorm's, now folded
    assert "conv1_rank_check" not in folded.code and "conv2_rank_check" in folded.code
    assert type(model.bn1) is BNAct2d and "bn1.running_mean" in model.state_dict()  # the caller's is untouched


def test_norm_activation_subclass_inplace_keeps_the_callers_module():
    model = _randomize(NormActNet()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = model(x)
    folded = fold(model, inplace=True)
    assert type(model.bn1) is BNAct2d and folded.bn1.act is model.bn1.act
    assert_close(folded(x), want, rtol=1e-12, atol=1e-12)


class DataDependentBN(nn.BatchNorm2d):
    def forward(self, x):
        y = super().forward(x)
        return y if x.sum() > 0 else -y  # Python control flow on a tensor: fx cannot trace it


class HandWrittenBN(nn.BatchNorm2d):
    def forward(self, x):
        shape = (1, -1, 1, 1)
        return (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)


class HookedBNAct(BNAct2d):
    pass


@pytest.mark.parametrize("cls, why", [
    (DataDependentBN, "could not trace"),
    (HandWrittenBN, "no F.batch_norm(training=False)"),
    (HookedBNAct, "forward hooks"),
])
def test_subclass_fold_cannot_follow_stays_and_is_reported(cls, why):
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), cls(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model = model.double().eval()
    if cls is HookedBNAct:
        model[1].register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {"3": "2"}
    assert set(report.not_folded) == {"1"} and why in report.not_folded["1"] and "kept as is" in report.not_folded["1"]
    assert type(folded.get_submodule("1")) is cls  # left whole
    with torch.no_grad():
        assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


# ---- parallel branches: RepVGG / MobileOne re-parameterization -----------------------------

class RepVGGBlock(nn.Module):
    """3x3 conv + BN, 1x1 conv + BN and (same shape) an identity BN, summed, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, norm: type = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False)
        self.bn3 = norm(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 1, stride, 0, groups=groups, bias=False)
        self.bn1 = norm(c_out)
        self.bn_id = norm(c_in) if c_in == c_out and stride == 1 else None

    def forward(self, x):
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.bn_id is not None:
            y = y + self.bn_id(x)
        return F.relu(y)


class MobileOneBlock(nn.Module):
    """Several kxk conv + BN branches, a 1x1 conv + BN scale branch and an identity BN."""

    def __init__(self, c: int, k: int = 3, branches: int = 3, groups: int = 1, norm: type = nn.BatchNorm2d) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=groups, bias=False),
                                                 norm(c)) for _ in range(branches))
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=False), norm(c))
        self.identity = norm(c)
        self.drop_path = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        identity = self.identity(x)
        out = self.scale(x)
        for branch in self.convs:
            out += branch(x)
        out = self.drop_path(out)
        out += identity
        return self.act(out)


def _check_merged(model: nn.Module, x: torch.Tensor, convs_left: int):
    model = _randomize(model).double().eval()
    folded = fold(model)
    report = folded.fold_report
    assert not report.not_folded and not report.not_merged, report
    assert _norm_nodes(folded) == []
    convs = [n for n in folded.graph.nodes if n.op == "call_module" and isinstance(folded.get_submodule(n.target), nn.Conv2d)]
    assert len(convs) == convs_left, folded.code
    assert not [n for n in folded.graph.nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd)]
    with torch.no_grad():
        want = model(x)
        assert (folded(x) - want).abs().max() <= 1e-10 * want.abs().max()
    return folded, report


REPVGG = {
    "identity": (dict(c_in=6, c_out=6), ["conv3", "conv1", "bn_id"]),
    "identity_groups2": (dict(c_in=6, c_out=6, groups=2), ["conv3", "conv1", "bn_id"]),
    "identity_depthwise": (dict(c_in=6, c_out=6, groups=6), ["conv3", "conv1", "bn_id"]),
    "stride2": (dict(c_in=6, c_out=6, stride=2), ["conv3", "conv1"]),
    "wider": (dict(c_in=4, c_out=8), ["conv3", "conv1"]),
}


@pytest.mark.parametrize("case", list(REPVGG))
def test_repvgg_block_merges_into_one_conv(case):
    kwargs, branches = REPVGG[case]
    x = torch.randn(2, kwargs["c_in"], 9, 9, dtype=torch.float64)
    folded, report = _check_merged(RepVGGBlock(**kwargs), x, convs_left=1)
    assert report.merged == {"conv3": branches}
    assert report.folded["bn3"] == "conv3" and report.folded["bn1"] == "conv1"
    if "bn_id" in branches:
        assert report.folded["bn_id"] == "conv3"  # the identity batch-norm is in the merged conv
    assert "conv1" not in dict(folded.named_modules())  # the merged-away conv is gone
    assert "merged: conv3 + conv1" in str(report)


@pytest.mark.parametrize("k, groups", [(3, 1), (3, 4), (5, 1)])
def test_mobileone_block_merges_into_one_conv(k, groups):
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    _, report = _check_merged(MobileOneBlock(8, k, groups=groups), x, convs_left=1)
    assert report.merged == {"convs.0.0": ["scale.0", "convs.0.0", "convs.1.0", "convs.2.0", "identity"]}


class RepNet(nn.Module):
    """A small re-parameterizable net: RepVGG blocks (one with norm + activation layers) and MobileOne."""

    def __init__(self, norm: type = nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, 8, stride=2, norm=norm)
        self.b1 = RepVGGBlock(8, 8, norm=norm)
        self.b2 = MobileOneBlock(8, groups=8, norm=norm)
        self.b3 = RepVGGBlock(8, 12, stride=2, norm=norm)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.b3(self.b2(self.b1(self.stem(x)))).mean((2, 3)))


def _identity_act(c: int) -> BNAct2d:
    return BNAct2d(c, act=nn.Identity, drop=0.0)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, _identity_act], ids=["batchnorm", "norm_act"])
def test_rep_net_merges_every_block(norm):
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    _, report = _check_merged(RepNet(norm), x, convs_left=4)
    assert set(report.merged) == {"stem.conv3", "b1.conv3", "b2.convs.0.0", "b3.conv3"}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_even_kernels_with_same_padding_merge():
    class Even(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 4, padding="same")
            self.b = nn.Conv2d(4, 4, 2, padding="same")

        def forward(self, x):
            return self.a(x) + self.b(x) + x

    _, report = _check_merged(Even(), torch.randn(2, 4, 7, 7, dtype=torch.float64), convs_left=1)
    assert report.merged == {"a": ["a", "b", "x (identity)"]}


UNMERGEABLE = {  # branch a, branch b
    "other_user": (dict(kernel_size=3, padding=1), dict(kernel_size=1)),
    "dilation": (dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=3, padding=1)),
    "groups": (dict(kernel_size=3, padding=1), dict(kernel_size=1, groups=2)),
    "odd_difference": (dict(kernel_size=3, padding=1), dict(kernel_size=2, padding="same")),
}


class Unmergeable(nn.Module):
    """Two conv + BN branches on one input, summed, that cannot become one conv."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        a, b = UNMERGEABLE[case]
        self.a, self.b = nn.Conv2d(4, 4, bias=False, **a), nn.Conv2d(4, 4, bias=False, **b)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn_a(self.a(x))
        y = F.relu(a + self.bn_b(self.b(x)))
        return y * a if self.case == "other_user" else y


@pytest.mark.parametrize("case, why", [
    ("other_user", "'a' has other users"),
    ("dilation", "different dilation"),
    ("groups", "different groups"),
    ("odd_difference", "does not line up"),
])
def test_branches_that_cannot_merge_are_reported(case, why):
    model = _randomize(Unmergeable(case)).double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    folded = fold(model)
    report = folded.fold_report
    assert report.folded == {"bn_a": "a", "bn_b": "b"} and not report.merged
    assert list(report.not_merged) == ["a + b"] and why in report.not_merged["a + b"], report
    assert "NOT merged" in str(report)
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_in_place_add_into_the_shared_input_is_not_merged():
    # fold() retraces, and torch.fx records `y += z` as `y + z`; a graph handed to the pass
    # itself (as Dynamo's are) can hold an in-place add
    class Alias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = x.relu()
            return (y + self.conv(y)) * 2 + y

    gm = fx.symbolic_trace(Alias().double().eval())
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    add.target = operator.iadd  # y += conv(y): the last read of y sees the sum
    gm.recompile()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    want = gm(x)
    report = fold_batch_norms(gm)
    assert not report.merged and "in-place add" in report.not_merged["relu (identity) + conv"], report
    assert_close(gm(x), want, rtol=0, atol=0)


def test_identity_kernel_is_the_identity():
    from renorm_fx.fusion import identity_kernel
    scale = torch.randn(6, dtype=torch.float64)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    for groups in (1, 2, 6):
        w = identity_kernel(scale, 6 // groups, (3, 3), (1, 1))
        assert_close(F.conv2d(x, w, padding=1, groups=groups), x * scale.view(-1, 1, 1), rtol=0, atol=0)


def _structure(report: FoldReport) -> tuple:
    return report.folded, set(report.not_folded), report.merged, report.not_merged


@pytest.mark.parametrize("make", [NormActNet, RepNet, lambda: RepNet(_identity_act)], ids=["norm_act", "rep", "rep_norm_act"])
def test_renormified_models_fold_the_same(make):
    model = _randomize(make()).double().eval()
    plain = fold(model).fold_report
    rn = renormify(model.train(), RenormSchedule.constant(2.0, 1.0))
    assert any(isinstance(m, renorm_fx.RenormLayer) for m in rn.modules())
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(rn.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        rn(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * 3 + 1).square().mean().backward()
        opt.step()
    rn.eval()
    folded = fold(rn)
    assert _structure(folded.fold_report) == _structure(plain)
    assert _norm_nodes(folded) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = rn(x)
        assert (folded(x) - want).abs().max() <= 1e-10 * want.abs().max()


def _rep_deploy_model() -> nn.Module:
    return _randomize(RepNet(_identity_act)).eval()


def test_torch_export_of_merged_blocks():
    model = _rep_deploy_model()
    x = torch.randn(3, 3, 12, 12)
    ep = torch.export.export(fold(model), (x,))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in op for op in ops), ops
    assert sum("conv2d" in op for op in ops) == 4 and not any("add" in op for op in ops), ops
    with torch.no_grad():
        want = model(x)
        got = ep.module()(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch's own exporter internals
def test_onnx_of_merged_blocks(tmp_path):
    model = _rep_deploy_model()
    ops, session = _onnx_session(model, torch.randn(3, 3, 12, 12), tmp_path / "rep.onnx")
    assert ops.count("Conv") == 4 and "BatchNormalization" not in ops and "Add" not in ops, ops
    _assert_session_matches(session, model, [(3, 3, 12, 12), (5, 3, 12, 12)], 1e-5)


def test_branches_whose_input_is_changed_in_place_are_not_merged():
    class Mutating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            x = x * 1
            a = self.a(x)
            self.act(x)  # x changes here: b reads the relu of what a read
            return a + self.b(x)

    model = Mutating().double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    folded = fold(model)
    assert not folded.fold_report.merged
    assert "changed in place" in folded.fold_report.not_merged["a + b"], folded.fold_report
    assert_close(folded(x), model(x), rtol=0, atol=0)
