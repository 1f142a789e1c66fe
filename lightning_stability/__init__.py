"""lightning_stability: Lightning callbacks and plugins that keep neural-network training stable.

``import lightning_stability`` stays light: it never imports Transformer Engine, bitsandbytes or
TensorBoard; those load only when a component that needs them is used.
"""

from lightning_stability.callbacks import (
    HALTED_EXIT_CODE,
    GradientSpikeGuard,
    InMemoryRollback,
    LowBitOptimizer,
    QuarantineSampler,
    SkipQuarantined,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
    StabilityPanels,
    TrainingHalted,
    halt_report,
    read_quarantine,
)
from lightning_stability.events import EventLog, StabilityEvent, get_event_log, read_events
from lightning_stability.ops.saturation import stablemax_cross_entropy, z_loss
from lightning_stability.ops.spectral import SpectralUpdateClip, analyze_model
from lightning_stability.plugins import FP8Precision, resolve_precision

__version__ = "0.1.0"

__all__ = [
    "HALTED_EXIT_CODE",
    "EventLog",
    "FP8Precision",
    "GradientSpikeGuard",
    "InMemoryRollback",
    "LowBitOptimizer",
    "QuarantineSampler",
    "SkipQuarantined",
    "SoftmaxSaturationMonitor",
    "SpectralMonitor",
    "SpectralUpdateClip",
    "StabilityEvent",
    "StabilityPanels",
    "TrainingHalted",
    "__version__",
    "analyze_model",
    "get_event_log",
    "halt_report",
    "read_events",
    "read_quarantine",
    "resolve_precision",
    "stablemax_cross_entropy",
    "z_loss",
]
