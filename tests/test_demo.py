"""The demo's code paths on a tiny setting (so they cannot rot), and diagnostics against hand-computed r and d."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from renorm_fx import RenormSchedule, diagnostics, renormify  # noqa: E402
from renorm_fx import demo  # noqa: E402
from renorm_fx.demo_data import REGIMES, Regime, batch_stream, load_digits_split, micro_batches  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- diagnostics, by hand ------------------------------------------------------------------------
def test_diagnostics_match_the_papers_formulas_by_hand() -> None:
    eps = 1e-5
    bn = nn.BatchNorm1d(4, eps=eps)
    running_mean = torch.tensor([0.0, 1.0, -1.0, 0.0])
    running_var = torch.tensor([1.0, 4.0, 0.25, 1.0])
    bn.running_mean.copy_(running_mean)
    bn.running_var.copy_(running_var)
    # channel 0: nothing clipped; 1: r and d clipped (high); 2: d only; 3: r only (low)
    x = torch.tensor([[1.0, 8.0, -0.5, 0.1],
                      [-1.0, 0.0, 0.5, -0.1],
                      [0.3, 6.0, -0.3, 0.2],
                      [-0.5, 2.0, 0.3, -0.2]])
    r_max, d_max = 1.5, 0.5
    model = renormify(nn.Sequential(bn), RenormSchedule.constant(r_max, d_max))

    before = diagnostics(model)["0"]
    assert before.step == 0 and before.r_range == (0.0, 0.0) and before.clipped_fraction == 0.0

    model.train()
    y = model(x)

    # the paper: sigma_B = sqrt(biased var + eps), sigma = sqrt(running_var + eps)
    xd = x.double()
    mu_b = xd.mean(0)
    sigma_b = torch.sqrt(xd.var(0, unbiased=False) + eps)
    sigma = torch.sqrt(running_var.double() + eps)
    r_raw = sigma_b / sigma
    d_raw = (mu_b - running_mean.double()) / sigma
    r = r_raw.clamp(1 / r_max, r_max)
    d = d_raw.clamp(-d_max, d_max)
    clipped = (r != r_raw) | (d != d_raw)
    assert clipped.tolist() == [False, True, True, True]  # the batch was chosen for this

    got = diagnostics(model)["0"]
    assert got.step == 1
    assert got.bounds == (r_max, d_max)
    assert got.r_range == pytest.approx((r.min().item(), r.max().item()), rel=1e-5)
    assert got.d_range == pytest.approx((d.min().item(), d.max().item()), rel=1e-5, abs=1e-6)
    assert got.clipped_fraction == pytest.approx(clipped.double().mean().item())
    assert got.nonfinite_batches == 0
    # and the output is the paper's x_hat (gamma = 1, beta = 0)
    expected = (xd - mu_b) / sigma_b * r + d
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


# ---- the pieces --------------------------------------------------------------------------------
def test_schedule_is_the_papers_scaled_to_the_run_and_stretched_per_forward() -> None:
    one = demo.make_schedule(100)
    assert one.at(10) == (1.0, 0.0)  # batchnorm through the warm-up (10 %)
    assert one.at(40)[1] == 5.0 and one.at(39)[1] < 5.0  # d_max reaches 5 at 40 %
    assert one.at(60)[0] == 3.0 and one.at(59)[0] < 3.0  # r_max reaches 3 at 60 %
    eight = demo.make_schedule(100, forwards_per_step=8)
    for step in (5, 10, 25, 40, 50, 60, 90):
        assert eight.at(8 * step) == pytest.approx(one.at(step))
    demo.make_schedule(1)  # a tiny run still gives a valid schedule


@pytest.mark.parametrize("name", list(REGIMES))
def test_batch_stream_draws_what_the_regime_says(name: str) -> None:
    regime = REGIMES[name]
    labels = torch.arange(500) % 10
    stream = batch_stream(regime, labels, torch.Generator().manual_seed(0))
    for _ in range(20):
        batch = next(stream)
        assert len(batch) == regime.batch_size and len(set(batch.tolist())) == regime.batch_size
        if regime.classes_per_batch is not None:
            assert len(set(labels[batch].tolist())) == regime.classes_per_batch
        chunks = micro_batches(batch, regime)
        assert len(chunks) == regime.forwards_per_step
        assert all(len(c) == regime.micro_batch for c in chunks)


def test_regime_refuses_micro_batches_batchnorm_cannot_train() -> None:
    with pytest.raises(ValueError, match="micro_batch"):
        Regime("bad", "1 example per normalization", micro_batch=1)
    with pytest.raises(ValueError, match="micro_batch"):
        Regime("bad", "does not divide", micro_batch=5)


def test_digits_split_is_fixed_and_validation_leaves_the_test_set_alone() -> None:
    a, b = load_digits_split(), load_digits_split()
    assert torch.equal(a.y_test, b.y_test) and a.x_train.shape[1:] == (1, 8, 8)
    assert len(a.y_train) + len(a.y_test) == 1797
    val = load_digits_split(validation=True)
    assert val.test_name == "validation" and len(val.y_train) + len(val.y_test) == len(a.y_train)


def test_table_reports_mean_and_std_over_seeds() -> None:
    results = [demo.RunResult("micro-2", m, s, acc, 1.0, [], [])
               for m, s, acc in [("batchnorm", 0, 0.5), ("batchnorm", 1, 0.7), ("renorm", 0, 0.9), ("renorm", 1, 0.9)]]
    rows = demo.summarize(results)
    text = demo.format_table(rows)
    assert "0.600 ± 0.141" in text and "0.900 ± 0.000" in text and "+0.300" in text
    md = demo.format_markdown(rows)
    assert md.startswith("| regime |") and md.count("\n") == 2


def test_parse_regimes_and_methods() -> None:
    assert demo.parse_methods("renorm") == ("renorm",)
    with pytest.raises(Exception, match="unknown method"):
        demo.parse_methods("groupnorm")
    assert demo.parse_regimes("all") == tuple(REGIMES)
    assert demo.parse_regimes("iid, micro-2") == ("iid", "micro-2")
    with pytest.raises(Exception, match="unknown regime"):
        demo.parse_regimes("micro-3")


# ---- the demo end to end, tiny ----------------------------------------------------------------
def _check_outputs(out, text: str, regimes, methods=demo.METHODS) -> None:
    assert "ms/step renorm" in text  # the table
    for name in regimes:
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
    assert "fold check: the deployed models' accuracy equals the unfolded eval accuracy" in text
    png = out / "demo.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["regime"], r["method"]) for r in runs} == {(g, m) for g in regimes for m in methods}
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["step_ms"])
        assert bool(r["trace"]) == (r["method"] == "renorm")
        assert (r["fold"] is not None) == (r["method"] == "renorm" and r["seed"] == runs[0]["seed"])


def test_demo_tiny_eager_every_regime(tmp_path, capsys) -> None:
    assert demo.main(["--tiny", "--no-compile", "--no-progress", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "RenormSchedule(r_max(step)" in text  # the schedule, printed first
    _check_outputs(tmp_path, text, list(REGIMES))


def test_demo_tiny_compiled_renorm_one_regime(tmp_path, capsys) -> None:
    # renorm only, to keep it fast (batchnorm's compiled path is plain torch.compile)
    config = demo.parse_args(["--tiny", "--regimes", "iid", "--methods", "renorm", "--seeds", "0", "1",
                              "--no-progress", "--out", str(tmp_path)])
    assert config.compile and config.seeds == (0, 1)
    outcome = demo.run_demo(config)
    assert outcome.fold_ok
    text = capsys.readouterr().out
    assert "compiled with torch.compile" in text and " ± " in text
    _check_outputs(tmp_path, text, ["iid"], ["renorm"])
    # one model, compiled once: the second seed's run reuses the first seed's
    assert outcome.models == 1
    assert "compile (first training step of each graph)" in outcome.timing
