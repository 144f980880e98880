"""What the demo runs: the training recipe of each method, and the demo's settings."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Optional

from .data import REGIMES
from .model import METHODS, RAMPS, make_schedule

__all__ = ["Recipe", "DemoConfig", "DEFAULT_RECIPES", "LR_SCHEDULES", "TINY_STEPS", "FULL_SEEDS", "THREADS"]

LR_SCHEDULES = ("constant", "cosine")
TINY_STEPS = 6
FULL_SEEDS = (0, 1, 2, 3, 4)
THREADS = 1  # a tiny model: one thread is as fast, and steady when the machine is busy


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one method trains: SGD (momentum 0.9, weight decay 5e-4) for ``steps`` optimizer steps of 32
    examples at learning rate ``lr`` (``"constant"``, or ``"cosine"``-decayed to 0), the batch-norms'
    moving-average rate ``momentum`` (renorm's alpha), and, for renorm, the clip schedule's ``ramp``
    (see :func:`renorm_fx.demo.model.make_schedule`)."""

    steps: int
    lr: float
    lr_schedule: str = "constant"
    momentum: float = 0.1
    ramp: str = "paper"  # renorm only

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if self.ramp not in RAMPS:
            raise ValueError(f"unknown ramp {self.ramp!r}; expected one of {RAMPS}")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based)."""
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / self.steps))

    def schedule(self):  # -> RenormSchedule
        """Renorm's clip schedule for this recipe."""
        return make_schedule(self.steps, self.ramp)

    def describe(self, method: str) -> str:
        rate = "alpha" if method == "renorm" else "momentum"
        lr = f"lr {self.lr} cosine-decayed to 0" if self.lr_schedule == "cosine" else f"lr {self.lr} constant"
        text = f"{self.steps} steps, {lr}, {rate} {self.momentum}"
        return text + (f", ramp {self.ramp}" if method == "renorm" else "")


#: Each method's best mean validation accuracy over the five regimes, with the same search budget for
#: both (``python -m renorm_fx.demo.search``; the tables: docs/demo_recipe.md).
DEFAULT_RECIPES: dict[str, Recipe] = {
    "batchnorm": Recipe(steps=1500, lr=0.01, lr_schedule="cosine", momentum=0.03),
    "renorm": Recipe(steps=600, lr=0.01, lr_schedule="cosine", momentum=0.1, ramp="paper"),
}


@dataclasses.dataclass
class DemoConfig:
    """What to run. ``seeds`` are the initializations and batch orders; each seed trains every regime x method.

    ``recipes`` maps each method to its :class:`Recipe` (default :data:`DEFAULT_RECIPES`);
    ``steps``, if given, overrides every recipe's number of steps.
    """

    steps: Optional[int] = None
    seeds: tuple[int, ...] = (0,)
    regimes: tuple[str, ...] = tuple(REGIMES)
    methods: tuple[str, ...] = METHODS
    out: Path = Path("demo_out")
    compile: bool = True
    progress: bool = True
    threads: int = THREADS
    validation: bool = False
    eval_points: int = 25  # evaluations per run (for the curves)
    diag_points: int = 100  # diagnostics reads per renorm run (for the plot)
    recipes: Mapping[str, Recipe] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RECIPES))

    def __post_init__(self) -> None:
        if self.steps is not None:
            self.recipes = {m: dataclasses.replace(r, steps=self.steps) for m, r in self.recipes.items()}
        missing = [m for m in self.methods if m not in self.recipes]
        if missing:
            raise ValueError(f"no recipe for {missing}")

    def recipe(self, method: str) -> Recipe:
        return self.recipes[method]

    def settings(self) -> dict[str, Any]:
        """JSON-friendly settings (for results.json)."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
        out["recipes"] = {m: dataclasses.asdict(r) for m, r in self.recipes.items()}
        return out
