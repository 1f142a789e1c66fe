"""Precision plugins (FP8, low-bit optimizers) and the flag resolver."""
