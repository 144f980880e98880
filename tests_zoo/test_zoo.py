"""Model zoo: renormify on real torchvision and timm architectures (random init, no downloads).

Per architecture, in float64 on small inputs:

a) ``RenormSchedule.constant(1, 0)`` is batchnorm: one training forward + backward equals the
   original model's (outputs, every parameter gradient, the running statistics after it);
   renormify warns about nothing and converts every batch-norm with running statistics.
b) eval and checkpoints: after two clipped training steps, the original class loads the
   renormified model's ``state_dict`` (strict) and gives the same eval output; keys and
   ``_metadata`` are the original's; the checkpoint loads back into a renormified model.
c) ``fold(rn.eval())`` equals ``rn.eval()``; what remains of the normalizations is counted and
   printed (table at the end of the session, see conftest.py).
d) once, on the smallest model: ``torch.compile(rn)`` trained two SGD steps with the clip
   active equals eager renorm (float64: see COMPILE_DTYPE).

Run with ``bash scripts/test_zoo.sh`` (the ``.venv-zoo`` environment).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

torchvision = pytest.importorskip("torchvision", reason="the zoo suite runs in .venv-zoo (scripts/test_zoo.sh)")
timm = pytest.importorskip("timm", reason="the zoo suite runs in .venv-zoo (scripts/test_zoo.sh)")

from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.models.segmentation import lraspp_mobilenet_v3_large  # noqa: E402

from renorm_fx import RenormSchedule, RenormTraceError, bounds, diagnostics, fold, renormify  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from models import scramble_stats  # noqa: E402  (the main suite's: running statistics far from any batch's)
from renorm_fx.deploy import ScaleShift  # noqa: E402

ID = RenormSchedule.constant(1, 0)  # exactly batchnorm
CLIP = RenormSchedule.constant(1.5, 0.5)
TOL64 = 1e-9  # float64: of each tensor's scale


@dataclasses.dataclass(frozen=True)
class Arch:
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]  # the input: batch 4, the smallest resolution that keeps the net sensible
    what: str


ZOO: dict[str, Arch] = {
    # torchvision classification
    "resnet18": Arch(lambda: torchvision.models.resnet18(weights=None), (4, 3, 32, 32), "torchvision"),
    "mobilenet_v3_small": Arch(lambda: torchvision.models.mobilenet_v3_small(weights=None), (4, 3, 32, 32),
                               "torchvision: SE blocks, hardswish, dropout"),
    "mnasnet0_5": Arch(lambda: torchvision.models.mnasnet0_5(weights=None), (4, 3, 32, 32),
                       "torchvision: versions its state_dict (_load_from_state_dict)"),
    "efficientnet_b0": Arch(lambda: torchvision.models.efficientnet_b0(weights=None), (4, 3, 32, 32),
                            "torchvision: stochastic depth, dropout"),
    "shufflenet_v2_x0_5": Arch(lambda: torchvision.models.shufflenet_v2_x0_5(weights=None), (4, 3, 32, 32),
                               "torchvision: channel shuffle"),
    # torchvision detection backbone (BatchNorm2d instead of the default FrozenBatchNorm2d)
    "resnet18_fpn": Arch(lambda: resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                                     norm_layer=nn.BatchNorm2d, trainable_layers=5),
                         (4, 3, 64, 64), "torchvision detection backbone: dict of feature maps"),
    # torchvision segmentation
    "lraspp_mobilenet_v3_large": Arch(lambda: lraspp_mobilenet_v3_large(weights=None, weights_backbone=None),
                                      (4, 3, 64, 64), "torchvision segmentation: dilated backbone, dict output"),
    # timm
    "timm_mobilenetv3_small_050": Arch(lambda: timm.create_model("mobilenetv3_small_050", pretrained=False),
                                       (4, 3, 32, 32), "timm: BatchNormAct2d (norm + act subclass)"),
    "timm_efficientnet_b0": Arch(lambda: timm.create_model("efficientnet_b0", pretrained=False),
                                 (4, 3, 32, 32), "timm: BatchNormAct2d"),
    "timm_repvgg_a0": Arch(lambda: timm.create_model("repvgg_a0", pretrained=False), (4, 3, 32, 32),
                           "timm: re-parameterizable, batch-norms in parallel branches"),
    "timm_mobileone_s0": Arch(lambda: timm.create_model("mobileone_s0", pretrained=False), (4, 3, 32, 32),
                              "timm: re-parameterizable, 4 parallel conv-bn branches per block"),
    "timm_levit_128s": Arch(lambda: timm.create_model("levit_128s", pretrained=False, img_size=64),
                            (4, 3, 64, 64), "timm: vision transformer, BatchNorm1d on tokens"),
}
NAMES = list(ZOO)


# ---- helpers -------------------------------------------------------------------------------

def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, msg: str = "",
                        scale: float | None = None) -> float:
    """``max|actual - expected| <= tol * max(1, scale)``, ``scale`` by default ``max|expected|``:
    rounding relative to the tensor's scale (sums such as weight gradients cancel, so an
    elementwise relative error is meaningless there). Returns the error in units of the scale."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    if not expected.numel():
        return 0.0
    scale = max(1.0, expected.abs().max().item() if scale is None else scale)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{msg}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"
    return err / scale


