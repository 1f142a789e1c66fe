"""Benchmarks for lightning_stability: ``python -m benchmarks`` (see docs/benchmarks.md)."""
