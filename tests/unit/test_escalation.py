from __future__ import annotations

import pytest

from lightning_stability.core.escalation import ACTIONS, EscalationLadder, cosine_ramp, validate_ladder


def test_detection_starts_at_first_rung_that_repairs_it():
    ladder = EscalationLadder(ACTIONS, patience=3, cooldown=5)
    assert ladder.start_rung("grad_spike") == 0  # clip
    assert ladder.start_rung("element_spike") == 0
    assert ladder.start_rung("nonfinite") == 1  # skip: a NaN cannot be clipped
    assert ladder.start_rung("loss_spike") == 1


def test_escalates_every_patience_and_resets_after_cooldown():
    ladder = EscalationLadder(ACTIONS, patience=2, cooldown=3)
    seen = [ladder.decide("grad_spike") for _ in range(7)]
    assert seen == ["clip", "clip", "skip", "skip", "reset_moments", "reset_moments", "lr_backoff"]
    assert [ladder.healthy() for _ in range(3)] == [False, False, True]
    assert ladder.decide("grad_spike") == "clip"


def test_healthy_steps_inside_cooldown_do_not_reset():
    ladder = EscalationLadder(ACTIONS, patience=1, cooldown=3)
    assert ladder.decide("nonfinite") == "skip"
    ladder.healthy()
    ladder.healthy()
    assert ladder.decide("nonfinite") == "reset_moments"


def test_unavailable_rollback_falls_to_next_rung():
    ladder = EscalationLadder(("rollback", "halt"), patience=1, cooldown=3)
    assert ladder.decide("grad_spike", unavailable={"rollback"}) == "halt"
    only = EscalationLadder(("clip", "rollback"), patience=1, cooldown=3)
    only.decide("grad_spike", unavailable={"rollback"})
    assert only.decide("grad_spike", unavailable={"rollback"}) == "clip"


def test_state_round_trip():
    ladder = EscalationLadder(ACTIONS, patience=1, cooldown=10)
    ladder.decide("grad_spike")
    ladder.decide("grad_spike")
    ladder.healthy()
    other = EscalationLadder(ACTIONS, patience=1, cooldown=10)
    other.load_state_dict(ladder.state_dict())
    assert other.decide("grad_spike") == ladder.decide("grad_spike") == "reset_moments"


@pytest.mark.parametrize(
    ("ladder", "error", "match"),
    [
        ((), ValueError, "at least one"),
        (("clip", "explode"), ValueError, "unknown action 'explode'"),
        (("skip", "skip"), ValueError, "once"),
        ("skip", TypeError, "sequence"),
    ],
)
def test_validate_ladder_rejects(ladder, error, match):
    with pytest.raises(error, match=match):
        validate_ladder(ladder)


def test_cosine_ramp_endpoints_and_monotone():
    values = [cosine_ramp(k, 10) for k in range(12)]
    assert values[0] == pytest.approx(0.01)
    assert values[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert values[10] == values[11] == 1.0
    assert all(a < b for a, b in zip(values[:10], values[1:11]))
