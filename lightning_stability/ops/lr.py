"""Scale learning rates for one optimizer step only, so LR schedulers are never fought.

A component scales ``param_groups[i]["lr"]`` in an optimizer step pre-hook and the post-hook puts the
scheduler's values back. Several components may scale the same step: the first to scale saves the
original values, every one multiplies, and the first post-hook restores the originals exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_SAVED = "_lightning_stability_saved_lr"


def scale_lr_for_step(optimizer: torch.optim.Optimizer, factors: Sequence[float]) -> None:
    """Multiply each group's LR by its factor until :func:`restore_lr` (call from a step pre-hook)."""
    if len(factors) != len(optimizer.param_groups):
        raise ValueError(
            f"scale_lr_for_step(factors={list(factors)!r}): expected one factor per param group "
            f"({len(optimizer.param_groups)})"
        )
    if _SAVED not in optimizer.__dict__:
        optimizer.__dict__[_SAVED] = [group["lr"] for group in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, factors):
        if factor != 1.0:
            group["lr"] = group["lr"] * factor


def restore_lr(optimizer: torch.optim.Optimizer) -> None:
    """Put back the LRs saved by the first :func:`scale_lr_for_step` of this step (a no-op otherwise)."""
    saved = optimizer.__dict__.pop(_SAVED, None)
    if saved is not None:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr
