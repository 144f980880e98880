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
    reciprocal = r_max.reciprocal()
    clamp = torch.clamp(truediv, reciprocal, r_max);  reciprocal = r_max = None
    r = renorm_fx_ops_stop_gradient(clamp);  clamp = None
    neg = -d_max
    clamp_1 = torch.clamp(truediv_1, neg, d_max);  neg = d_max = None
    d = renorm_fx_ops_stop_gradient(clamp_1);  clamp_1 = None
    ne = r != truediv;  truediv = None
    ne_1 = d != truediv_1;  truediv_1 = None
    clipped = ne | ne_1;  ne = ne_1 = None
    scale = weight * r
    mul_1 = weight * d;  weight = None
    shift = mul_1 + bias;  mul_1 = bias = None
    batch_norm_with_stats = renorm_fx_functional_batch_norm_with_stats(input_1, batch_mean, batch_var, scale, shift, 1e-05);  input_1 = scale = shift = None
    mul_2 = running_mean * 0.9
    mul_3 = batch_mean * 0.1
    add_3 = mul_2 + mul_3;  mul_2 = mul_3 = None
    mul_4 = sigma * 0.9;  sigma = None
    mul_5 = sigma_b * 0.1;  sigma_b = None
    add_4 = mul_4 + mul_5;  mul_4 = mul_5 = None
    mul_6 = add_4 * add_4;  add_4 = None
    sub_1 = mul_6 - 1e-05;  mul_6 = None
    clamp_min = torch.clamp_min(sub_1, 0.0);  sub_1 = None
    isfinite = torch.isfinite(batch_mean);  batch_mean = None
    all_1 = isfinite.all();  isfinite = None
    isfinite_1 = torch.isfinite(batch_var);  batch_var = None
    all_2 = isfinite_1.all();  isfinite_1 = None
    finite = all_1 & all_2;  all_1 = all_2 = None
    where = torch.where(finite, add_3, running_mean);  add_3 = None
    copy_ = running_mean.copy_(where);  running_mean = where = copy_ = None
    where_1 = torch.where(finite, clamp_min, running_var);  clamp_min = None
    copy__1 = running_var.copy_(where_1);  running_var = where_1 = copy__1 = None
    add__1 = num_batches_tracked.add_(finite);  num_batches_tracked = add__1 = None
    getattr_1 = r.dtype
    to = clipped.to(getattr_1);  clipped = getattr_1 = None
    stack = torch.stack([r, d, to]);  r = d = to = None
    where_2 = torch.where(finite, stack, renorm_diagnostics);  stack = None
    copy__2 = renorm_diagnostics.copy_(where_2);  renorm_diagnostics = where_2 = copy__2 = None
    invert = ~finite;  finite = None
    add__2 = renorm_nonfinite.add_(invert);  renorm_nonfinite = invert = add__2 = None
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
    renorm_nonfinite = self.renorm_nonfinite;  renorm_nonfinite = None
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
    reciprocal = r_max.reciprocal()
    clamp = torch.clamp(truediv, reciprocal, r_max);  reciprocal = r_max = None
    r = renorm_fx_ops_stop_gradient(clamp);  clamp = None
    neg = -d_max
    clamp_1 = torch.clamp(truediv_1, neg, d_max);  neg = d_max = None
    d = renorm_fx_ops_stop_gradient(clamp_1);  clamp_1 = None
    ne = r != truediv;  truediv = None
    ne_1 = d != truediv_1;  truediv_1 = None
    clipped = ne | ne_1;  ne = ne_1 = None
    scale = weight * r
    mul_1 = weight * d;  weight = None
    shift = mul_1 + bias;  mul_1 = bias = None
    batch_norm_with_stats = renorm_fx_functional_batch_norm_with_stats(x, batch_mean, batch_var, scale, shift, 1e-05);  x = batch_var = scale = shift = None
    mul_2 = running_mean * 0.9
    mul_3 = batch_mean * 0.1;  batch_mean = None
    add_3 = mul_2 + mul_3;  mul_2 = mul_3 = None
    mul_4 = sigma * 0.9;  sigma = None
    mul_5 = sigma_b * 0.1;  sigma_b = None
    add_4 = mul_4 + mul_5;  mul_4 = mul_5 = None
    mul_6 = add_4 * add_4;  add_4 = None
    sub_1 = mul_6 - 1e-05;  mul_6 = None
    clamp_min = torch.clamp_min(sub_1, 0.0);  sub_1 = None
    copy_ = running_mean.copy_(add_3);  running_mean = add_3 = copy_ = None
    copy__1 = running_var.copy_(clamp_min);  running_var = clamp_min = copy__1 = None
    add_ = num_batches_tracked.add_(1);  num_batches_tracked = add_ = None
    getattr_1 = r.dtype
    to = clipped.to(getattr_1);  clipped = getattr_1 = None
    stack = torch.stack([r, d, to]);  r = d = to = None
    copy__2 = renorm_diagnostics.copy_(stack);  renorm_diagnostics = stack = copy__2 = None
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
    renorm_nonfinite = self.renorm_nonfinite;  renorm_nonfinite = None
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
    reciprocal = r_max.reciprocal()
    clamp = torch.clamp(truediv, reciprocal, r_max);  reciprocal = r_max = None
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
    batch_var = mean_3.flatten();  mean_3 = batch_var = None
    mean_4 = sigma_b.mean([0, 1, 3]);  sigma_b = None
    sigma_b_1 = mean_4.flatten();  mean_4 = None
    flatten_3 = sigma.flatten();  sigma = None
    mul_4 = running_mean * 0.9
    mul_5 = batch_mean * 0.1;  batch_mean = None
    add_5 = mul_4 + mul_5;  mul_4 = mul_5 = None
    mul_6 = flatten_3 * 0.9;  flatten_3 = None
    mul_7 = sigma_b_1 * 0.1;  sigma_b_1 = None
    add_6 = mul_6 + mul_7;  mul_6 = mul_7 = None
    mul_8 = add_6 * add_6;  add_6 = None
    sub_2 = mul_8 - 1e-05;  mul_8 = None
    clamp_min = torch.clamp_min(sub_2, 0.0);  sub_2 = None
    copy_ = running_mean.copy_(add_5);  running_mean = add_5 = copy_ = None
    copy__1 = running_var.copy_(clamp_min);  running_var = clamp_min = copy__1 = None
    add__1 = num_batches_tracked.add_(1);  num_batches_tracked = add__1 = None
    mean_5 = r.mean([0, 1, 3])
    flatten_4 = mean_5.flatten();  mean_5 = None
    mean_6 = d.mean([0, 1, 3]);  d = None
    flatten_5 = mean_6.flatten();  mean_6 = None
    getattr_3 = r.dtype;  r = None
    to_1 = clipped.to(getattr_3);  clipped = getattr_3 = None
    mean_7 = to_1.mean([0, 1, 3]);  to_1 = None
    flatten_6 = mean_7.flatten();  mean_7 = None
    getattr_4 = flatten_4.dtype
    to_2 = flatten_6.to(getattr_4);  flatten_6 = getattr_4 = None
    stack = torch.stack([flatten_4, flatten_5, to_2]);  flatten_4 = flatten_5 = to_2 = None
    copy__2 = renorm_diagnostics.copy_(stack);  renorm_diagnostics = stack = copy__2 = None
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
    reciprocal = r_max.reciprocal()
    clamp = torch.clamp(truediv, reciprocal, r_max);  reciprocal = r_max = None
    r = renorm_fx_ops_stop_gradient(clamp);  clamp = None
    neg = -d_max
    clamp_1 = torch.clamp(truediv_1, neg, d_max);  neg = d_max = None
    d = renorm_fx_ops_stop_gradient(clamp_1);  clamp_1 = None
    ne = r != truediv;  truediv = None
    ne_1 = d != truediv_1;  truediv_1 = None
    clipped = ne | ne_1;  ne = ne_1 = None
    scale = weight * r
    mul_1 = weight * d;  weight = None
    shift = mul_1 + bias;  mul_1 = bias = None
    batch_norm_with_stats = renorm_fx_functional_batch_norm_with_stats(x, batch_mean, batch_var, scale, shift, 1e-05);  x = scale = shift = None
    mul_2 = running_mean * 0.9
    mul_3 = batch_mean * 0.1
    add_3 = mul_2 + mul_3;  mul_2 = mul_3 = None
    mul_4 = sigma * 0.9;  sigma = None
    mul_5 = sigma_b * 0.1;  sigma_b = None
    add_4 = mul_4 + mul_5;  mul_4 = mul_5 = None
    mul_6 = add_4 * add_4;  add_4 = None
    sub_1 = mul_6 - 1e-05;  mul_6 = None
    clamp_min = torch.clamp_min(sub_1, 0.0);  sub_1 = None
    isfinite = torch.isfinite(batch_mean);  batch_mean = None
    all_1 = isfinite.all();  isfinite = None
    isfinite_1 = torch.isfinite(batch_var);  batch_var = None
    all_2 = isfinite_1.all();  isfinite_1 = None
    finite = all_1 & all_2;  all_1 = all_2 = None
    where = torch.where(finite, add_3, running_mean);  add_3 = None
    copy_ = running_mean.copy_(where);  running_mean = where = copy_ = None
    where_1 = torch.where(finite, clamp_min, running_var);  clamp_min = None
    copy__1 = running_var.copy_(where_1);  running_var = where_1 = copy__1 = None
    add_ = renorm_step.add_(finite);  renorm_step = add_ = None
    getattr_1 = r.dtype
    to = clipped.to(getattr_1);  clipped = getattr_1 = None
    stack = torch.stack([r, d, to]);  r = d = to = None
    where_2 = torch.where(finite, stack, renorm_diagnostics);  stack = None
    copy__2 = renorm_diagnostics.copy_(where_2);  renorm_diagnostics = where_2 = copy__2 = None
    invert = ~finite;  finite = None
    add__1 = renorm_nonfinite.add_(invert);  renorm_nonfinite = invert = add__1 = None
    return batch_norm_with_stats""")


if __name__ == "__main__":
    expecttest.run_tests()
