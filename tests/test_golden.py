"""Golden graphs: what the pass emits, visible in review.

Regenerate after an intended change with ``EXPECTTEST_ACCEPT=1 pytest tests/test_golden.py``.
"""

import expecttest
import torch.nn.functional as F
from torch import nn

import models
from renorm_fx import RenormSchedule, renormify


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BatchNormReLU2d(nn.BatchNorm2d):
    """A norm+activation layer as model libraries write them: F.batch_norm, then an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


def _code(layer) -> str:
    return layer.code.strip()


class TestGolden(expecttest.TestCase):
    def test_batch_norm_layer(self):
        self.assertExpectedInline(_code(renormify(ConvNet()).bn), """\
def forward(self, input : torch.Tensor) -> torch.Tensor:
    input_1 = input
    num_batches_tracked = self.num_batches_tracked
    running_mean = self.running_mean
    running_var = self.running_var
    weight = self.weight
    bias = self.bias
    renorm_diagnostics = self.renorm_diagnostics
    renorm_nonfinite = self.renorm_nonfinite
    bounds = self._renorm_schedule(num_batches_tracked)
    r_max = bounds[0]
    d_max = bounds[1];  bounds = None
    batch_moments = renorm_fx_functional_batch_moments(input_1, running_mean, 'bn', (4,))
    batch_mean = batch_moments[0]
    batch_var = batch_moments[1];  batch_moments = None
    add = batch_var + 1e-05
    sigma_b = torch.sqrt(add);  add = None
    add_1 = running_var + 1e-05
    sigma = torch.sqrt(add_1);  add_1 = None
    truediv = sigma_b / sigma
    sub = batch_mean - running_mean
    truediv_1 = sub / sigma;  sub = None
    truediv_2 = 1 / r_max
    clamp = torch.clamp(truediv, truediv_2, r_max);  truediv_2 = r_max = None
    r = renorm_fx_ops_stop_gradient(clamp);  clamp = None
    neg = -d_max
    clamp_1 = torch.clamp(truediv_1, neg, d_max);  neg = d_max = None
    d = renorm_fx_ops_stop_gradient(clamp_1);  clamp_1 = None
    ne = r != truediv;  truediv = None
    ne_1 = d != truediv_1;  truediv_1 = None
    clipped = ne | ne_1;  ne = ne_1 = None
    batch_norm_with_stats = renorm_fx_functional_batch_norm_with_stats(input_1, batch_mean, batch_var, weight, bias, r, d, 1e-05);  input_1 = weight = bias = None
    update_running_stats_ = renorm_fx_functional_update_running_stats_(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, sigma_b, sigma, 0.1, 1e-05, 'sigma', None, True);  running_mean = running_var = num_batches_tracked = batch_mean = batch_var = sigma_b = sigma = None
    record_diagnostics_ = renorm_fx_functional_record_diagnostics_(renorm_diagnostics, renorm_nonfinite, r, d, clipped, update_running_stats_);  renorm_diagnostics = renorm_nonfinite = r = d = clipped = update_running_stats_ = record_diagnostics_ = None
    return batch_norm_with_stats""")

    def test_norm_activation_subclass_keeps_its_activation(self):
        layer = renormify(nn.Sequential(BatchNormReLU2d(4)), RenormSchedule.constant(2, 1), nonfinite_guard=False)[0]
        self.assertExpectedInline(_code(layer), """\
