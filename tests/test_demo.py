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
from renorm_fx import bounds, demo  # noqa: E402
from renorm_fx.demo.data import ALL_REGIMES, REGIMES, Regime, batch_stream, load_digits_split, micro_batches  # noqa: E402
from renorm_fx.demo.model import DigitsCNN, ghost_batches  # noqa: E402

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
def test_schedule_is_the_papers_scaled_to_the_run_or_the_switch() -> None:
    # (The demo no longer stretches the schedule per forward: it counts optimizer steps, see below.)
    one = demo.make_schedule(100)
    assert one.at(10) == (1.0, 0.0)  # batchnorm through the warm-up (10 %)
    assert one.at(40)[1] == 5.0 and one.at(39)[1] < 5.0  # d_max reaches 5 at 40 %
    assert one.at(60)[0] == 3.0 and one.at(59)[0] < 3.0  # r_max reaches 3 at 60 %
    switch = demo.make_schedule(100, "switch")
    assert switch.at(9) == (1.0, 0.0) and switch.at(10) == (3.0, 5.0) and switch.at(99) == (3.0, 5.0)
    demo.make_schedule(1)  # a tiny run still gives a valid schedule
    demo.make_schedule(1, "switch")
    with pytest.raises(ValueError, match="ramp"):
        demo.make_schedule(100, "cosine")


@pytest.mark.parametrize("name", ["iid", "micro-4", "micro-2-acc"])
def test_schedule_counts_optimizer_steps_however_many_forwards(name: str) -> None:
    from renorm_fx.demo.training import ModelPool, Stopwatch, train_run

    regime = ALL_REGIMES[name]
    config = demo.DemoConfig(steps=7, regimes=(name,), methods=("renorm",), compile=False, progress=False,
                             eval_points=1, diag_points=1)
    pool = ModelPool(dict(config.recipes), compile=False)
    data = load_digits_split()
    for seed in (0, 1):  # the pooled model is reused: the count restarts at 0 per run
        train_run(pool, "renorm", regime, seed, data, config, Stopwatch())
        model = pool.models[pool.key("renorm", regime)].module
        assert {int(m.num_batches_tracked) for m in model.modules() if hasattr(m, "num_batches_tracked")} == {7}
        assert set(bounds(model).values()) == {config.recipe("renorm").schedule().at(7)}


def test_batchnorm_virtual_batches_are_exactly_gradient_accumulation() -> None:
    # The batchnorm baseline of the one-forward micro-batch regimes: each group through the same layer.
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    for k in (4, 2):
        separate = DigitsCNN().double()
        ghost = ghost_batches(DigitsCNN().double(), k)
        ghost.load_state_dict(separate.state_dict())
        torch.nn.functional.cross_entropy(ghost(x), y).backward()
        for xs, ys in zip(x.split(k), y.split(k)):
            (torch.nn.functional.cross_entropy(separate(xs), ys) * len(xs) / len(x)).backward()
        for (name, a), b in zip(separate.named_parameters(), ghost.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)
        for (name, a), b in zip(separate.state_dict().items(), ghost.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)
        ghost.eval(), separate.eval()
        torch.testing.assert_close(ghost(x), separate(x))
    with pytest.raises(ValueError, match="virtual batches of 4"):
        ghost_batches(DigitsCNN(), 4)(torch.randn(6, 1, 8, 8))


def test_recipe_learning_rate_schedules() -> None:
    const = demo.Recipe(steps=10, lr=0.1)
    assert const.lr_at(1) == const.lr_at(10) == 0.1
    cos = demo.Recipe(steps=10, lr=0.1, lr_schedule="cosine")
    assert cos.lr_at(1) == pytest.approx(0.1) and cos.lr_at(6) == pytest.approx(0.05) and 0 < cos.lr_at(10) < 0.003
    with pytest.raises(ValueError, match="schedule"):
        demo.Recipe(steps=10, lr=0.1, lr_schedule="step")
    config = demo.parse_args(["--steps", "50", "--lr", "0.2", "--bn-momentum", "0.05", "--ramp", "switch"])
    assert {r.steps for r in config.recipes.values()} == {50} and {r.lr for r in config.recipes.values()} == {0.2}
    assert config.recipe("batchnorm").momentum == 0.05 and config.recipe("renorm").ramp == "switch"
    assert config.recipe("renorm").momentum == demo.DEFAULT_RECIPES["renorm"].momentum


@pytest.mark.parametrize("name", list(ALL_REGIMES))
def test_batch_stream_draws_what_the_regime_says(name: str) -> None:
    regime = ALL_REGIMES[name]
    labels = torch.arange(500) % 10
    stream = batch_stream(regime, labels, torch.Generator().manual_seed(0))
    for _ in range(20):
        batch = next(stream)
        assert len(batch) == regime.batch_size and len(set(batch.tolist())) == regime.batch_size
        if regime.classes_per_batch is not None:
            assert len(set(labels[batch].tolist())) == regime.classes_per_batch
        chunks = micro_batches(batch, regime)
        assert len(chunks) == regime.groups  # was forwards_per_step: micro-batches are one forward by default now
        assert all(len(c) == regime.micro_batch for c in chunks)
        assert regime.forwards_per_step == (regime.groups if regime.accumulate else 1)
        assert regime.virtual_batch_size == (regime.micro_batch if regime.groups > 1 and not regime.accumulate
                                             else None)


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
    assert demo.parse_regimes("micro-2-acc") == ("micro-2-acc",)
    assert demo.parse_args(["--accumulate", "--regimes", "iid,micro-2"]).regimes == ("iid", "micro-2", "micro-2-acc")
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


def test_demo_tiny_accumulate_prints_both_times(tmp_path, capsys) -> None:
    assert demo.main(["--tiny", "--no-compile", "--no-progress", "--regimes", "micro-4", "--accumulate",
                      "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    _check_outputs(tmp_path, text, ["micro-4", "micro-4-acc"])
    lines = [line for line in text.splitlines() if "virtual batches (1 forward of 32)" in line]
    assert len(lines) == 2 and all("gradient accumulation (8 forwards of 4)" in line for line in lines)
