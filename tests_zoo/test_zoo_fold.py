"""Model zoo: ``fold`` on real architectures — norm + activation layers and re-parameterizable blocks.

Per architecture (random init, no downloads; float64, batch 2 at 32x32), with non-trivial
running statistics and affine on every batch-norm:

* ``fold(model.eval())`` equals ``model.eval()`` to float64 rounding, and so does the fold of
  the renormified model (``renormify``: renorm layers made from timm's ``BatchNormAct2d``
  fold the same way);
* normalizations left in the folded graph (batch-norm modules, ``F.batch_norm`` calls,
  ``ScaleShift`` modules) and conv branches merged, before vs after this change: "before"
  is the pass with its two new steps switched off (``inline_subclasses=False,
  merge_branches=False``), which produces what the previous ``fold`` produced.

The table is printed at the end of the module (also with ``-q``). Runs in ``.venv-zoo``:
``.venv-zoo/bin/python -m pytest -q tests_zoo/test_zoo_fold.py``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Optional

import pytest
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

torchvision = pytest.importorskip("torchvision", reason="the zoo suite runs in .venv-zoo")
timm = pytest.importorskip("timm", reason="the zoo suite runs in .venv-zoo")

from timm.layers import BatchNormAct2d  # noqa: E402
from timm.models.byobnet import MobileOneBlock, RepVggBlock  # noqa: E402

from renorm_fx import RenormLayer, RenormSchedule, fold, renormify  # noqa: E402
from renorm_fx.deploy import _fold  # noqa: E402
from renorm_fx.modules import ScaleShift  # noqa: E402

SHAPE = (2, 3, 32, 32)
TOL = 1e-10  # float64: of the output's scale


@dataclasses.dataclass(frozen=True)
class Arch:
    make: Callable[[], nn.Module]
    blocks: Optional[type] = None  # the re-parameterizable block class: each must merge into one conv


ARCHS = {
    "timm repvgg_a0": Arch(lambda: timm.create_model("repvgg_a0", pretrained=False), RepVggBlock),
    "timm mobileone_s0": Arch(lambda: timm.create_model("mobileone_s0", pretrained=False), MobileOneBlock),
    "timm efficientnet_b0": Arch(lambda: timm.create_model("efficientnet_b0", pretrained=False)),
    "timm mobilenetv3_small_100": Arch(lambda: timm.create_model("mobilenetv3_small_100", pretrained=False)),
    "torchvision resnet18": Arch(lambda: torchvision.models.resnet18(weights=None)),
    "torchvision mobilenet_v3_small": Arch(lambda: torchvision.models.mobilenet_v3_small(weights=None)),
}

ROWS: dict[str, dict[str, object]] = {}
COLUMNS = (
    ("norms", "batch-norm modules in the model (BatchNormAct2d: a norm + activation subclass)"),
    ("left before", "normalizations left in the folded graph by the previous fold"),
    ("left after", "normalizations left now (batch-norm modules + F.batch_norm calls + ScaleShift)"),
    ("merged before", "conv branch blocks merged into one conv, previous fold (none: it did not merge)"),
    ("merged after", "conv branch blocks merged now"),
    ("convs before", "conv calls in the folded graph, previous fold"),
    ("convs after", "conv calls in the folded graph now"),
    ("max rel err", "max |fold(model)(x) - model(x)| / max |model(x)| (float64)"),
    ("fold s", "seconds for fold(model) on this shared machine"),
)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine far from the identity, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


def _left(gm: fx.GraphModule) -> int:
    """Normalizations left in a folded graph."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (_BatchNorm, ScaleShift)):
            n += 1
        elif node.op == "call_function" and node.target in (torch.nn.functional.batch_norm, torch.batch_norm):
            n += 1
    return n


def _convs(gm: fx.GraphModule) -> int:
    return sum(node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d)
               for node in gm.graph.nodes)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    name = request.param
    torch.manual_seed(0)
    model = _randomize(ARCHS[name].make()).double().eval()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    return name, model, x, want


def test_fold_equals_eval_and_leaves_no_normalization(arch):
    name, model, x, want = arch
    start = time.perf_counter()
    folded = fold(model)
    seconds = time.perf_counter() - start
    before = _fold(model, inline_subclasses=False, merge_branches=False)
    report = folded.fold_report
    with torch.no_grad():
        err, err_before = _rel_err(folded(x), want), _rel_err(before(x), want)
    blocks = ARCHS[name].blocks
    ROWS[name] = {
        "norms": sum(isinstance(m, _BatchNorm) for m in model.modules()),
        "left before": _left(before), "left after": _left(folded),
        "merged before": len(before.fold_report.merged), "merged after": len(report.merged),
        "convs before": _convs(before), "convs after": _convs(folded),
        "max rel err": f"{err:.1e}", "fold s": f"{seconds:.1f}",
    }
    assert err <= TOL and err_before <= TOL, (err, err_before)
    assert _left(folded) == 0, report
    assert not report.not_folded and not report.not_merged, report
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    if blocks is not None:  # every re-parameterizable block is one conv now
        assert len(report.merged) == sum(isinstance(m, blocks) for m in model.modules()), report
    if any(isinstance(m, BatchNormAct2d) for m in model.modules()):  # the activations stay
        acts = {type(m.act) for m in model.modules() if isinstance(m, BatchNormAct2d)} - {nn.Identity}
        called = {type(folded.get_submodule(n.target)) for n in folded.graph.nodes if n.op == "call_module"}
        assert acts <= called, (acts, called)


def test_renormified_model_folds_the_same(arch):
    name, model, x, want = arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rn = renormify(model.train(), RenormSchedule.constant(2.0, 1.0))
    model.eval()
    rn.eval()
    assert any(isinstance(m, RenormLayer) for m in rn.modules())
    folded = fold(rn)
    plain = fold(model).fold_report
    report = folded.fold_report
    assert report.folded == plain.folded and report.merged == plain.merged and not report.not_folded, report
    with torch.no_grad():
        assert _rel_err(folded(x), want) <= TOL


def fold_zoo_table() -> str:
    names = [c for c, _ in COLUMNS]
    width = max(len("model"), *(len(n) for n in ROWS))
    cols = [max(len(c), 5) for c in names]
    lines = ["fold on the model zoo: normalizations left and branches merged, before vs after",
             "  ".join([f"{'model':<{width}}", *(f"{c:>{w}}" for c, w in zip(names, cols))]),
             "  ".join(["-" * width, *("-" * w for w in cols)])]
    for model, row in ROWS.items():
        lines.append("  ".join([f"{model:<{width}}", *(f"{row.get(c, '-')!s:>{w}}" for c, w in zip(names, cols))]))
    lines += [""] + [f"  {c}: {what}" for c, what in COLUMNS]
    return "\n".join(lines)


class _Table:
    """Prints the table in the session's terminal summary (this file has no conftest of its own)."""

    def pytest_terminal_summary(self, terminalreporter):
        if ROWS:
            terminalreporter.section("model zoo: fold (norm + activation layers, merged branches)")
            terminalreporter.write_line(fold_zoo_table())


@pytest.fixture(scope="module", autouse=True)
def _table_plugin(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("renorm_fx_zoo_fold_table"):
        manager.register(_Table(), "renorm_fx_zoo_fold_table")
