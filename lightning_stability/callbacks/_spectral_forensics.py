"""What the spectral monitor adds to another callback's incident: its layers under the guard's names
(``named_parameters()``), and which layers' last update was largest against their weight.

The tracker measures every layer's update ratio ``||dW||_2 / ||W||_2`` each step on the device. When
another callback (the guard) reports a detection that names layers, the ratios of the step before it
(the last measured, on the host once, on that step only) go into an ``update_ratio`` event at the
detection's step: an optimizer-driven blow-up shows there as a jump before the loss moved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_stability.callbacks._spectral_policy import agreed_inputs
from lightning_stability.core.lightning import rank_gather
from lightning_stability.core.modules import parameter_names
from lightning_stability.events import StabilityEvent
from lightning_stability.ops.spectral_tracker import SpectralTracker
from lightning_stability.ops.spectral_weights import WeightMatrix

INCIDENT_LAYERS = 3  # layers named in an update_ratio event


class LayerForensics:
    """The layers' parameter names, and the incident steps of other callbacks (see the module docstring)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.parameters: dict[str, str] = {}  # layer -> its weight's name in named_parameters()
        self.incident_step = -1  # the step of another callback's latest detection that names layers
        self.last_measured = -1  # the latest step the tracker measured

    def build(self, module: nn.Module, weights: Sequence[WeightMatrix]) -> None:
        names = parameter_names(module)
        self.parameters = {w.name: names.get(id(w.param), w.name) for w in weights}

    def named(self, layer: str | None) -> dict[str, str] | None:
        """An event's ``details`` for ``layer``: its weight's name in ``named_parameters()``."""
        return {"parameter": self.parameters[layer]} if layer in self.parameters else None

    def see(self, event: StabilityEvent) -> None:
        if event.source != self.source and event.severity != "info" and event.details and "layers" in event.details:
            self.incident_step = event.step

    def update_ratios(
        self, trainer: pl.Trainer, tracker: SpectralTracker
    ) -> tuple[dict[str, float], dict[str, Any]] | None:
        """The ``update_ratio`` event's ``(metrics, details)``: the largest few layers,
        by parameter name, with the step they were measured at (``None``: none is finite). The ranks'
        worst figures (one collective, on the incident's step, which every rank shares): every rank's
        event is the same."""
        device = trainer.strategy.root_device
        stats, _ = agreed_inputs(tracker.estimates(), torch.zeros((), device=device), rank_gather(trainer), device,
                                 tracker.sharded)
        ranked = sorted(((s["update_ratio"], name) for name, s in stats.items() if math.isfinite(s["update_ratio"])),
                        reverse=True)[:INCIDENT_LAYERS]
        if not ranked:
            return None
        layers = [{"name": self.parameters.get(name, name), "ratio": ratio} for ratio, name in ranked]
        return {"update_ratio_max": ranked[0][0]}, {"layers": layers, "measured_at": self.last_measured}
