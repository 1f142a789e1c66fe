"""The spectral monitor's full-spectrum analysis, on a cadence of its own: each layer once every
``every_n_steps``, the layers spread evenly over the period's steps (so no step pays for all).

For a layer that is due: exact singular values in float32 (from the smaller Gram matrix), the
empirical spectral density's metrics (:func:`~lightning_stability.ops.spectrum.analyze_spectrum`:
power-law alpha, its KS distance, ``alpha_weighted``, ``log_norm``, the decay exponent, the count
above the Marchenko-Pastur edge), a histogram of the singular values (TensorBoard), and the tracker
re-seeded with the exact top pair.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_stability.core.lightning import log_metrics
from lightning_stability.ops.sharded import full
from lightning_stability.ops.spectral_tracker import SpectralTracker
from lightning_stability.ops.spectrum import analyze_spectrum, full_spectrum

LOGGED = ("alpha", "alpha_weighted", "log_norm", "decay", "mp_spikes", "ks")


class FullSpectra:
    """Which layers are due at a step, and the last analysis of each (``results``, checkpointed)."""

    def __init__(self, every_n_steps: int | None) -> None:
        self.every_n_steps = every_n_steps
        self.results: dict[str, dict[str, float]] = {}

    def due(self, names: list[str], step: int) -> list[str]:
        """Layer ``j`` of ``L`` is due when ``step % period == j * period // L``."""
        period = self.every_n_steps
        if period is None or not names:
            return []
        phase = step % period
        return [name for j, name in enumerate(names) if j * period // len(names) == phase]

    def run(self, trainer: pl.Trainer, tracker: SpectralTracker, step: int) -> None:
        """Analyse the layers due at ``step``, re-seed their tracking, and log what was found."""
        metrics: dict[str, float] = {}
        for name in self.due(list(tracker.layers), step):
            layer = tracker.layers[name]
            # sharded: this one weight is gathered whole (an all-gather), analysed, and let go
            weight = layer.matrix(full(layer.param.detach()))
            sv, u, v = full_spectrum(weight)
            stats = analyze_spectrum(weight, sv)
            del weight
            result = self.results[name] = stats.as_dict()
            tracker.set_exact(layer, sv[0], u, v)  # the exact top pair leads the block
            prefix = f"stability/spectral/{name}"
            for key in LOGGED:
                metrics[f"{prefix}/{key}"] = result[key]
            metrics[f"{prefix}/stable_rank_exact"] = result["stable_rank"]
            metrics[f"{prefix}/sigma_max_exact"] = result["sigma_max"]
            _log_histogram(trainer, f"{prefix}/singular_values", sv, step)
        log_metrics(trainer, metrics, force=True)


def _log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> None:
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ != "TensorBoardLogger":
            continue
        writer: Any = getattr(logger, "experiment", None)
        if hasattr(writer, "add_histogram"):
            writer.add_histogram(tag, values.detach().cpu(), global_step=step)
