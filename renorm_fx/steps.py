"""``count_updates``: a renormified model's schedule counts optimizer updates, not forwards.

The paper's schedule counts training steps (updates of the model). By default each renorm
layer counts its training forwards, which is the same thing for one forward per update;
with gradient accumulation, or several forwards per update (CrossQ's joint forward of
(s, a) and (s', a'), an actor loss through the critic), it is not. ``count_updates(model,
optimizer)`` makes every layer's step advance once per ``optimizer.step()``, however many
forwards it saw; the moving averages still move every training forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .layer import COUNTS_UPDATES, RenormLayer, renorm_layers

__all__ = ["count_updates", "UpdateCounter"]


@dataclasses.dataclass
class UpdateCounter:
    """What :func:`count_updates` returns: ``remove()`` unties the schedule (forwards count again)."""

    layers: dict[str, RenormLayer]
    optimizer: torch.optim.Optimizer
    _hook: Any

    def remove(self) -> None:
        self._hook.remove()
        for layer in self.layers.values():
            if layer.__dict__.pop(COUNTS_UPDATES, None) is not None:
                layer._renorm_rebuild()

    def step(self) -> None:
        """Advance every tied layer's step by one (what ``optimizer.step()`` does after its update)."""
        with torch.no_grad():
            for layer in self.layers.values():
                for site in layer.renorm_sites:
                    layer.get_buffer(site.step).add_(1)


def count_updates(model: nn.Module, optimizer: torch.optim.Optimizer) -> UpdateCounter:
    """Tie the schedule of every renorm layer of ``model`` to ``optimizer.step()``.

    Call it before ``torch.compile`` (it regenerates the layers' training forwards once; after,
    a compiled model recompiles once). The step is each layer's ``num_batches_tracked`` (saved in
    checkpoints, so resuming continues the count). A layer can be tied to one optimizer only:
    tie a critic to the critic's optimizer, not to the actor's.

    Raises ``ValueError`` if ``model`` has no renorm layer, if none of its parameters are in
    ``optimizer``, or if a layer is already tied.
    """
    layers = renorm_layers(model)
    if not layers:
        raise ValueError("count_updates: the model has no renorm layer; renormify(model) first.")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in owned for p in model.parameters()):
        raise ValueError(
            f"count_updates: none of the model's parameters are in this {type(optimizer).__name__}; tie the model "
            f"to the optimizer that updates it (for actor-critic: the critic to the critic's optimizer)."
        )
    tied = [name or type(layer).__name__ for name, layer in layers.items() if layer.__dict__.get(COUNTS_UPDATES)]
    if tied:
        raise ValueError(
            f"count_updates: {', '.join(map(repr, tied))} already count the updates of an optimizer; a layer's "
            f"schedule follows one optimizer. Call .remove() on the first handle to tie it to another."
        )
    for layer in layers.values():
        layer.__dict__[COUNTS_UPDATES] = True
        layer._renorm_rebuild()
    counter = UpdateCounter(layers, optimizer, None)
    counter._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: counter.step())
    return counter
