"""Moved to :mod:`lightning_stability.core.escalation` (escalation is policy, not math); kept for imports."""

from lightning_stability.core.escalation import (  # noqa: F401
    ACTIONS,
    DETECTIONS,
    EscalationLadder,
    cosine_ramp,
    validate_ladder,
)
