"""The rollback's snapshots: the ring of host-memory slots, their probation, when one is due, and
whether they fit in host memory on every rank.

The callback asks for a snapshot and for each step's probation; this piece captures into the ring,
commits or discards slots, and says what happened through ``emit`` (its events).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_stability.callbacks._rollback_state import capture_into, memory_problem, refuse_short_memory
from lightning_stability.ops.snapshot_ring import SnapshotRing

Emit = Callable[[str, str, dict[str, float], None], object]  # (kind, severity, metrics, action)


class Snapshots:
    """``keep`` slots with ``commit_after`` steps of probation, for the callback ``owner``.

    ``due``: a snapshot was postponed (its step was in trouble) and comes at the next healthy step.
    ``saved_ring``: the ring's steps as of the last checkpoint (the snapshots themselves are not saved).
    """

    def __init__(self, owner: type, keep: int, commit_after: int, keep_given: bool,
                 max_host_bytes: int | None) -> None:
        self.owner, self.keep, self.keep_given, self.max_host_bytes = owner, keep, keep_given, max_host_bytes
        self.ring = SnapshotRing(keep, commit_after)
        self.reset()

    def reset(self) -> None:
        self.taken = 0
        self.due = False
        self.saved_ring: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        ring = self.ring.meta() if self.ring.slots else self.saved_ring
        return {"ring": [dict(r) for r in ring], "snapshots_taken": self.taken, "snapshot_due": self.due}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_ring = [dict(r) for r in state.get("ring", [])]
        self.taken = int(state.get("snapshots_taken", 0))
        self.due = bool(state.get("snapshot_due", False))
        self.ring.clear()  # the snapshots of the saved run lived in another process's memory

    def release(self) -> None:
        """Give the host memory back, keeping the ring's steps for a checkpoint."""
        self.saved_ring = self.ring.meta()
        self.ring.clear()

    def first(self, step: int) -> tuple[bool, bool] | None:
        """The snapshot a fit starting at ``step`` takes, as (announce, committed); ``None``: none yet.

        A fault in the first steps can be undone too. A resumed fit has the ring's steps but not its
        snapshots: one taken at the checkpoint's own step is the state just restored, captured again
        without a new event; a snapshot that was postponed comes at the next healthy step, as it would
        have without the interruption."""
        ring = {int(r["step"]): bool(r["committed"]) for r in self.saved_ring}
        if step in ring:
            return False, ring[step]
        return None if self.due else (True, False)

    def problem(self, trainer: pl.Trainer, needed: int, what: str) -> str | None:
        return memory_problem(trainer, self.owner.__name__, self.keep, self.keep_given, needed, what,
                              self.max_host_bytes)

    def refuse_short_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_short_memory(trainer, pl_module, self.owner.__name__, self.keep, self.problem)

    def take(self, trainer: pl.Trainer, pl_module: pl.LightningModule, emit: Emit, announce: bool = True,
             committed: bool = False) -> float | None:
        """Capture the training state into the next slot; the seconds it took, or ``None`` when the
        slot does not fit (mid-fit: better to go on with the snapshots held than to stop the run)."""
        start = time.perf_counter()
        self.due = False
        slot, needed, problem = capture_into(self.ring, trainer, pl_module, self.problem, self.owner)
        if slot is None:
            emit("snapshot_skipped", "info", {"bytes": float(needed)}, None)
            rank_zero_warn(f"{problem or 'another rank lacks host memory'}; this snapshot is skipped.")
            return None
        slot.committed = committed
        seconds = time.perf_counter() - start
        if announce:
            self.taken += 1
            emit("snapshot", "info", {"bytes": float(slot.snapshot.nbytes), "seconds": seconds}, None)
        return seconds

    def probation(self, step: int, trouble: bool, emit: Emit) -> bool:
        """Advance the probation of the slots by one step; ``True`` when the ring's oldest step may have changed."""
        committed, discarded = self.ring.probation(step, trouble)
        for k in discarded:
            emit("snapshot_discarded", "info", {"snapshot_step": float(k)}, None)
        for k in committed:
            emit("snapshot_committed", "info", {"snapshot_step": float(k)}, None)
        # While the ring is unchanged its oldest step is too, and nothing new is old enough to drop.
        return bool(discarded) or not self.ring.slots
