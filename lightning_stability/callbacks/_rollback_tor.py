"""The Training Overhead Ratio (TOR) of a fit with rollbacks: the share of its training time that counted.

TOR is ideal time over observed time. Observed: the wall time of the optimizer steps plus the time
spent taking and restoring snapshots. Ideal: the observed time less the time of steps whose work was
skipped or discarded by a rollback, and less the snapshot and restore time.

No Lightning here: the callback tells the meter when a step ended, which steps were skipped and what
a rollback discarded.
"""

from __future__ import annotations

from typing import Any


class TorMeter:
    """Times the optimizer steps and counts what was lost (see the module docstring)."""

    def __init__(self) -> None:
        self.observed_s = 0.0  # wall time of optimizer steps, without the rollback's own work
        self.lost_s = 0.0  # of which: skipped steps and steps discarded by a rollback
        self.snapshot_s = 0.0
        self.restore_s = 0.0
        self.discarded_steps = 0  # discarded by rollbacks
        self.discarded_until = -1  # steps before this were already counted as discarded
        self.skipped_steps = 0  # skipped, outside the discarded ones
        # per step, since the oldest snapshot held (all discarded on a rollback to it)
        self.durations: dict[int, float] = {}
        self.skipped: set[int] = set()

    @property
    def tor(self) -> float:
        """Ideal training time over observed training time (1.0 before any step)."""
        observed = self.observed_s + self.snapshot_s + self.restore_s
        if observed <= 0:
            return 1.0
        return max(0.0, observed - self.lost_s - self.snapshot_s - self.restore_s) / observed

    @property
    def lost_steps(self) -> int:
        """Optimizer steps whose work did not count: discarded by a rollback, or skipped."""
        return self.discarded_steps + self.skipped_steps

    def skip(self, step: int) -> None:
        """The optimizer step ``step`` did not update the weights."""
        self.skipped.add(step)

    def step_ended(self, step: int, elapsed: float, halted: bool = False) -> None:
        """Optimizer step ``step`` took ``elapsed`` seconds; after a halt every step is lost time."""
        self.observed_s += elapsed
        self.durations[step] = self.durations.get(step, 0.0) + elapsed
        if step in self.skipped:
            self.lost_s += elapsed
            self.skipped_steps += 1
        if halted:
            self.lost_s += elapsed
            self.skipped_steps += 1

    def discard(self, since: int, step: int) -> None:
        """A rollback at ``step`` discarded the work of the steps from ``since`` on."""
        lost = [k for k in self.durations if k >= since]
        self.lost_s += sum(self.durations[k] for k in lost if k not in self.skipped)
        self.discarded_steps += step - max(since, self.discarded_until)  # a second rollback to the same snapshot
        self.discarded_until = step
        self.skipped_steps -= len([k for k in self.skipped if k >= since])  # now counted as discarded
        for k in lost:
            self.durations.pop(k, None)
        self.skipped = {k for k in self.skipped if k < since}

    def prune(self, oldest: int) -> None:
        """Forget per-step records before ``oldest`` (no rollback can discard them now)."""
        self.durations = {k: v for k, v in self.durations.items() if k >= oldest}
        self.skipped = {k for k in self.skipped if k >= oldest}

    def summary(self) -> dict[str, float]:
        return {
            "tor": self.tor,
            "lost_steps": float(self.lost_steps),
            "observed_seconds": self.observed_s + self.snapshot_s + self.restore_s,
            "lost_seconds": self.lost_s,
            "snapshot_seconds": self.snapshot_s,
            "restore_seconds": self.restore_s,
        }

    def report(self, owner: str, rollbacks: int, snapshots: int, slots: int, nbytes: int) -> tuple[dict[str, float], str]:
        """The end of a fit: the ``tor`` event's metrics and the line that tells them."""
        summary = {"tor": self.tor, "rollbacks": float(rollbacks),
                   **{k: v for k, v in self.summary().items() if k != "tor"},
                   "snapshots": float(snapshots), "snapshot_bytes": float(nbytes)}
        line = (f"{owner}: {rollbacks} rollbacks, {self.lost_steps} steps lost, Training Overhead Ratio "
                f"{self.tor:.4f}; {snapshots} snapshots of {nbytes / max(slots, 1) / 2**20:.1f} MiB, "
                f"{self.snapshot_s:.3f} s taking them.")
        return summary, line

    # The callback's checkpoint keys (kept from before the meter was its own piece).
    def state_dict(self) -> dict[str, Any]:
        return {
            "observed_seconds": self.observed_s,
            "lost_seconds": self.lost_s,
            "snapshot_seconds": self.snapshot_s,
            "restore_seconds": self.restore_s,
            "lost_steps": self.discarded_steps,
            "discarded_until": self.discarded_until,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.observed_s = float(state.get("observed_seconds", 0.0))
        self.lost_s = float(state.get("lost_seconds", 0.0))
        self.snapshot_s = float(state.get("snapshot_seconds", 0.0))
        self.restore_s = float(state.get("restore_seconds", 0.0))
        self.discarded_steps = int(state.get("lost_steps", 0))
        self.discarded_until = int(state.get("discarded_until", -1))
        self.skipped_steps = int(state.get("skipped_steps", 0))
