"""torch.compile: compiled renorm equals eager renorm, compiles once, fuses like batchnorm.

Compiling is slow here (seconds per graph): each compiled model is built once per module.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import models
import renorm_fx
from renorm_fx import RenormCompileError, RenormSchedule, renormify

# warm-up, ramp and plateau within the test's steps: the bounds change every step
SCHEDULE = RenormSchedule.paper(r_max=2.0, d_max=1.0, warmup=1, r_max_at=5, d_max_at=4)
STEPS = 6


def _train(model, params_of, seed=1):
    """STEPS optimizer steps; per step the output and every gradient, then the final buffers."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params_of.parameters(), lr=0.05)
    trace = []
    for _ in range(STEPS):
        x = torch.randn(6, 3, 8, 8, generator=g)
        opt.zero_grad()
        y = model(x)
        ((y - 1) ** 2).mean().backward()
        trace.append((y.detach(), {n: p.grad.clone() for n, p in params_of.named_parameters()}))
        opt.step()
    return trace, {k: v.clone() for k, v in params_of.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    base = models.scramble_stats(models.SmallCNN())  # r and d clip on some channels
    eager = renormify(base, SCHEDULE)
    run = _train(eager, eager)
    clipped = [d.clipped_fraction for d in renorm_fx.diagnostics(eager).values()]
    assert max(clipped) > 0  # the clip is active: r and d are not batchnorm's 1 and 0
    return base, run


def _assert_same_run(got, want):
    (trace, state), (trace_ref, state_ref) = got, want
    for (y, grads), (y_ref, grads_ref) in zip(trace, trace_ref):
        models.assert_scaled_close(y, y_ref, 1e-4, "output")
        scale = max(g.abs().max().item() for g in grads_ref.values())
        for name, grad in grads.items():
            models.assert_scaled_close(grad, grads_ref[name], 1e-4 * max(1.0, scale), name)
    for key, value in state.items():
        if value.is_floating_point():
            models.assert_scaled_close(value, state_ref[key], 1e-4, key)
        else:
            assert torch.equal(value, state_ref[key]), key


def test_compiled_renormify_equals_eager_and_compiles_once(reference):
    base, want = reference
    model = renormify(base, SCHEDULE)
    before = counters["stats"]["unique_graphs"]
    got = _train(torch.compile(model), model)
    assert counters["stats"]["unique_graphs"] - before == 1  # bounds changed every step
    _assert_same_run(got, want)


def test_renorm_backend_equals_eager_and_compiles_once(reference):
    base, want = reference
    model = copy.deepcopy(base)
    before = counters["stats"]["unique_graphs"]
    compiled = torch.compile(model, backend="renorm", options={"schedule": SCHEDULE})
    got = _train(compiled, model)
    assert counters["stats"]["unique_graphs"] - before == 1
    _assert_same_run(got, want)
    # the user's own batchnorm modules hold the state, in batchnorm's format
    assert int(model.bn.num_batches_tracked) == STEPS


def _kernel_counts(module, shape):
    x = torch.randn(shape, requires_grad=True)
    compiled = torch.compile(module)
    _, codes = run_and_get_code(lambda: compiled(x).backward(torch.randn(shape)))
    return [code.count("async_compile.cpp_pybinding(") for code in codes]


def test_fuses_like_batchnorm():
    """One fused C++ kernel forward, one backward: the same as compiled batchnorm."""
    shape = (4, 8, 6, 6)
    bn_counts = _kernel_counts(nn.BatchNorm2d(8), shape)
    renorm_counts = _kernel_counts(renormify(nn.Sequential(nn.BatchNorm2d(8)), SCHEDULE), shape)
    assert bn_counts == [1, 1]
    assert renorm_counts == bn_counts


def test_dynamic_batch_size_does_not_recompile_per_size():
    model = renormify(models.MLP(), SCHEDULE)
    compiled = torch.compile(model)
    before = counters["stats"]["unique_graphs"]
    for n in (4, 6, 8, 10, 12):
        compiled(torch.randn(n, 7)).sum().backward()
    # one static graph, then one with a dynamic batch dimension (Dynamo's automatic dynamic)
    assert counters["stats"]["unique_graphs"] - before <= 2


class _BreaksInsideTheLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        self.bn.num_batches_tracked.add_(1)
        y = self.lin(x)
        torch._dynamo.graph_break()  # the step and the statistics land in different graphs
        return F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                            True, 0.1, 1e-5)


def test_clear_error_from_the_backend():
    """A graph break inside a layer hides its step from the pass: say so, never run it as batchnorm."""
    with pytest.raises(Exception, match=r"(?s)RenormCompileError: torch.compile.backend=.renorm..: layer .bn.: its num_batches_tracked.*broke the graph"):
        torch.compile(_BreaksInsideTheLayer(), backend="renorm")(torch.randn(4, 3))
    assert issubclass(RenormCompileError, RuntimeError)


def test_registered_by_import_and_entry_point():
    assert "renorm" in torch._dynamo.list_backends()
    # without importing renorm_fx: Dynamo finds the backend through the package's entry point
    code = ("from torch._dynamo.backends.registry import lookup_backend; "
            "import sys; assert 'renorm_fx' not in sys.modules; "
            "print(lookup_backend('renorm').__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=""), cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "renorm_fx.backend"
    assert renorm_fx.backend.renorm_backend.__module__ == "renorm_fx.backend"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (Triton) kernels need a GPU")
def test_cuda_compiled_equals_eager_and_fuses_like_batchnorm():
    torch.manual_seed(0)
    base = models.scramble_stats(models.SmallCNN()).cuda()
    eager, compiled_src = renormify(base, SCHEDULE), renormify(base, SCHEDULE)
    compiled = torch.compile(compiled_src)
    for _ in range(3):
        x = torch.randn(6, 3, 8, 8, device="cuda")
        y, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y, rtol=1e-4, atol=1e-4)
        g = torch.autograd.grad(y.square().sum(), list(eager.parameters()))
        g_c = torch.autograd.grad(y_c.square().sum(), list(compiled_src.parameters()))
        for a, b in zip(g_c, g):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)

    def triton_kernels(module):
        c = torch.compile(module)
        _, codes = run_and_get_code(lambda: c(x).backward(torch.ones_like(x)))
        return [code.count("@triton.jit") for code in codes]

    bn = triton_kernels(nn.BatchNorm2d(8).cuda())
    assert triton_kernels(renormify(nn.Sequential(nn.BatchNorm2d(8)).cuda(), SCHEDULE)) == bn
