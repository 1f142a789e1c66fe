"""Precision plugins: FP8 (emulated everywhere; Transformer Engine on Hopper to come)."""

from lightning_stability.plugins.fp8 import EmulatedFP8Linear, FP8Precision

__all__ = ["EmulatedFP8Linear", "FP8Precision"]
