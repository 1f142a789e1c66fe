"""The guard's decisions, no Trainer: what it remembers about one optimizer, which detection a
step's statistics make, and the halt's report."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_stability.core.escalation import EvidenceLadder
from lightning_stability.ops.robust import RollingWindow

if TYPE_CHECKING:
    from lightning_stability.callbacks.spike_guard import GradientSpikeGuard

# Before arming, a gradient norm this many times the median of the (at least this many) healthy
# steps seen so far is a spike.
PRE_ARM_RATIO = 100.0
PRE_ARM_MIN_SAMPLES = 4
# A level the gradient norm keeps (spikes the loss shrugged off in at least SHIFT_MIN of the last
# SHIFT_SPAN steps) is a new level, not a spike: those norms enter the baseline, which then follows.
SHIFT_SPAN = 16
SHIFT_MIN = 8
SEVERITY = {"nonfinite": "critical", "grad_spike": "warning", "loss_spike": "warning", "element_spike": "warning",
            "lr_spike": "warning"}


class OptimizerTrack:
    """Everything the guard remembers about one optimizer."""

    def __init__(self, guard: GradientSpikeGuard) -> None:
        self.grad_window = RollingWindow(guard.window)
        self.loss_window = RollingWindow(guard.window)
        self.ladder = EvidenceLadder(guard.ladder, guard.patience, guard.cooldown, guard.recovery)
        self.shift: deque[bool] = deque(maxlen=SHIFT_SPAN)  # recent steps: a spike the loss shrugged off
        self.armed = False
        self.backoff_until = -1  # global step (exclusive) until which the LR is backed off
        self.warmup_from = -1  # first global step of the update warm-up after a moment reset
        self.warmup_groups: list[int] = []
        self.actions: dict[str, int] = {}
        self.lr_max: list[float] = []  # each parameter group's largest learning rate so far
        self.lr_high = 0  # steps in a row whose learning rate jumped (a new level after ``patience`` of them)

    def lr_ratio(self, lrs: list[float]) -> float:
        """The step's learning rate against the largest so far, the largest over parameter groups."""
        return max((lr / top for lr, top in zip(lrs, self.lr_max) if top > 0), default=0.0)

    def note_lr(self, lrs: list[float]) -> None:
        self.lr_max = [max(lr, top) for lr, top in zip(lrs, self.lr_max)] if len(lrs) == len(self.lr_max) else list(lrs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "grad_window": self.grad_window.state_dict(),
            "loss_window": self.loss_window.state_dict(),
            "ladder": self.ladder.state_dict(),
            "armed": self.armed,
            "backoff_until": self.backoff_until,
            "warmup_from": self.warmup_from,
            "warmup_groups": list(self.warmup_groups),
            "actions": dict(self.actions),
            "shift": list(self.shift),
            "lr_max": list(self.lr_max),
            "lr_high": self.lr_high,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_window.load_state_dict(state.get("grad_window", {}))
        self.loss_window.load_state_dict(state.get("loss_window", {}))
        self.ladder.load_state_dict(state.get("ladder", {}))
        self.armed = bool(state.get("armed", False))
        self.backoff_until = int(state.get("backoff_until", -1))
        self.warmup_from = int(state.get("warmup_from", -1))
        self.warmup_groups = [int(i) for i in state.get("warmup_groups", [])]
        self.actions = {str(k): int(v) for k, v in dict(state.get("actions", {})).items()}
        self.shift = deque((bool(b) for b in state.get("shift", [])), maxlen=SHIFT_SPAN)
        self.lr_max = [float(x) for x in state.get("lr_max", [])]
        self.lr_high = int(state.get("lr_high", 0))

    def in_reset_warmup(self, step: int, length: int) -> bool:
        """Within the ``length`` steps of the update warm-up after a moment reset."""
        return self.warmup_from >= 0 and step < self.warmup_from + length

    def level_shift(self, absorbed: bool) -> bool:
        """Record whether this step was a spike the loss shrugged off; ``True`` while such spikes are
        the norm's level rather than exceptions."""
        self.shift.append(absorbed)
        return absorbed and sum(self.shift) >= SHIFT_MIN


def detect(guard: GradientSpikeGuard, track: OptimizerTrack, stats: dict[str, float], loss: float | None,
           lrs: Sequence[float] = ()) -> str | None:
    """The detection that decides the step: of all that fired, the one needing the strongest rung.

    A learning rate ``lr_jump`` times the largest the run has used (a schedule's or a resume's mistake)
    is an ``lr_spike`` before its update is applied; one that stays up ``patience`` steps is a new level
    the guard accepts (a deliberate change). Warm restarts return to a rate used before: no spike.

    A corrupted batch shows as a loss spike *and* a gradient spike; the loss spike asks for a skip,
    which beats clipping the batch's gradient and applying it anyway. Marks each detection that fired
    in ``stats`` (``stats[kind] = 1``).
    """
    if not math.isfinite(stats["grad_norm"]) or (loss is not None and not math.isfinite(loss)):
        return "nonfinite"
    if not track.armed:
        track.note_lr(list(lrs))
        # Before the baselines are trustworthy only a wild outlier is called a spike, so even the
        # first steps never apply a gradient hundreds of times larger than any seen so far.
        wild = len(track.grad_window) >= PRE_ARM_MIN_SAMPLES and stats["grad_ratio"] >= PRE_ARM_RATIO
        if wild:
            stats["grad_spike"] = 1.0
        return "grad_spike" if wild else None
    fired = []
    lr_ratio = track.lr_ratio(list(lrs)) if guard.lr_jump is not None else 0.0
    track.lr_high = track.lr_high + 1 if lr_ratio >= (guard.lr_jump or math.inf) else 0
    if 0 < track.lr_high <= guard.patience:
        stats["lr_ratio"] = lr_ratio
        fired.append("lr_spike")
    else:
        track.note_lr(list(lrs))
    if stats["grad_zscore"] >= guard.grad_zscore and stats["grad_ratio"] >= guard.grad_ratio:
        fired.append("grad_spike")
    if loss is not None and stats["loss_zscore"] >= guard.loss_zscore:
        ratio = stats["loss_ratio"]
        if math.isnan(ratio) or ratio >= guard.loss_ratio:
            fired.append("loss_spike")
    if stats["spike_count"] > 0:
        fired.append("element_spike")
    if not fired:
        return None
    for kind in fired:
        stats[kind] = 1.0
    return max(fired, key=lambda kind: (track.ladder.start_rung(kind), -fired.index(kind)))


def loss_in_band(guard: GradientSpikeGuard, track: OptimizerTrack, stats: dict[str, float], loss: float | None) -> bool:
    """The step's loss is within its baseline band (not a loss spike by the guard's thresholds)."""
    if loss is None:
        return True
    if not math.isfinite(loss):
        return False
    if not track.armed or not math.isfinite(stats.get("loss_zscore", math.nan)):
        return True
    ratio = stats["loss_ratio"]
    return not (stats["loss_zscore"] >= guard.loss_zscore and (math.isnan(ratio) or ratio >= guard.loss_ratio))


def detection_size(detection: str, stats: dict[str, float]) -> float:
    """How large a detection is, to tell a recurrence at the same or a larger size from a smaller one."""
    if detection == "grad_spike":
        return stats["grad_ratio"]
    if detection == "loss_spike":
        return stats.get("loss_zscore", math.inf)
    if detection == "element_spike":
        return stats["spike_count"]
    if detection == "lr_spike":
        return stats["lr_ratio"]
    return math.inf


def describe_halt(owner: str, step: int, index: int, detection: str, stats: dict[str, float], track: OptimizerTrack) -> str:
    if detection == "loss_spike":
        statistic = f"loss {stats.get('loss', math.nan):.6g} against a baseline median of {stats.get('loss_baseline', math.nan):.6g}"
    else:
        statistic = (
            f"gradient norm {stats['grad_norm']:.6g} against a baseline median of {stats['grad_baseline']:.6g}"
            f" (robust z-score {stats['grad_zscore']:.3g}), {int(stats['spike_count'])} spiking elements"
        )
    tried = ", ".join(f"{a} x{n}" for a, n in track.actions.items()) or "nothing yet"
    return (
        f"{owner} halted training at optimizer step {step} (optimizer {index}): {detection} with "
        f"{statistic}. Interventions tried in this run: {tried}. The halted step was skipped."
    )
