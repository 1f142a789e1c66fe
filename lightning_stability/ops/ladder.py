"""The escalation ladder: which intervention a detection gets, by its kind and by repetition.

Pure Python, no Lightning: the guard feeds it detections and healthy steps, it answers with an action.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

ACTIONS = ("clip", "skip", "reset_moments", "lr_backoff", "rollback", "halt")
DETECTIONS = ("nonfinite", "grad_spike", "loss_spike", "element_spike")
# Clipping repairs a gradient with a few huge elements or a too-large norm; it cannot repair a
# non-finite gradient, and a loss spike with a normal gradient norm leaves nothing to clip.
_CLIP_REPAIRS = frozenset({"grad_spike", "element_spike"})


def validate_ladder(
    ladder: Sequence[str], owner: str = "ladder", actions: Sequence[str] = ACTIONS
) -> tuple[str, ...]:
    if isinstance(ladder, str) or not isinstance(ladder, Sequence):
        raise TypeError(f"{owner}={ladder!r}: expected a sequence of actions from {list(actions)}")
    rungs = tuple(ladder)
    if not rungs:
        raise ValueError(f"{owner}={ladder!r}: expected at least one action from {list(actions)}")
    for action in rungs:
        if action not in actions:
            raise ValueError(f"{owner}: unknown action {action!r}; expected one of {list(actions)}")
    if len(set(rungs)) != len(rungs):
        raise ValueError(f"{owner}={ladder!r}: each action may appear once")
    return rungs


def cosine_ramp(k: int, length: int, start: float = 0.01) -> float:
    """Update warm-up factor ``k`` steps after a moment reset: ``start`` at 0, 1 from ``length`` on."""
    if k >= length:
        return 1.0
    if k <= 0:
        return start
    return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * k / length))


class EscalationLadder:
    """Picks a rung for each detection and climbs with repetition.

    A detection starts at the first rung that can repair it (by default the guard's rules: ``clip``
    repairs only gradient and element spikes; ``repairs`` maps an action to the detections it can
    repair, and an action it does not list repairs any). Every ``patience`` detections without ``cooldown`` healthy steps in between
    climb one rung. ``cooldown`` consecutive healthy steps bring it back to the bottom.
    ``rollback`` is used only where a responder is available; otherwise the next rung is taken.
    """

    def __init__(
        self,
        rungs: Sequence[str] = ACTIONS,
        patience: int = 3,
        cooldown: int = 50,
        actions: Sequence[str] = ACTIONS,
        detections: Collection[str] = DETECTIONS,
        repairs: Mapping[str, Collection[str]] | None = None,
        fallback: str = "skip",
    ) -> None:
        self.rungs = validate_ladder(rungs, actions=actions)
        self.detections = frozenset(detections)
        self.repairs = {"clip": _CLIP_REPAIRS} if repairs is None else dict(repairs)
        self.fallback = fallback  # the action when every rung is unavailable
        self.patience = patience
        self.cooldown = cooldown
        self.strikes = 0
        self.calm = 0

    def start_rung(self, detection: str) -> int:
        if detection not in self.detections:
            raise ValueError(
                f"EscalationLadder: unknown detection {detection!r}; expected one of {sorted(self.detections)}"
            )
        for i, action in enumerate(self.rungs):
            if action not in self.repairs or detection in self.repairs[action]:
                return i
        return len(self.rungs) - 1

    def decide(self, detection: str, unavailable: Collection[str] = ()) -> str:
        """Record a detection and return the action for it."""
        rung = min(self.start_rung(detection) + self.strikes // self.patience, len(self.rungs) - 1)
        self.strikes += 1
        self.calm = 0
        while rung < len(self.rungs) - 1 and self.rungs[rung] in unavailable:
            rung += 1
        action = self.rungs[rung]
        if action in unavailable:
            # nothing above it: fall back to the strongest rung that is available
            available = [a for a in self.rungs if a not in unavailable]
            action = available[-1] if available else self.fallback
        return action

    def healthy(self) -> bool:
        """Record a healthy step; ``True`` when this step ends an incident (the ladder resets)."""
        if self.strikes == 0:
            return False
        self.calm += 1
        if self.calm >= self.cooldown:
            self.strikes = 0
            self.calm = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"strikes": self.strikes, "calm": self.calm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strikes = int(state.get("strikes", 0))
        self.calm = int(state.get("calm", 0))
