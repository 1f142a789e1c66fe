"""The shared layer: each cross-cutting concern written once, used by every callback and plugin.

=====================  ==================================================================
module                 concern
=====================  ==================================================================
``step_loss``          the optimizer step's loss: unscaled, accumulation-aware, fed once
``schedule``           when to measure: a cadence of its own, never the logging cadence
``escalation``         the escalation ladder, hysteresis and budgets, all counted in steps
``agreement``          statistics and flags agreed between ranks in one collective
``lr_backoff``         the one owner of per-step LR scaling (requests compose by the smallest factor)
``modules``            module discovery: the output head, attention layers, linear-like layers
``lightning``          where the layer meets Lightning: the logging path, halting, trainer lookups
=====================  ==================================================================

Everything here but ``lightning`` takes models, optimizers, losses and step numbers, and no
``Trainer``, so that a Fabric training loop can use the same pieces.
"""
