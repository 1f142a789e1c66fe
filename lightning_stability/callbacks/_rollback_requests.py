"""What the event log asks of the rollback in a step: a rollback (and why), and whether the step is in
trouble (so that a snapshot on probation is not trusted and a new one is postponed).

Events from the stability callbacks are seen alike on every rank; any other event (a user's check)
may have been seen on one rank only, and is held as *pending* until the ranks agree on it.
"""

from __future__ import annotations

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

    def __init__(self) -> None:
        self.request: str | None = None
        self.trouble = False
        self.pending_request: str | None = None
        self.pending_trouble = False

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

    def agree(self, request: bool, trouble: bool, nonfinite: bool) -> None:
        """The ranks' agreement: pending flags set on any rank, and a non-finite loss on any rank."""
        if request:
            self.request = self.request or self.pending_request or "a request on another rank"
        self.trouble = self.trouble or trouble
        self.pending_request, self.pending_trouble = None, False
        if nonfinite:
            self.request = self.request or "nonfinite_loss"
            self.trouble = True

    def take(self) -> tuple[bool, str, bool]:
        """``(requested, reason, trouble)`` for the step that just ended; cleared for the next one."""
        requested, trouble = self.request is not None, self.trouble
        reason = self.request or "a request on another rank"
        self.request, self.trouble = None, False
        return requested, reason, trouble
