"""Tests that run each example for a few steps."""

from __future__ import annotations

# the benchmarks load the examples the same way: one loader serves both
from benchmarks.instabilities import EXAMPLES, load_example

__all__ = ["EXAMPLES", "load_example"]
