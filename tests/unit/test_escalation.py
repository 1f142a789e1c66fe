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


# -- EvidenceLadder: climb on evidence that the rung below failed ------------------------------------
def _evidence(**kwargs):
    from lightning_stability.core.escalation import EvidenceLadder

    return EvidenceLadder(ACTIONS, **{"patience": 2, "cooldown": 50, "recovery": 10, **kwargs})


def test_spikes_that_clip_absorbs_stay_at_clip_however_often_they_come():
    ladder = _evidence()
    actions = []
    for step in range(0, 200, 2):  # a spike every other step, the loss in its band throughout
        ladder.observe(step, in_band=True)
        actions.append(ladder.decide("grad_spike", step=step, size=3.0 + (step % 7), in_band=True))
    assert set(actions) == {"clip"} and not ladder.persistent


def test_a_rung_climbs_only_when_the_fault_comes_back_as_large_or_larger():
    ladder = _evidence()
    ladder.observe(0, False)
    assert ladder.decide("loss_spike", step=0, size=10.0, in_band=False) == "skip"
    ladder.observe(1, True)
    assert ladder.decide("loss_spike", step=2, size=8.0, in_band=False) == "skip"  # smaller: skipping helps
    ladder.observe(3, True)
    assert ladder.decide("loss_spike", step=4, size=9.0, in_band=False) == "skip"  # larger than 8: one failure
    ladder.observe(5, True)
    assert ladder.decide("loss_spike", step=6, size=9.5, in_band=False) == "reset_moments"  # second failure


def test_a_detection_after_the_recovery_window_starts_again_at_the_bottom():
    ladder = _evidence(patience=1)
    assert ladder.decide("loss_spike", step=0, size=5.0, in_band=False) == "skip"
    assert ladder.decide("loss_spike", step=2, size=5.0, in_band=False) == "reset_moments"
    for step in range(3, 14):
        ladder.observe(step, True)
    assert ladder.decide("loss_spike", step=14, size=50.0, in_band=False) == "skip"  # the last one was repaired


def test_destructive_rungs_wait_for_a_lost_run_and_say_the_run_is_noisy_instead():
    noisy = _evidence(patience=1)
    got = []
    for step in range(0, 12, 2):  # the loss comes back to its band between the spikes
        noisy.observe(step, False)
        got.append(noisy.decide("loss_spike", step=step, size=5.0 + step, in_band=False))
        noisy.observe(step + 1, True)
    assert got == ["skip", "reset_moments", "lr_backoff", "lr_backoff", "lr_backoff", "lr_backoff"]
    assert noisy.persistent

    lost = _evidence(patience=1)
    got = []
    for step in range(15):  # the loss never comes back to its band, a spike every step
        lost.observe(step, False)
        got.append(lost.decide("loss_spike", step=step, size=5.0, in_band=False))
    # for ``recovery`` (10) steps a loss spike after a skipped step is the batches' fault: skipped through;
    # then the run is lost and the ladder climbs as before
    assert got == ["skip"] * 10 + ["reset_moments", "lr_backoff", "rollback", "halt", "halt"]
    assert not lost.persistent


def test_a_non_finite_step_that_comes_back_is_a_lost_run_and_unavailable_rungs_are_passed():
    ladder = _evidence(patience=1)
    assert ladder.decide("nonfinite", step=0) == "skip"
    assert ladder.decide("nonfinite", step=1) == "reset_moments"
    assert ladder.decide("nonfinite", step=2) == "lr_backoff"
    assert ladder.decide("nonfinite", step=3, unavailable={"rollback"}) == "halt"


def test_another_fault_after_a_repaired_one_starts_its_own_incident_unless_the_loss_stayed_out():
    repaired = _evidence(patience=1)
    repaired.observe(40, False)
    assert repaired.decide("nonfinite", step=40, in_band=False) == "skip"
    for step in range(41, 50):
        repaired.observe(step, True)  # the skip repaired it
    assert repaired.decide("grad_spike", step=50, size=1000.0, in_band=True) == "clip"

    stayed_out = _evidence(patience=1)
    stayed_out.observe(40, False)
    assert stayed_out.decide("loss_spike", step=40, size=5.0, in_band=False) == "skip"
    for step in range(41, 50):
        stayed_out.observe(step, False)  # the loss never came back: the same incident, climbing
    assert stayed_out.decide("grad_spike", step=50, size=1000.0, in_band=False) == "reset_moments"


def test_the_evidence_ladder_resumes_exactly():
    a, b = _evidence(), _evidence()
    for step in range(5):
        a.observe(step, step % 2 == 0)
        a.decide("grad_spike", step=step, size=float(step), in_band=step % 2 == 0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert b.decide("loss_spike", step=6, size=9.0, in_band=False) == a.decide("loss_spike", step=6, size=9.0, in_band=False)


def test_a_burst_of_bad_batches_is_skipped_through_while_spaced_spikes_climb():
    burst = _evidence(patience=1)
    # five loss spikes in a row, each after a skipped step: the weights never changed, the batches did
    assert [burst.decide("loss_spike", step=s, size=5.0, in_band=False) for s in range(100, 105)] == ["skip"] * 5
    # a gradient spike in between is no batch fault of the skip's: it climbs as before
    mixed = _evidence(patience=1)
    assert mixed.decide("loss_spike", step=0, size=5.0, in_band=False) == "skip"
    assert mixed.decide("grad_spike", step=1, size=5.0, in_band=False) != "skip"
    # and a loss spike two steps after the skipped one (a step was applied between) counts as its failure
    spaced = _evidence(patience=1)
    assert spaced.decide("loss_spike", step=0, size=5.0, in_band=False) == "skip"
    assert spaced.decide("loss_spike", step=2, size=5.0, in_band=False) == "reset_moments"
