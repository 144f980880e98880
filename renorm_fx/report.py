"""What renorm layers report: the bounds of their next step, and their last step's r, d and clipping."""

from __future__ import annotations

import dataclasses

from torch import nn

from .layer import renorm_layers

__all__ = ["bounds", "diagnostics", "LayerDiagnostics"]


def _sites(model: nn.Module):  # (qualified name, layer, site) for every converted call
    for prefix, layer in renorm_layers(model).items():
        for site in layer.renorm_sites:
            rel = site.name[len(layer.renorm_name):].lstrip(".") if site.name.startswith(layer.renorm_name) else ""
            yield ".".join(p for p in (prefix, rel) if p), layer, site


def bounds(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The ``(r_max, d_max)`` the next training step of each renorm layer will use, by qualified name."""
    return {name: layer.renorm_schedule.at(int(layer.get_buffer(site.step)))
            for name, layer, site in _sites(model)}


@dataclasses.dataclass(frozen=True)
class LayerDiagnostics:
    """A renorm layer's last good training step (all zeros before the first)."""

    step: int  # training steps counted so far (num_batches_tracked)
    bounds: tuple[float, float]  # the (r_max, d_max) that step used
    r_range: tuple[float, float]  # min and max of r over the channels
    d_range: tuple[float, float]  # min and max of d over the channels
    clipped_fraction: float  # fraction of channels whose r or d the clip changed
    nonfinite_batches: int  # training batches skipped for NaN / Inf


def diagnostics(model: nn.Module) -> dict[str, LayerDiagnostics]:
    """Per renorm layer (by qualified name): its last step's r, d and clipping.

    Recorded in the graph at every training step (a few per-channel values, no host sync);
    reading them here syncs once per layer. With virtual batches, ``r`` and ``d`` are each
    channel's average over the groups and ``clipped_fraction`` counts (group, channel) pairs.
    """
    out: dict[str, LayerDiagnostics] = {}
    for name, layer, site in _sites(model):
        layer.renorm_report_nonfinite()
        r, d, clipped = layer.get_buffer(site.diagnostics).detach().cpu().double()
        step = int(layer.get_buffer(site.step))
        out[name] = LayerDiagnostics(
            step=step,
            bounds=layer.renorm_schedule.at(max(step - 1, 0)),
            r_range=(r.min().item(), r.max().item()),
            d_range=(d.min().item(), d.max().item()),
            clipped_fraction=clipped.mean().item(),
            nonfinite_batches=int(layer.get_buffer(site.nonfinite)),
        )
    return out