def build(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The architecture with a fixed random initialization, in training mode."""
    torch.manual_seed(0)
    return ZOO[name].make().to(dtype).train()


def batch(name: str, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # drawn in float64: the same values whatever the dtype
    return torch.randn(ZOO[name].shape, generator=g, dtype=torch.float64).to(dtype)


def batch_norms(model: nn.Module) -> list[str]:
    """The batch-norm modules renormify should convert: those with running statistics."""
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


def tensors(out) -> dict[str, torch.Tensor]:
    """A model's output (a tensor, a dict of feature maps, a tuple) as named tensors."""
    if isinstance(out, torch.Tensor):
        return {"out": out}
    if isinstance(out, dict):
        return {str(k): v for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return {str(i): v for i, v in enumerate(out)}
    raise TypeError(f"unexpected output {type(out).__name__}")


def loss_of(outs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A fixed random linear functional of every output: gradients that are not batchnorm's zeros."""
    total = 0.0
    for i, t in enumerate(outs.values()):
        w = torch.randn(t.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64).to(t.dtype)
        total = total + (t * w).sum() / t.numel() ** 0.5
    return total


def forward(model: nn.Module, x: torch.Tensor, seed: int = 1234) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # dropout / stochastic depth draw the same masks in both models
    return tensors(model(x))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_runs(got, want, tol: float, what: str) -> tuple[float, float]:
    """Outputs and gradients, each gradient judged against the scale of all the step's gradients
    (a bias feeding a batch-norm has gradient 0 up to cancellation). Returns the worst errors
    (outputs, gradients) in units of their scale."""
    (outs, g), (outs_ref, g_ref) = got, want
    assert outs.keys() == outs_ref.keys(), what
    out_err = max(assert_scaled_close(outs[k].detach(), outs_ref[k].detach(), tol, f"{what}: output {k}")
                  for k in outs_ref)
    assert g.keys() == g_ref.keys(), f"{what}: parameters with gradients differ"
    scale = max(v.abs().max().item() for v in g_ref.values())
    grad_err = max(assert_scaled_close(g[n], g_ref[n], tol, f"{what}: grad {n}", scale=scale) for n in g_ref)
    return out_err, grad_err


# ---- a) constant(1, 0) is batchnorm ---------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_constant_1_0_is_batchnorm(name):
    bn = build(name)
    expected = batch_norms(bn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rn = renormify(bn, ID)
        rn_var = renormify(bn, ID, running_stats="variance")  # batchnorm's averaging: every buffer equal
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert type(rn) is type(bn) and rn is not bn
    assert len(expected) > 0
    assert len(bounds(rn)) == len(expected) == len(bounds(rn_var))
    assert sorted(bounds(rn)) == sorted(expected)

    x = batch(name, 0)
    runs = {}
    for label, model in (("batchnorm", bn), ("renorm", rn)):
        outs = forward(model, x)
        loss_of(outs).backward()
        runs[label] = (outs, grads(model))
    # every parameter takes part (no gradient compared against a missing one)
    assert sorted(runs["batchnorm"][1]) == sorted(n for n, p in bn.named_parameters() if p.requires_grad)
    out_err, grad_err = compare_runs(runs["renorm"], runs["batchnorm"], TOL64, name)
    with torch.no_grad():
        outs_var = forward(rn_var, x)
    for k, v in runs["batchnorm"][0].items():
        assert_scaled_close(outs_var[k], v.detach(), TOL64, f"running_stats='variance': output {k}")

    sd_ref, sd, sd_var = bn.state_dict(), rn.state_dict(), rn_var.state_dict()
    assert list(sd) == list(sd_ref) == list(sd_var)
    checked = 0
    for k, ref in sd_ref.items():
        if k.endswith("num_batches_tracked"):
            assert int(ref) == 1 and torch.equal(sd[k], ref) and torch.equal(sd_var[k], ref), k
        elif k.endswith("running_mean"):
            assert_scaled_close(sd[k], ref, TOL64, k)
            assert_scaled_close(sd_var[k], ref, TOL64, k)
            checked += 1
        elif k.endswith("running_var"):
            # the paper's default averages sigma, not the variance (tests/test_reference.py checks it);
            # running_stats="variance" is batchnorm's
            assert_scaled_close(sd_var[k], ref, TOL64, k)
    assert checked == len(expected)
    print(f"\n[constant(1, 0)] {name}: {len(expected)} layers; worst error / scale: outputs {out_err:.1e}, "
          f"gradients {grad_err:.1e}")


# ---- b) eval and checkpoints ----------------------------------------------------------------

_TRAINED: dict[str, nn.Module] = {}


def trained(name: str) -> nn.Module:
    """The renormified model after two SGD steps with the clip active (cached for the fold test)."""
    if name not in _TRAINED:
        rn = renormify(build(name), CLIP)
        opt = torch.optim.SGD(rn.parameters(), lr=0.01)
        for step in range(2):
            opt.zero_grad()
            loss_of(forward(rn, batch(name, 10 + step), seed=step)).backward()
            opt.step()
        _TRAINED[name] = rn
    return _TRAINED[name]


@pytest.mark.parametrize("name", NAMES)
def test_eval_and_state_dict_round_trip(name):
    rn = trained(name).train()
    clipped = {n: d.clipped_fraction for n, d in diagnostics(rn).items()}
    assert max(clipped.values()) > 0, "constant(1.5, 0.5) clipped nothing: the check would be batchnorm's"
    assert all(d.step == 2 for d in diagnostics(rn).values())

    fresh = build(name)
    sd, sd_fresh = rn.state_dict(), fresh.state_dict()
    assert list(sd) == list(sd_fresh)
    assert sd._metadata == sd_fresh._metadata  # module versions (mnasnet's _load_from_state_dict reads them)
    moved = [k for k in sd if k.endswith("running_mean") and not torch.equal(sd[k], sd_fresh[k])]
    assert len(moved) == len(batch_norms(fresh)), "the training steps should have moved every running mean"

    orig = build(name)
    orig.load_state_dict(sd, strict=True)
    x = batch(name, 99)
    with torch.no_grad():
        want = tensors(rn.eval()(x))
        got = tensors(orig.eval()(x))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"eval output {k}")

    # and back: the original model's checkpoint into a renormified model
    rn2 = renormify(build(name), CLIP)
    rn2.load_state_dict(orig.state_dict(), strict=True)
    assert rn2.state_dict()._metadata == sd._metadata
    with torch.no_grad():
        again = tensors(rn2.eval()(x))
    for k in want:
        torch.testing.assert_close(again[k], want[k], rtol=0, atol=0, msg=f"round trip: eval output {k}")


# ---- c) fold ---------------------------------------------------------------------------------

BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)


def remaining_norms(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts = {"scale-shift": 0, "bn modules": 0, "bn calls": 0}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, ScaleShift):
                counts["scale-shift"] += 1
            elif isinstance(module, _BatchNorm):
                counts["bn modules"] += 1
        elif node.op == "call_function" and node.target in BN_FUNCTIONS:
            counts["bn calls"] += 1
    counts["remaining"] = sum(counts.values())
    return counts


def _reason(why: str) -> str:
    """A fold report's reason without the node names, to group the layers it applies to."""
    why = why.split(";")[0].split(": not a plain batchnorm")[0]
    return re.sub(r" \([\w.]+\)", "", why)


def _fold(model: nn.Module):
    """``fold(model)`` and its report (``gm.fold_report``; older versions: ``fold(model, report=True)``)."""
    gm = fold(model)
    return gm, getattr(gm, "fold_report", None)


@pytest.mark.parametrize("name", NAMES)
def test_fold_equals_eval(name, fold_counts):
    rn = trained(name).eval()
    n_bn = len(batch_norms(rn))
    row: dict[str, object] = {"batch-norms": n_bn, "converted": len(bounds(rn))}
    fold_counts[name] = row
    x = batch(name, 7)
    with torch.no_grad():
        want = tensors(rn(x))
    try:
        folded, report = _fold(rn)
    except RenormTraceError as exc:  # reported, never silently skipped
        row["note"] = "XFAIL: torch.fx cannot trace the whole model"
        pytest.xfail(f"fold: torch.fx cannot trace {name}: {exc}")
    with torch.no_grad():
        got = tensors(folded(x))
        after = tensors(rn(x))
    assert got.keys() == want.keys()
    err = 0.0
    for k in want:
        err = max(err, assert_scaled_close(got[k], want[k], TOL64, f"folded output {k}"))
        torch.testing.assert_close(after[k], want[k], rtol=0, atol=0, msg="fold changed the model it was given")

    counts = remaining_norms(folded)
    row.update(counts)
    row["err"] = f"{err:.0e}"
    reasons: collections.Counter = collections.Counter()
    if report is not None:
        row["folded"] = len(report.folded)
        row["merged"] = len(getattr(report, "merged", ()))
        reasons.update(_reason(why) for why in report.not_folded.values())
        row["note"] = "; ".join(f"{n}x {why}" for why, n in reasons.most_common())
    print(f"\n[fold] {name}: {n_bn} batch-norms, {row.get('folded', '?')} folded, "
          f"{row.get('merged', '?')} branch blocks merged, {counts['scale-shift']} ScaleShift, "
          f"{counts['bn modules']} batch-norm modules and {counts['bn calls']} batch-norm calls left "
          f"({counts['remaining']} normalizations remain); output error / scale {err:.1e}")
    for why, n in reasons.most_common():
        print(f"[fold]   not folded ({n}x): {why}")
    assert counts["remaining"] <= n_bn
    # what is left is what the report says could not fold (each of these batch-norms is called once)
    if report is not None:
        assert counts["remaining"] == len(report.not_folded), report


# ---- d) torch.compile, once ------------------------------------------------------------------

COMPILED = "resnet18"  # the fewest graph nodes of the zoo (20 batch-norms, no SE / branches): quickest to compile
# float64: in float32 this comparison is chaotic for any ReLU / max-pool net, batchnorm included. After one
# SGD step, eager float32 and eager float64 differ by up to 40 % of the gradients' scale in single
# elements (ReLU kinks and max-pool near-ties resolved differently by a rounding difference), so compiled
# float32 (Inductor's fused Welford moments) vs eager float32 would be judged by the same coin flips.
# In float64 the rounding is 1e-16 and the comparison is exact to TOL64.
COMPILE_DTYPE = torch.float64


def _train_two_steps(model: nn.Module, params_of: nn.Module):
    opt = torch.optim.SGD(params_of.parameters(), lr=0.05)
    trace = []
    for step in range(2):
        opt.zero_grad()
        outs = forward(model, batch(COMPILED, 20 + step, COMPILE_DTYPE), seed=step)
        loss_of(outs).backward()
        trace.append(({k: v.detach() for k, v in outs.items()}, grads(params_of)))
        opt.step()
    return trace, {k: v.clone() for k, v in params_of.state_dict().items()}


def test_compiled_renorm_equals_eager_with_clipping():
    torch._dynamo.reset()
    base = scramble_stats(build(COMPILED, COMPILE_DTYPE))  # r and d clip on most channels
    eager = renormify(base, CLIP)
    model = renormify(base, CLIP)
    want = _train_two_steps(eager, eager)
    start = time.perf_counter()
    got = _train_two_steps(torch.compile(model), model)
    print(f"\n[compile] {COMPILED}: two compiled training steps (compile included) took "
          f"{time.perf_counter() - start:.1f} s")

    for m, what in ((eager, "eager"), (model, "compiled")):
        clipped = [d.clipped_fraction for d in diagnostics(m).values()]
        assert min(clipped) > 0, f"{what}: the clip is not active in every layer"
        assert all(d.step == 2 for d in diagnostics(m).values()), what
    e_diag, c_diag = diagnostics(eager), diagnostics(model)
    for n in e_diag:
        assert e_diag[n].clipped_fraction == c_diag[n].clipped_fraction, n
        for field in ("r_range", "d_range"):
            for a, b in zip(getattr(c_diag[n], field), getattr(e_diag[n], field)):
                assert abs(a - b) <= TOL64 * max(1.0, abs(b)), (n, field)

    (trace, state), (trace_ref, state_ref) = got, want
    for step, (g, w) in enumerate(zip(trace, trace_ref)):
        compare_runs(g, w, TOL64, f"compiled step {step}")
    assert list(state) == list(state_ref)
    for k, ref in state_ref.items():
        if ref.is_floating_point():
            assert_scaled_close(state[k], ref, TOL64, k)
        else:
            assert torch.equal(state[k], ref), k
