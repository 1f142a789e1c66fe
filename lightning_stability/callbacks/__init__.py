"""Lightning callbacks: thin adapters from Lightning hooks to the math in ``lightning_stability.ops``."""

from lightning_stability.callbacks._base import HALTED_EXIT_CODE, TrainingHalted, halt_report
from lightning_stability.callbacks.low_bit_optimizer import LowBitOptimizer
from lightning_stability.callbacks.panels import StabilityPanels
from lightning_stability.callbacks.rollback import InMemoryRollback, read_quarantine
from lightning_stability.callbacks.skip_quarantined import QuarantineSampler, SkipQuarantined
from lightning_stability.callbacks.softmax_monitor import SoftmaxSaturationMonitor
from lightning_stability.callbacks.spectral_monitor import SpectralMonitor
from lightning_stability.callbacks.spike_guard import GradientSpikeGuard

__all__ = [
    "HALTED_EXIT_CODE",
    "GradientSpikeGuard",
    "InMemoryRollback",
    "LowBitOptimizer",
    "QuarantineSampler",
    "SkipQuarantined",
    "SoftmaxSaturationMonitor",
    "SpectralMonitor",
    "StabilityPanels",
    "TrainingHalted",
    "halt_report",
    "read_quarantine",
]
