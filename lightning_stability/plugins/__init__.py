"""Precision: the FP8 plugin (Transformer Engine on SM 8.9+ GPUs, an exact emulator everywhere) and the
flag resolver that composes it with the low-bit optimizer callback."""

from lightning_stability.plugins.flags import resolve_precision
from lightning_stability.plugins.fp8 import EmulatedFP8Linear, FP8Precision

__all__ = ["EmulatedFP8Linear", "FP8Precision", "resolve_precision"]
