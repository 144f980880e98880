"""Model-zoo suite: shared helpers, the fold-count table and the session summary.

Runs in the second environment, ``.venv-zoo`` (torch 2.14.1 + torchvision + timm):
``bash scripts/test_zoo.sh``. Not collected by the main suite (its testpaths is ``tests``).
"""

from __future__ import annotations

import os

import pytest
import torch

# Two CPU cores shared with other jobs: with torch's default intra-op thread pool (2
# OpenMP threads spinning against other processes) a float64 forward + backward of these
# nets ran 10-50x slower than single-threaded (mobileone_s0: 12-47 s against ~1 s).
# ZOO_THREADS=n overrides.
torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))

#: model name -> what remains of its normalizations after ``fold`` (filled by test_fold_equals_eval;
#: printed as a table at the end of the session).
FOLD_COUNTS: dict[str, dict[str, object]] = {}

FOLD_COLUMNS = (
    ("batch-norms", "batch-norm modules of the original model with running statistics"),
    ("converted", "renorm layers (len(bounds(rn)))"),
    ("folded", "folded into the conv / linear before them (fold_report.folded)"),
    ("merged", "parallel conv-branch blocks merged into one conv (fold_report.merged)"),
    ("scale-shift", "left as ScaleShift modules (x * scale + shift)"),
    ("bn modules", "batch-norm modules still called in the folded graph"),
    ("bn calls", "F.batch_norm / torch.batch_norm calls still in the folded graph"),
    ("remaining", "normalizations left: scale-shift + bn modules + bn calls"),
    ("err", "max |fold(rn)(x) - rn(x)| / max(1, max |rn(x)|), float64"),
)


@pytest.fixture
def fold_counts() -> dict[str, dict[str, object]]:
    return FOLD_COUNTS


def fold_table() -> str:
    if not FOLD_COUNTS:
        return "fold counts: no fold test ran"
    names = [c for c, _ in FOLD_COLUMNS]
    width = max(len("model"), *(len(n) for n in FOLD_COUNTS))
    cols = [max(len(c), 5) for c in names]
    lines = ["fold: normalizations left in the folded graph (per model)",
             "  ".join([f"{'model':<{width}}", *(f"{c:>{w}}" for c, w in zip(names, cols)), "note"]),
             "  ".join(["-" * width, *("-" * w for w in cols), "----"])]
    for model, row in FOLD_COUNTS.items():
        cells = [f"{row.get(c, '-')!s:>{w}}" for c, w in zip(names, cols)]
        lines.append("  ".join([f"{model:<{width}}", *cells, str(row.get("note", ""))]))
    lines.append("")
    lines += [f"  {c}: {what}" for c, what in FOLD_COLUMNS]
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.section("model zoo: fold counts")
    terminalreporter.write_line(fold_table())
