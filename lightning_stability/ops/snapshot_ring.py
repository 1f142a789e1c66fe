"""A ring of host-memory snapshots, each on probation until enough healthy steps have followed it.

The ring reuses ``keep`` :class:`HostSnapshot` slots. A snapshot is *good* (committed, restorable)
once ``commit_after`` optimizer steps have passed after it without trouble; a step in trouble
discards every snapshot still on probation. The newest good snapshot is never overwritten by one on
probation, so a good state stays at hand while the next one proves itself.

No Lightning here: the callback says which steps are in trouble; this module keeps the slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_stability.ops.snapshot import (
    HostSnapshot,
    available_host_memory,
    estimate_optimizer_state_bytes,
    module_tensors,
    nbytes,
)


@dataclass
class Slot:
    snapshot: HostSnapshot = field(default_factory=HostSnapshot)
    committed: bool = False

    @property
    def step(self) -> int:
        return self.snapshot.step


class SnapshotRing:
    """``keep`` reusable snapshot slots and their probation (``commit_after`` healthy steps)."""

    def __init__(self, keep: int, commit_after: int) -> None:
        self.keep = keep
        self.commit_after = commit_after
        self.slots: list[Slot] = []

    @property
    def nbytes(self) -> int:
        """Host memory held by the slots."""
        return sum(slot.snapshot.nbytes for slot in self.slots)

    def clear(self) -> None:
        self.slots = []  # gives the host memory back

    def meta(self) -> list[dict[str, Any]]:
        """The ring's steps and probation, oldest first (what a checkpoint keeps of it)."""
        return [{"step": s.step, "committed": s.committed} for s in sorted(self.slots, key=lambda s: s.step)]

    def oldest_step(self, default: int) -> int:
        return min((s.step for s in self.slots), default=default)

    def free_slot(self) -> Slot:
        """A slot to capture into: a new one while the ring is short, else the oldest one that is not
        the newest good snapshot (that one is never given up for a snapshot still on probation)."""
        if len(self.slots) < self.keep:
            self.slots.append(Slot())
            return self.slots[-1]
        good = self.newest_good()
        slot = min((s for s in self.slots if s is not good), key=lambda s: s.step)
        self.slots.remove(slot)
        self.slots.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        """Give back a slot that was never filled (its capture was given up)."""
        if slot.step < 0:
            self.slots.remove(slot)

    def newest_good(self) -> Slot | None:
        good = [s for s in self.slots if s.committed]
        return max(good, key=lambda s: s.step) if good else None

    def probation(self, step: int, trouble: bool) -> tuple[list[int], list[int]]:
        """Advance the probation to ``step``: on trouble discard every snapshot on probation (taken while
        something was going wrong: never restore it), else commit those old enough.

        Returns the steps of the snapshots committed and of those discarded, in slot order.
        """
        committed: list[int] = []
        discarded: list[int] = []
        for slot in list(self.slots):
            if slot.committed:
                continue
            if trouble:
                self.slots.remove(slot)
                discarded.append(slot.step)
            elif step - slot.step >= self.commit_after:
                slot.committed = True
                committed.append(slot.step)
        return committed, discarded

    def distrust(self) -> None:
        """Drop every snapshot still on probation (before a rollback: only good ones are restored)."""
        self.slots = [s for s in self.slots if s.committed]


def ring_shape(owner: str, every_n_steps: int, keep: int | None, commit_after: int | None) -> tuple[int, int]:
    """``keep`` and ``commit_after`` (each already checked to be an int, or ``None``), each following
    what the user passed when left out.

    A snapshot must be committed before its slot is reused: ``commit_after < every_n_steps * (keep - 1)``.
    Left out, ``commit_after`` is 20 steps, shortened to fit the ring; ``keep`` is 2, or as many slots
    as the ``commit_after`` the user asked for needs.
    """
    if keep is None:
        if commit_after is not None:
            keep = max(2, commit_after // every_n_steps + 2)
        else:
            keep = 3 if every_n_steps == 1 else 2  # a snapshot every step: one more slot to commit one
    limit = every_n_steps * (keep - 1)
    if commit_after is None:
        if limit < 2:
            raise ValueError(
                f"{owner}(every_n_steps={every_n_steps}, keep={keep}): expected every_n_steps * (keep - 1) >= 2, "
                "or no snapshot could be committed before its slot is reused; raise keep"
            )
        commit_after = min(20, limit - 1)
    if commit_after >= limit:
        raise ValueError(
            f"{owner}(every_n_steps={every_n_steps}, keep={keep}, commit_after={commit_after}): expected "
            f"commit_after < every_n_steps * (keep - 1) = {limit}, or no snapshot could be committed before its "
            "slot is reused; raise keep or every_n_steps, or lower commit_after"
        )
    return keep, commit_after


def snapshot_bytes_estimate(module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> int:
    """Host bytes one snapshot of the module and its optimizers takes (their state estimated before it exists)."""
    return nbytes(module_tensors(module)) + sum(estimate_optimizer_state_bytes(o) for o in optimizers)


def mib(n: float) -> str:
    """A byte count for people: ``1.5 GiB``, ``12.0 MiB``, ``3 B``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def host_memory_problem(
    owner: str, keep: int, keep_given: bool, needed: int, what: str, max_host_bytes: int | None, local_ranks: int
) -> str | None:
    """Why ``needed`` bytes of snapshots (``what``) cannot be held in host memory, or ``None`` when they
    can. The limit is ``max_host_bytes``, else what the machine has available shared among the
    ``local_ranks`` processes on it (no limit where that cannot be read)."""
    if max_host_bytes is not None:
        limit, source = max_host_bytes, f"max_host_bytes={max_host_bytes}"
    else:
        available = available_host_memory()
        if available is None:
            return None
        limit = available // local_ranks
        source = f"{mib(available)} available on this machine" + (f", shared by {local_ranks} local ranks" if local_ranks > 1 else "")
    if needed <= limit:
        return None
    return (
        f"{owner}(keep={keep}): {what} need {mib(needed)} of host memory, more than "
        f"the {mib(limit)} this process may use ({source}). Lower keep{'' if keep_given else ' (2 by default)'} (>= 2), free host memory, "
        "or set max_host_bytes if the limit is wrong."
    )
