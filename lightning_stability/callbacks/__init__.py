"""Lightning callbacks: thin adapters from Lightning hooks to the math in ``lightning_stability.ops``."""

from lightning_stability.callbacks.spike_guard import GradientSpikeGuard, TrainingHalted

__all__ = ["GradientSpikeGuard", "TrainingHalted"]
