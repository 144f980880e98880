"""Data for the demo: scikit-learn's bundled digits, and the batch regimes that break batchnorm.

``load_digits`` ships with scikit-learn (1,797 8x8 grey images of the digits 0-9), so
nothing is downloaded. A :class:`Regime` says how training batches are drawn and how
many examples each normalization sees; :func:`batch_stream` draws them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["Digits", "Regime", "REGIMES", "ACCUMULATED", "ALL_REGIMES", "ASKED_REGIMES", "load_digits_split",
           "batch_stream", "micro_batches"]

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Digits:
    """A fixed train / test split of the digits, standardized with the training set's mean and deviation."""

    x_train: Tensor  # (N, 1, 8, 8) float32
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor
    test_name: str = "test"  # "validation" when the test set is held out of the training set


def load_digits_split(test_fraction: float = 0.25, seed: int = 0, validation: bool = False) -> Digits:
    """The digits, split once (stratified, ``random_state=seed``) into train and test.

    With ``validation=True`` the test set is never touched: 20 % of the training set
    (stratified) is held out instead, for tuning.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    name = "test"
    if validation:
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=0.2, random_state=seed + 1, stratify=y_train)
        name = "validation"
    mean, std = x_train.mean(), x_train.std()
    return Digits((x_train - mean) / std, y_train, (x_test - mean) / std, y_test, name)


@dataclasses.dataclass(frozen=True)
class Regime:
    """How training batches are drawn, and how they are normalized.

    Every optimizer step sees ``batch_size`` examples, normalized in groups of
    ``micro_batch`` (the paper's micro-batches). By default the groups are virtual
    batches of one forward of all ``batch_size`` examples (renorm: ``renormify(...,
    virtual_batch_size=micro_batch)``; batchnorm: each group through the same batch-norm
    layer, see :func:`renorm_fx.demo.model.ghost_batches`). With ``accumulate`` each group
    is its own forward and backward, gradients accumulated, one optimizer step.
    ``classes_per_batch`` draws each batch from that many classes only (non-i.i.d.);
    ``None`` is i.i.d. (shuffled epochs, last partial batch dropped).
    """

    name: str
    description: str
    batch_size: int = 32
    micro_batch: int = 32
    classes_per_batch: Optional[int] = None
    accumulate: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch < 2 or self.batch_size % self.micro_batch:
            raise ValueError(f"Regime {self.name}: micro_batch ({self.micro_batch}) must be >= 2 and divide "
                             f"batch_size ({self.batch_size}); batchnorm needs 2 examples per normalization.")
        if self.classes_per_batch is not None and not 1 <= self.classes_per_batch <= NUM_CLASSES:
            raise ValueError(f"Regime {self.name}: classes_per_batch must be in 1..{NUM_CLASSES}")

    @property
    def groups(self) -> int:
        """Normalizations (micro-batches) per optimizer step."""
        return self.batch_size // self.micro_batch

    @property
    def forwards_per_step(self) -> int:
        """Forwards per optimizer step: one, or one per micro-batch with ``accumulate``."""
        return self.groups if self.accumulate else 1

    @property
    def virtual_batch_size(self) -> Optional[int]:
        """The size of the virtual batches of a one-forward micro-batch regime (None: the whole batch)."""
        return self.micro_batch if self.groups > 1 and not self.accumulate else None

    def accumulated(self) -> "Regime":
        """The same micro-batches as separate forwards with gradient accumulation (``<name>-acc``)."""
        if self.groups == 1:
            raise ValueError(f"Regime {self.name} has no micro-batches to accumulate")
        return dataclasses.replace(
            self, name=f"{self.name}-acc", accumulate=True,
            description=f"batches of {self.batch_size} as {self.groups} micro-batches of {self.micro_batch}, "
                        f"{self.groups} forwards, gradients accumulated")


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("iid", "i.i.d. batches of 32"),
    Regime("micro-4", "batches of 32 in 8 virtual batches of 4, one forward", micro_batch=4),
    Regime("micro-2", "batches of 32 in 16 virtual batches of 2, one forward", micro_batch=2),
    Regime("2-class", "batches of 32 from 2 classes", classes_per_batch=2),
    Regime("1-class", "batches of 32 from 1 class", classes_per_batch=1),
)}

#: The micro-batch regimes run as the paper ran them: separate forwards, gradients accumulated.
ACCUMULATED: dict[str, Regime] = {a.name: a for a in (r.accumulated() for r in REGIMES.values() if r.groups > 1)}

#: Every regime the demo knows, by name.
ALL_REGIMES: dict[str, Regime] = {**REGIMES, **ACCUMULATED}

#: The three regimes the demo was asked for; the other two are where batchnorm really breaks here.
ASKED_REGIMES = ("iid", "micro-4", "2-class")


def batch_stream(regime: Regime, labels: Tensor, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches of ``regime.batch_size`` into ``labels``, drawn as ``regime`` says."""
    n, size = len(labels), regime.batch_size
    if regime.classes_per_batch is None:
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - size + 1, size):  # drop_last: every batch is full
                yield order[start:start + size]
    by_class = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)]
    while True:
        classes = torch.randperm(NUM_CLASSES, generator=generator)[:regime.classes_per_batch]
        pool = torch.cat([by_class[int(c)] for c in classes])
        if len(pool) < size:
            raise ValueError(f"Regime {regime.name}: classes {classes.tolist()} have {len(pool)} examples, "
                             f"fewer than a batch ({size})")
        yield pool[torch.randperm(len(pool), generator=generator)[:size]]


def micro_batches(indices: Tensor, regime: Regime) -> tuple[Tensor, ...]:
    """Split one batch into the regime's micro-batches (each exactly ``micro_batch`` long): the groups
    one normalization sees, whether they are virtual batches of one forward or forwards of their own."""
    return indices.split(regime.micro_batch)
