"""Golden graphs: what the pass emits, visible in review.

Regenerate after an intended change with ``EXPECTTEST_ACCEPT=1 pytest tests/test_golden.py``.
"""

import expecttest
import torch.nn.functional as F
from torch import nn

import models
from renorm_fx import renormify


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _code(gm) -> str:
    return gm.code.strip()


class TestGolden(expecttest.TestCase):
    def test_conv_net(self):
        self.assertExpectedInline(_code(renormify(ConvNet())), """\
def forward(self, x):
    conv = self.conv(x);  x = None
    bn_weight = self.bn.weight
    bn_bias = self.bn.bias
    bn_running_mean = self.bn.running_mean
    bn_running_var = self.bn.running_var
    bn_num_batches_tracked = self.bn.num_batches_tracked
    bn_renorm_diagnostics = self.bn_renorm_diagnostics
    bn_renorm_nonfinite = self.bn_renorm_nonfinite
    bn_renorm_schedule = self.renorm_schedule(bn_num_batches_tracked)
    bn_r_max = bn_renorm_schedule[0]
    bn_d_max = bn_renorm_schedule[1];  bn_renorm_schedule = None
    bn_batch_moments = renorm_fx_functional_batch_moments(conv, bn_running_mean, 'bn', (4,))
    bn_batch_mean = bn_batch_moments[0]
    bn_batch_var = bn_batch_moments[1];  bn_batch_moments = None
    bn_add = bn_batch_var + 1e-05
    bn_sigma_b = torch.sqrt(bn_add);  bn_add = None
    bn_add_1 = bn_running_var + 1e-05
    bn_sigma = torch.sqrt(bn_add_1);  bn_add_1 = None
    bn_truediv = bn_sigma_b / bn_sigma
    bn_sub = bn_batch_mean - bn_running_mean
    bn_truediv_1 = bn_sub / bn_sigma;  bn_sub = None
    bn_reciprocal = bn_r_max.reciprocal()
    bn_clamp = torch.clamp(bn_truediv, bn_reciprocal, bn_r_max);  bn_reciprocal = bn_r_max = None
    bn_r = renorm_fx_ops_stop_gradient(bn_clamp);  bn_clamp = None
    bn_neg = -bn_d_max
    bn_clamp_1 = torch.clamp(bn_truediv_1, bn_neg, bn_d_max);  bn_neg = bn_d_max = None
    bn_d = renorm_fx_ops_stop_gradient(bn_clamp_1);  bn_clamp_1 = None
    bn_ne = bn_r != bn_truediv;  bn_truediv = None
    bn_ne_1 = bn_d != bn_truediv_1;  bn_truediv_1 = None
    bn_clipped = bn_ne | bn_ne_1;  bn_ne = bn_ne_1 = None
    bn_scale = bn_weight * bn_r
    bn_mul = bn_weight * bn_d;  bn_weight = None
    bn_shift = bn_mul + bn_bias;  bn_mul = bn_bias = None
    bn_batch_norm_with_stats = renorm_fx_functional_batch_norm_with_stats(conv, bn_batch_mean, bn_batch_var, bn_scale, bn_shift, 1e-05);  conv = bn_scale = bn_shift = None
    bn_mul_1 = bn_running_mean * 0.9
    bn_mul_2 = bn_batch_mean * 0.1
    bn_add_2 = bn_mul_1 + bn_mul_2;  bn_mul_1 = bn_mul_2 = None
    bn_mul_3 = bn_sigma * 0.9;  bn_sigma = None
    bn_mul_4 = bn_sigma_b * 0.1;  bn_sigma_b = None
    bn_add_3 = bn_mul_3 + bn_mul_4;  bn_mul_3 = bn_mul_4 = None
    bn_mul_5 = bn_add_3 * bn_add_3;  bn_add_3 = None
    bn_sub_1 = bn_mul_5 - 1e-05;  bn_mul_5 = None
    bn_clamp_min = torch.clamp_min(bn_sub_1, 0.0);  bn_sub_1 = None
    bn_isfinite = torch.isfinite(bn_batch_mean);  bn_batch_mean = None
    bn_all = bn_isfinite.all();  bn_isfinite = None
    bn_isfinite_1 = torch.isfinite(bn_batch_var);  bn_batch_var = None
    bn_all_1 = bn_isfinite_1.all();  bn_isfinite_1 = None
    bn_finite = bn_all & bn_all_1;  bn_all = bn_all_1 = None
    bn_where = torch.where(bn_finite, bn_add_2, bn_running_mean);  bn_add_2 = None
    bn_copy_ = bn_running_mean.copy_(bn_where);  bn_running_mean = bn_where = bn_copy_ = None
    bn_where_1 = torch.where(bn_finite, bn_clamp_min, bn_running_var);  bn_clamp_min = None
    bn_copy__1 = bn_running_var.copy_(bn_where_1);  bn_running_var = bn_where_1 = bn_copy__1 = None
    bn_add_ = bn_num_batches_tracked.add_(bn_finite);  bn_num_batches_tracked = bn_add_ = None
    bn_getattr = bn_r.dtype
    bn_to = bn_clipped.to(bn_getattr);  bn_clipped = bn_getattr = None
    bn_stack = torch.stack([bn_r, bn_d, bn_to]);  bn_r = bn_d = bn_to = None
    bn_where_2 = torch.where(bn_finite, bn_stack, bn_renorm_diagnostics);  bn_stack = None
    bn_copy__2 = bn_renorm_diagnostics.copy_(bn_where_2);  bn_renorm_diagnostics = bn_where_2 = bn_copy__2 = None
    bn_invert = ~bn_finite;  bn_finite = None
    bn_add__1 = bn_renorm_nonfinite.add_(bn_invert);  bn_renorm_nonfinite = bn_invert = bn_add__1 = None
    relu = torch.nn.functional.relu(bn_batch_norm_with_stats, inplace = False);  bn_batch_norm_with_stats = None
    return relu""")

    def test_conv_net_eval(self):
        self.assertExpectedInline(renormify(ConvNet()).eval_code.strip(), """\
def forward(self, x):
    conv = self.conv(x);  x = None
    bn = self.bn(conv);  conv = None
    relu = torch.nn.functional.relu(bn, inplace = False);  bn = None
    return relu""")

    def test_functional_batch_norm(self):
        self.assertExpectedInline(_code(renormify(models.FunctionalBN())), """\
def forward(self, x):
    weight = self.weight
    bias = self.bias
    running_mean = self.running_mean
    running_var = self.running_var
    batch_norm_renorm_step = self.batch_norm_renorm_step
    batch_norm_renorm_diagnostics = self.batch_norm_renorm_diagnostics
    batch_norm_renorm_nonfinite = self.batch_norm_renorm_nonfinite
    batch_norm_renorm_schedule = self.renorm_schedule(batch_norm_renorm_step)
    batch_norm_r_max = batch_norm_renorm_schedule[0]
    batch_norm_d_max = batch_norm_renorm_schedule[1];  batch_norm_renorm_schedule = None
    batch_norm_batch_moments = renorm_fx_functional_batch_moments(x, running_mean, 'batch_norm', ())
    batch_norm_batch_mean = batch_norm_batch_moments[0]
    batch_norm_batch_var = batch_norm_batch_moments[1];  batch_norm_batch_moments = None
    batch_norm_add = batch_norm_batch_var + 1e-05
    batch_norm_sigma_b = torch.sqrt(batch_norm_add);  batch_norm_add = None
    batch_norm_add_1 = running_var + 1e-05
    batch_norm_sigma = torch.sqrt(batch_norm_add_1);  batch_norm_add_1 = None
    batch_norm_truediv = batch_norm_sigma_b / batch_norm_sigma
    batch_norm_sub = batch_norm_batch_mean - running_mean
    batch_norm_truediv_1 = batch_norm_sub / batch_norm_sigma;  batch_norm_sub = None
    batch_norm_reciprocal = batch_norm_r_max.reciprocal()
    batch_norm_clamp = torch.clamp(batch_norm_truediv, batch_norm_reciprocal, batch_norm_r_max);  batch_norm_reciprocal = batch_norm_r_max = None
    batch_norm_r = renorm_fx_ops_stop_gradient(batch_norm_clamp);  batch_norm_clamp = None
    batch_norm_neg = -batch_norm_d_max
    batch_norm_clamp_1 = torch.clamp(batch_norm_truediv_1, batch_norm_neg, batch_norm_d_max);  batch_norm_neg = batch_norm_d_max = None
    batch_norm_d = renorm_fx_ops_stop_gradient(batch_norm_clamp_1);  batch_norm_clamp_1 = None
    batch_norm_ne = batch_norm_r != batch_norm_truediv;  batch_norm_truediv = None
    batch_norm_ne_1 = batch_norm_d != batch_norm_truediv_1;  batch_norm_truediv_1 = None
    batch_norm_clipped = batch_norm_ne | batch_norm_ne_1;  batch_norm_ne = batch_norm_ne_1 = None
    batch_norm_scale = weight * batch_norm_r
    batch_norm_mul = weight * batch_norm_d;  weight = None
    batch_norm_shift = batch_norm_mul + bias;  batch_norm_mul = bias = None
    batch_norm_with_stats = renorm_fx_functional_batch_norm_with_stats(x, batch_norm_batch_mean, batch_norm_batch_var, batch_norm_scale, batch_norm_shift, 1e-05);  x = batch_norm_scale = batch_norm_shift = None
    batch_norm_mul_1 = running_mean * 0.9
    batch_norm_mul_2 = batch_norm_batch_mean * 0.1
    batch_norm_add_2 = batch_norm_mul_1 + batch_norm_mul_2;  batch_norm_mul_1 = batch_norm_mul_2 = None
    batch_norm_mul_3 = batch_norm_sigma * 0.9;  batch_norm_sigma = None
    batch_norm_mul_4 = batch_norm_sigma_b * 0.1;  batch_norm_sigma_b = None
    batch_norm_add_3 = batch_norm_mul_3 + batch_norm_mul_4;  batch_norm_mul_3 = batch_norm_mul_4 = None
    batch_norm_mul_5 = batch_norm_add_3 * batch_norm_add_3;  batch_norm_add_3 = None
    batch_norm_sub_1 = batch_norm_mul_5 - 1e-05;  batch_norm_mul_5 = None
    batch_norm_clamp_min = torch.clamp_min(batch_norm_sub_1, 0.0);  batch_norm_sub_1 = None
    batch_norm_isfinite = torch.isfinite(batch_norm_batch_mean);  batch_norm_batch_mean = None
    batch_norm_all = batch_norm_isfinite.all();  batch_norm_isfinite = None
    batch_norm_isfinite_1 = torch.isfinite(batch_norm_batch_var);  batch_norm_batch_var = None
    batch_norm_all_1 = batch_norm_isfinite_1.all();  batch_norm_isfinite_1 = None
    batch_norm_finite = batch_norm_all & batch_norm_all_1;  batch_norm_all = batch_norm_all_1 = None
    batch_norm_where = torch.where(batch_norm_finite, batch_norm_add_2, running_mean);  batch_norm_add_2 = None
    batch_norm_copy_ = running_mean.copy_(batch_norm_where);  running_mean = batch_norm_where = batch_norm_copy_ = None
    batch_norm_where_1 = torch.where(batch_norm_finite, batch_norm_clamp_min, running_var);  batch_norm_clamp_min = None
    batch_norm_copy__1 = running_var.copy_(batch_norm_where_1);  running_var = batch_norm_where_1 = batch_norm_copy__1 = None
    batch_norm_add_ = batch_norm_renorm_step.add_(batch_norm_finite);  batch_norm_renorm_step = batch_norm_add_ = None
    batch_norm_getattr = batch_norm_r.dtype
    batch_norm_to = batch_norm_clipped.to(batch_norm_getattr);  batch_norm_clipped = batch_norm_getattr = None
    batch_norm_stack = torch.stack([batch_norm_r, batch_norm_d, batch_norm_to]);  batch_norm_r = batch_norm_d = batch_norm_to = None
    batch_norm_where_2 = torch.where(batch_norm_finite, batch_norm_stack, batch_norm_renorm_diagnostics);  batch_norm_stack = None
    batch_norm_copy__2 = batch_norm_renorm_diagnostics.copy_(batch_norm_where_2);  batch_norm_renorm_diagnostics = batch_norm_where_2 = batch_norm_copy__2 = None
    batch_norm_invert = ~batch_norm_finite;  batch_norm_finite = None
    batch_norm_add__1 = batch_norm_renorm_nonfinite.add_(batch_norm_invert);  batch_norm_renorm_nonfinite = batch_norm_invert = batch_norm_add__1 = None
    return batch_norm_with_stats""")
