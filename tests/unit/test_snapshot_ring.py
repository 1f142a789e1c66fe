"""The rollback's pure pieces: the snapshot ring and its probation, the TOR meter, the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_stability.callbacks._rollback_budget import RollbackHistory
from lightning_stability.callbacks._rollback_tor import TorMeter
from lightning_stability.ops.snapshot_ring import SnapshotRing, ring_shape


def _fill(ring: SnapshotRing, step: int, model: nn.Module) -> None:
    ring.free_slot().snapshot.capture(step, model, [])


def test_ring_shape_follows_what_was_passed():
    assert ring_shape("R", 100, None, None) == (2, 20)
    assert ring_shape("R", 1, None, None) == (3, 1)
    assert ring_shape("R", 20, None, None) == (2, 19)
    assert ring_shape("R", 10, None, 25) == (4, 25)
    with pytest.raises(ValueError, match="commit_after < every_n_steps"):
        ring_shape("R", 10, 2, 10)


def test_probation_commits_after_healthy_steps_and_discards_on_trouble():
    model = nn.Linear(2, 2)
    ring = SnapshotRing(keep=3, commit_after=2)
    _fill(ring, 0, model)
    assert ring.probation(1, trouble=False) == ([], [])
    assert ring.probation(2, trouble=False) == ([0], [])
    _fill(ring, 3, model)
    assert ring.probation(4, trouble=True) == ([], [3])
    assert [s.step for s in ring.slots] == [0]
    assert ring.newest_good() is not None and ring.newest_good().step == 0


def test_the_newest_good_snapshot_is_never_overwritten():
    model = nn.Linear(2, 2)
    ring = SnapshotRing(keep=2, commit_after=1)
    _fill(ring, 0, model)
    ring.probation(1, trouble=False)  # step 0 committed
    _fill(ring, 1, model)
    _fill(ring, 2, model)  # reuses the slot of step 1, not the good one of step 0
    assert sorted(s.step for s in ring.slots) == [0, 2]
    ring.distrust()
    assert [s.step for s in ring.slots] == [0]
    assert ring.meta() == [{"step": 0, "committed": True}]
    assert ring.nbytes == sum(t.numel() * t.element_size() for t in model.parameters())


def test_tor_meter_counts_discarded_and_skipped_steps_once():
    tor = TorMeter()
    for step in range(4):
        tor.step_ended(step, 1.0)
    tor.skip(4)
    tor.step_ended(4, 1.0)
    assert (tor.skipped_steps, tor.lost_s) == (1, 1.0)
    tor.discard(since=2, step=5)  # steps 2, 3 and the skipped 4 are discarded
    assert tor.lost_steps == 3 and tor.skipped_steps == 0
    assert tor.lost_s == 3.0
    assert tor.tor == pytest.approx(2.0 / 5.0)
    restored = TorMeter()
    restored.load_state_dict(tor.state_dict())
    assert (restored.tor, restored.lost_steps) == (tor.tor, tor.lost_steps)


def test_budget_counts_requests_in_the_window_including_this_one():
    history = RollbackHistory(max_rollbacks=2, budget_window=10)
    history.unavailable.append(1)
    history.rollbacks.append({"step": 5, "restored_step": 0, "reason": "x"})
    assert history.requests_in_window(8) == 3 and history.over_budget(8)
    assert history.requests_in_window(12) == 2 and not history.over_budget(12)
    assert "step 5 -> 0 (x)" in history.halt_report("R", 8, 3, 0, "ckpt", "q.json")


def test_snapshot_captures_copy_not_alias():
    model = nn.Linear(2, 2)
    before = model.weight.detach().clone()
    ring = SnapshotRing(keep=2, commit_after=1)
    _fill(ring, 0, model)
    with torch.no_grad():
        model.weight.add_(1.0)
    ring.slots[0].snapshot.restore(model, [])
    torch.testing.assert_close(model.weight.detach(), before)
