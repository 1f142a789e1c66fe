"""The guard's actions on the optimizer step it decided about: clip, skip, reset the moments, back
off the LR, or ask for a halt. The step's gradients are edited in place; nothing else is touched."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_stability.callbacks._spike_measure import StepMeasure
from lightning_stability.callbacks._spike_policy import OptimizerTrack
from lightning_stability.ops.optim_state import reset_moments_
from lightning_stability.ops.spikes import clip_element_spikes_


def apply_action(action: str, detection: str, opt: torch.optim.Optimizer, track: OptimizerTrack, step: int,
                 params: list[Tensor], grads: list[Tensor], measure: StepMeasure, stats: dict[str, float],
                 target: float, theta: float | None, lr_backoff_steps: int) -> bool:
    """Apply ``action`` to this step of ``opt``; ``True`` when it asks for a halt.

    ``clip`` clips the spiking elements (SPAM, against ``theta`` times the second moment) and, for a
    gradient spike, rescales the global norm to ``target`` (the spike threshold: the largest norm
    that is not a spike; rescaling to the median instead damps the steps after a level shift and
    leaves noisy high-LR runs measurably worse); every rung above it skips the step (the
    gradients are dropped), ``reset_moments`` also zeroes the moments of these parameters and starts
    the update warm-up, ``lr_backoff`` starts the back-off (the LR provider reads ``track``).
    """
    if action == "clip":
        if stats["spike_count"] > 0 and theta is not None:
            for p, g in zip(params, grads):  # a rare path: decode the moments again, one at a time
                clip_element_spikes_([g], measure.moments(opt, [p]), theta)  # type: ignore[list-item]
        if detection == "grad_spike" and math.isfinite(target) and target > 0:
            measure.rescale_norm(params, grads, target)  # after the element clip, if any
        return False
    for p in params:  # every rung above clip skips the step
        p.grad = None
    if action == "reset_moments":
        reset_moments_(opt, params)
        track.warmup_from = step + 1
        ids = {id(p) for p in params}
        track.warmup_groups = [i for i, g in enumerate(opt.param_groups) if any(id(p) in ids for p in g["params"])]
    elif action == "lr_backoff":
        track.backoff_until = step + 1 + lr_backoff_steps
    return action == "halt"