def forward(self, x):
    running_mean = self.running_mean
    running_var = self.running_var
    weight = self.weight
    bias = self.bias
    num_batches_tracked = self.num_batches_tracked
    renorm_diagnostics = self.renorm_diagnostics
    renorm_nonfinite = self.renorm_nonfinite
    bounds = self._renorm_schedule(num_batches_tracked)
    r_max = bounds[0]
    d_max = bounds[1];  bounds = None
    batch_moments = renorm_fx_functional_batch_moments(x, running_mean, '0', (4,))
    batch_mean = batch_moments[0]
    batch_var = batch_moments[1];  batch_moments = None
    add = batch_var + 1e-05
    sigma_b = torch.sqrt(add);  add = None
    add_1 = running_var + 1e-05
    sigma = torch.sqrt(add_1);  add_1 = None
    truediv = sigma_b / sigma
    sub = batch_mean - running_mean
    truediv_1 = sub / sigma;  sub = None
    truediv_2 = 1 / r_max
    clamp = torch.clamp(truediv, truediv_2, r_max);  truediv_2 = r_max = None
    r = renorm_fx_ops_stop_gradient(clamp);  clamp = None
    neg = -d_max
    clamp_1 = torch.clamp(truediv_1, neg, d_max);  neg = d_max = None
    d = renorm_fx_ops_stop_gradient(clamp_1);  clamp_1 = None
    ne = r != truediv;  truediv = None
    ne_1 = d != truediv_1;  truediv_1 = None
    clipped = ne | ne_1;  ne = ne_1 = None
    batch_norm_with_stats = renorm_fx_functional_batch_norm_with_stats(x, batch_mean, batch_var, weight, bias, r, d, 1e-05);  x = weight = bias = None
    update_running_stats_ = renorm_fx_functional_update_running_stats_(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, sigma_b, sigma, 0.1, 1e-05, 'sigma', None, False);  running_mean = running_var = num_batches_tracked = batch_mean = batch_var = sigma_b = sigma = None
    record_diagnostics_ = renorm_fx_functional_record_diagnostics_(renorm_diagnostics, renorm_nonfinite, r, d, clipped, update_running_stats_);  renorm_diagnostics = renorm_nonfinite = r = d = clipped = update_running_stats_ = record_diagnostics_ = None
    act = self.act(batch_norm_with_stats);  batch_norm_with_stats = None
    return act""")

    def test_virtual_batches(self):
        layer = renormify(nn.Sequential(nn.BatchNorm1d(4)), virtual_batch_size=2, nonfinite_guard=False)[0]
        self.assertExpectedInline(_code(layer), """\
def forward(self, input : torch.Tensor) -> torch.Tensor:
    input_1 = input
    num_batches_tracked = self.num_batches_tracked
    running_mean = self.running_mean
    running_var = self.running_var
    weight = self.weight
    bias = self.bias
    renorm_diagnostics = self.renorm_diagnostics
    renorm_nonfinite = self.renorm_nonfinite
    bounds = self._renorm_schedule(num_batches_tracked)
    r_max = bounds[0]
    d_max = bounds[1];  bounds = None
    groups = renorm_fx_functional_group_batch(input_1, running_mean, '0', (2, 3), 2)
    mean = groups.mean([1, 3], keepdim = True)
    sub = groups - mean;  groups = None
    square = sub.square()
    mean_1 = square.mean([1, 3], keepdim = True);  square = None
    detach = mean.detach()
    detach_1 = mean_1.detach()
    view = running_mean.view((1, 1, -1, 1))
    view_1 = running_var.view((1, 1, -1, 1))
    add = detach_1 + 1e-05;  detach_1 = None
    sigma_b = torch.sqrt(add);  add = None
    add_1 = view_1 + 1e-05;  view_1 = None
    sigma = torch.sqrt(add_1);  add_1 = None
    truediv = sigma_b / sigma
    sub_1 = detach - view;  detach = view = None
    truediv_1 = sub_1 / sigma;  sub_1 = None
    truediv_2 = 1 / r_max
    clamp = torch.clamp(truediv, truediv_2, r_max);  truediv_2 = r_max = None
    r = renorm_fx_ops_stop_gradient(clamp);  clamp = None
    neg = -d_max
    clamp_1 = torch.clamp(truediv_1, neg, d_max);  neg = d_max = None
    d = renorm_fx_ops_stop_gradient(clamp_1);  clamp_1 = None
    ne = r != truediv;  truediv = None
    ne_1 = d != truediv_1;  truediv_1 = None
    clipped = ne | ne_1;  ne = ne_1 = None
    add_2 = mean_1 + 1e-05
    rsqrt = torch.rsqrt(add_2);  add_2 = None
    mul = rsqrt * r;  rsqrt = None
    view_2 = weight.view((1, 1, -1, 1))
    mul_1 = mul * view_2;  mul = view_2 = None
    view_3 = weight.view((1, 1, -1, 1));  weight = None
    mul_2 = d * view_3;  view_3 = None
    view_4 = bias.view((1, 1, -1, 1));  bias = None
    add_3 = mul_2 + view_4;  mul_2 = view_4 = None
    mul_3 = sub * mul_1;  sub = mul_1 = None
    add_4 = mul_3 + add_3;  mul_3 = add_3 = None
    getattr_1 = input_1.shape
    reshape = add_4.reshape(getattr_1);  add_4 = getattr_1 = None
    getattr_2 = input_1.dtype;  input_1 = None
    to = reshape.to(getattr_2);  reshape = getattr_2 = None
    detach_2 = mean.detach();  mean = None
    mean_2 = detach_2.mean([0, 1, 3]);  detach_2 = None
    batch_mean = mean_2.flatten();  mean_2 = None
    detach_3 = mean_1.detach();  mean_1 = None
    mean_3 = detach_3.mean([0, 1, 3]);  detach_3 = None
    batch_var = mean_3.flatten();  mean_3 = None
    mean_4 = sigma_b.mean([0, 1, 3]);  sigma_b = None
    sigma_b_1 = mean_4.flatten();  mean_4 = None
    flatten_3 = sigma.flatten();  sigma = None
    update_running_stats_ = renorm_fx_functional_update_running_stats_(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, sigma_b_1, flatten_3, 0.1, 1e-05, 'sigma', None, False);  running_mean = running_var = num_batches_tracked = batch_mean = batch_var = sigma_b_1 = flatten_3 = None
    mean_5 = r.mean([0, 1, 3])
    flatten_4 = mean_5.flatten();  mean_5 = None
    mean_6 = d.mean([0, 1, 3]);  d = None
    flatten_5 = mean_6.flatten();  mean_6 = None
    getattr_3 = r.dtype;  r = None
    to_1 = clipped.to(getattr_3);  clipped = getattr_3 = None
    mean_7 = to_1.mean([0, 1, 3]);  to_1 = None
    flatten_6 = mean_7.flatten();  mean_7 = None
    record_diagnostics_ = renorm_fx_functional_record_diagnostics_(renorm_diagnostics, renorm_nonfinite, flatten_4, flatten_5, flatten_6, update_running_stats_);  renorm_diagnostics = renorm_nonfinite = flatten_4 = flatten_5 = flatten_6 = update_running_stats_ = record_diagnostics_ = None
    return to""")

    def test_functional_batch_norm(self):
        self.assertExpectedInline(_code(renormify(models.FunctionalBN())), """\
def forward(self, x):
    running_mean = self.running_mean
    running_var = self.running_var
    weight = self.weight
    bias = self.bias
    renorm_step = self.renorm_step
    renorm_diagnostics = self.renorm_diagnostics
    renorm_nonfinite = self.renorm_nonfinite
    bounds = self._renorm_schedule(renorm_step)
    r_max = bounds[0]
    d_max = bounds[1];  bounds = None
    batch_moments = renorm_fx_functional_batch_moments(x, running_mean, 'FunctionalBN', ())
    batch_mean = batch_moments[0]
    batch_var = batch_moments[1];  batch_moments = None
    add = batch_var + 1e-05
    sigma_b = torch.sqrt(add);  add = None
    add_1 = running_var + 1e-05
    sigma = torch.sqrt(add_1);  add_1 = None
    truediv = sigma_b / sigma
    sub = batch_mean - running_mean
    truediv_1 = sub / sigma;  sub = None
    truediv_2 = 1 / r_max
    clamp = torch.clamp(truediv, truediv_2, r_max);  truediv_2 = r_max = None
    r = renorm_fx_ops_stop_gradient(clamp);  clamp = None
    neg = -d_max
    clamp_1 = torch.clamp(truediv_1, neg, d_max);  neg = d_max = None
    d = renorm_fx_ops_stop_gradient(clamp_1);  clamp_1 = None
    ne = r != truediv;  truediv = None
    ne_1 = d != truediv_1;  truediv_1 = None
    clipped = ne | ne_1;  ne = ne_1 = None
    batch_norm_with_stats = renorm_fx_functional_batch_norm_with_stats(x, batch_mean, batch_var, weight, bias, r, d, 1e-05);  x = weight = bias = None
    update_running_stats_ = renorm_fx_functional_update_running_stats_(running_mean, running_var, renorm_step, batch_mean, batch_var, sigma_b, sigma, 0.1, 1e-05, 'sigma', None, True);  running_mean = running_var = renorm_step = batch_mean = batch_var = sigma_b = sigma = None
    record_diagnostics_ = renorm_fx_functional_record_diagnostics_(renorm_diagnostics, renorm_nonfinite, r, d, clipped, update_running_stats_);  renorm_diagnostics = renorm_nonfinite = r = d = clipped = update_running_stats_ = record_diagnostics_ = None
    return batch_norm_with_stats""")


if __name__ == "__main__":
    expecttest.run_tests()
