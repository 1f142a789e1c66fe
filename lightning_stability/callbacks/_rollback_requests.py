"""What the event log asks of the rollback in a step: a rollback (and why), and whether the step is in
trouble (so that a snapshot on probation is not trusted and a new one is postponed).

Events from the stability callbacks are seen alike on every rank; any other event (a user's check)
may have been seen on one rank only, and is held as *pending* until the ranks agree on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_stability.core.escalation import ACTIONS
from lightning_stability.events import StabilityEvent

# Actions after which the optimizer step did not update the weights (every rung above ``clip`` skips
# the step): its time is lost time.
SKIPPING_ACTIONS = frozenset(ACTIONS) - {"clip"}


def troubling(event: StabilityEvent) -> bool:
    """Does the event say the training state may be going bad (so a snapshot on probation is not
    trusted)? A critical event, or a warning that something acted on: a detection the guard answered,
    an intervention. Advice alone (a monitor's warning with no action, or ``advise``) observes a slow
    trend, not a corrupted state: it does not discard snapshots."""
    if event.severity == "critical":
        return True
    return event.severity == "warning" and event.action not in (None, "advise", "warn")


class Requests:
    """This step's rollback request and trouble, and those still pending the ranks' agreement."""

    def __init__(self, nonfinite_patience: int = 1) -> None:
        self.request: str | None = None
        self.trouble = False
        self.pending_request: str | None = None
        self.pending_trouble = False
        self.nonfinite_patience = nonfinite_patience  # optimizer steps in a row with a non-finite loss
        self.streak = 0  # that many so far, the last at step ``last_nonfinite``
        self.last_nonfinite = -2

    def note(self, event: StabilityEvent, same_on_all_ranks: bool) -> None:
        if event.action == "rollback":
            reason = f"{event.kind} (from {event.source})"
            if same_on_all_ranks:
                self.request = self.request or reason
            else:
                self.pending_request = self.pending_request or reason
        if troubling(event):
            if same_on_all_ranks:
                self.trouble = True
            else:
                self.pending_trouble = True

    def pending_flags(self) -> list[bool]:
        return [self.pending_request is not None, self.pending_trouble]

    def agree(self, request: bool, trouble: bool, nonfinite: bool, step: int = 0, corrupted: bool = False) -> None:
        """The ranks' agreement: pending flags set on any rank, and a non-finite loss on any rank. A
        non-finite loss asks for a rollback once ``nonfinite_patience`` steps in a row had one (a bad
        batch is skipped; a state that makes every loss NaN is restored), or at once where the state is
        ``corrupted`` (a buffer went non-finite in the forward)."""
        if request:
            self.request = self.request or self.pending_request or "a request on another rank"
        self.trouble = self.trouble or trouble
        self.pending_request, self.pending_trouble = None, False
        if nonfinite:
            self.streak = self._streak_at(step)
            self.last_nonfinite = step
            if self.streak >= self.nonfinite_patience or corrupted:
                self.request = self.request or "nonfinite_loss"
            self.trouble = True

    def patient(self, step: int) -> bool:
        """A non-finite loss at ``step`` would not ask for a rollback by itself (the streak is too short):
        only then is the state's corruption worth a look."""
        return self._streak_at(step) < self.nonfinite_patience

    def _streak_at(self, step: int) -> int:
        """The streak a non-finite loss at ``step`` makes: one more right after the last, else a new one."""
        return self.streak + 1 if step - self.last_nonfinite <= 1 else 1

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_streak": [self.streak, self.last_nonfinite]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak, self.last_nonfinite = (int(x) for x in state.get("nonfinite_streak", [0, -2]))

    def take(self) -> tuple[bool, str, bool]:
        """``(requested, reason, trouble)`` for the step that just ended; cleared for the next one."""
        requested, trouble = self.request is not None, self.trouble
        reason = self.request or "a request on another rank"
        self.request, self.trouble = None, False
        return requested, reason, trouble


def nonfinite_buffers(module: nn.Module) -> bool:
    """Whether a floating-point buffer holds a NaN or an infinity (BatchNorm's running statistics after a
    NaN batch): one host read, on a non-finite step only."""
    flags = [~torch.isfinite(b).all() for b in module.buffers() if b.is_floating_point() and b.numel()]
    return bool(torch.stack(flags).any()) if flags else False
