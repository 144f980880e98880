"""What the demo reports: the results table (text and Markdown), the plot, results.json / results.md,
the fold check, and the micro-batch timings (virtual batches against gradient accumulation)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Sequence

from .config import DemoConfig
from .data import ALL_REGIMES
from .model import METHODS
from .training import RunResult

__all__ = ["Row", "summarize", "format_table", "format_markdown", "format_micro_times", "plot_runs",
           "write_results", "print_fold_checks", "TABLE_HEADER"]


@dataclasses.dataclass
class Row:
    """One regime of the results table: both methods, over the seeds."""

    regime: str
    description: str
    accuracy: dict[str, list[float]]  # method -> one accuracy per seed
    step_ms: dict[str, float]  # method -> median over seeds

    def mean(self, method: str) -> float:
        return statistics.fmean(self.accuracy[method])

    def std(self, method: str) -> float:
        values = self.accuracy[method]
        return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: Sequence[RunResult]) -> list[Row]:
    """One row per regime (in the order run), both methods, accuracies over seeds."""
    rows: dict[str, Row] = {}
    times: dict[tuple[str, str], list[float]] = {}
    for r in results:
        regime = ALL_REGIMES.get(r.regime)
        row = rows.setdefault(r.regime, Row(r.regime, regime.description if regime else "", {}, {}))
        row.accuracy.setdefault(r.method, []).append(r.accuracy)
        times.setdefault((r.regime, r.method), []).append(r.step_ms)
    for (regime, method), values in times.items():
        rows[regime].step_ms[method] = statistics.median(values)
    return list(rows.values())


def _acc(row: Row, method: str) -> str:
    if method not in row.accuracy:
        return "-"
    if len(row.accuracy[method]) > 1:
        return f"{row.mean(method):.3f} ± {row.std(method):.3f}"
    return f"{row.mean(method):.3f}"


def _delta(row: Row) -> str:
    if not all(m in row.accuracy for m in METHODS):
        return "-"
    return f"{row.mean('renorm') - row.mean('batchnorm'):+.3f}"


def _ms(row: Row, method: str) -> str:
    return f"{row.step_ms[method]:.2f}" if method in row.step_ms else "-"


TABLE_HEADER = ("regime", "training batches", "batchnorm", "renorm", "renorm - bn",
                "ms/step bn", "ms/step renorm")


def _table_cells(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    return [(r.regime, r.description, _acc(r, "batchnorm"), _acc(r, "renorm"), _delta(r),
             _ms(r, "batchnorm"), _ms(r, "renorm")) for r in rows]


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: eval-mode test accuracy (mean ± std over seeds) and ms per training step."""
    cells = [TABLE_HEADER, *_table_cells(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row]) -> str:
    """The same table in Markdown."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 5) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in _table_cells(rows)]
    return "\n".join(lines)


def format_micro_times(rows: Sequence[Row]) -> str:
    """For each micro-batch regime run both ways: ms per step with virtual batches (one forward) and with
    gradient accumulation (one forward per micro-batch). Empty if no regime was run both ways."""
    by_name = {r.regime: r for r in rows}
    lines = []
    for row in rows:
        acc = by_name.get(row.regime + "-acc")
        if acc is None:
            continue
        regime = ALL_REGIMES[acc.regime]
        for method in METHODS:
            if method in row.step_ms and method in acc.step_ms:
                v, a = row.step_ms[method], acc.step_ms[method]
                lines.append(f"  {row.regime:8s} {method:9s}  virtual batches (1 forward of {regime.batch_size}) "
                             f"{v:6.2f} ms   gradient accumulation ({regime.groups} forwards of "
                             f"{regime.micro_batch}) {a:6.2f} ms   = {a / v:.1f}x")
    if not lines:
        return ""
    return "time per training step of 32 examples (median):\n" + "\n".join(lines)


# ---- the plot ---------------------------------------------------------------------------------
def plot_runs(results: Sequence[RunResult], path: Path, seed: int) -> Path:
    """Write a 2x2 PNG for seed ``seed``: eval accuracy over training (both methods); r_max with the
    r the renorm layers used; d_max with the d they used; the fraction of clipped channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.seed == seed]
    regimes = list(dict.fromkeys(r.regime for r in runs))
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(regimes)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_acc, ax_r, ax_d, ax_clip = axes.flat
    for r in runs:
        steps, acc = zip(*r.curve)
        style = "-" if r.method == "renorm" else "--"
        ax_acc.plot(steps, acc, style, color=colors[r.regime], label=f"{r.regime} {r.method}")
        if not r.trace:
            continue
        t = r.trace
        s = [p.step for p in t]
        c = colors[r.regime]
        ax_r.fill_between(s, [p.r_low for p in t], [p.r_high for p in t], color=c, alpha=0.2, lw=0)
        ax_r.plot(s, [p.r_high for p in t], color=c, lw=0.8, label=f"{r.regime}: r range")
        ax_d.fill_between(s, [p.d_low for p in t], [p.d_high for p in t], color=c, alpha=0.2, lw=0)
        ax_d.plot(s, [p.d_high for p in t], color=c, lw=0.8, label=f"{r.regime}: d range")
        ax_clip.plot(s, [p.clipped for p in t], color=c, label=r.regime)
    bounds = next((r.trace for r in runs if r.trace), [])
    if bounds:
        s = [p.step for p in bounds]
        ax_r.plot(s, [p.r_max for p in bounds], "k", lw=2, label="r_max, 1/r_max")
        ax_r.plot(s, [1 / p.r_max for p in bounds], "k", lw=2)
        ax_d.plot(s, [p.d_max for p in bounds], "k", lw=2, label="±d_max")
        ax_d.plot(s, [-p.d_max for p in bounds], "k", lw=2)
    ax_acc.set(title="test accuracy, eval mode (dashed: batchnorm, solid: renorm)", xlabel="step",
               ylabel="accuracy", ylim=(0, 1.02))
    ax_acc.legend(fontsize=7, ncol=2)
    ax_r.set(title="renorm: r_max and the r used (min..max over channels;\nvirtual batches: each channel's "
                   "mean over the groups)", xlabel="step", yscale="log")
    ax_d.set(title="renorm: d_max and the d used (min..max over channels)", xlabel="step")
    ax_clip.set(title="renorm: fraction of channels whose r or d was clipped\n(all of them in the warm-up: "
                      "r_max = 1, d_max = 0 is batchnorm)", xlabel="step",
                ylabel="fraction", ylim=(-0.02, 1.02))
    for ax in (ax_r, ax_d, ax_clip):
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(f"batchnorm vs renorm on digits, seed {seed}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_fold_checks(results: Sequence[RunResult]) -> bool:
    """Print the deployed (folded) renorm models' accuracy next to the unfolded; True if all are equal."""
    checks = [r for r in results if r.fold is not None]
    if not checks:
        return True
    print(f"\ndeploy: renorm_fx.fold(model.eval()) of each renorm model (seed {checks[0].seed})")
    print(checks[0].fold.report)  # type: ignore[union-attr]
    print(f"{'regime':11s}  {'eval accuracy':>13s}  {'folded accuracy':>15s}  {'max |logit diff|':>16s}")
    for r in checks:
        f = r.fold
        assert f is not None
        print(f"{r.regime:11s}  {f.eval_accuracy:13.3f}  {f.folded_accuracy:15.3f}  {f.max_abs_diff:16.2e}"
              f"  {'equal' if f.ok else 'DIFFERENT'}")
    ok = all(r.fold.ok for r in checks)  # type: ignore[union-attr]
    print("fold check: " + ("the deployed models' accuracy equals the unfolded eval accuracy" if ok else "MISMATCH"))
    return ok


def write_results(config: DemoConfig, results: Sequence[RunResult], rows: Sequence[Row], out: Path) -> None:
    """``results.json`` (settings, every run with its curve and diagnostics trace) and ``results.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": config.settings(), "runs": [dataclasses.asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    times = format_micro_times(rows)
    (out / "results.md").write_text(format_markdown(rows) + "\n" + (f"\n```\n{times}\n```\n" if times else ""))
