"""What a rollback copies and puts back beside the weights and optimizer state (the trainer's LR
schedulers, its AMP loss scaler and the states of the other stability callbacks), and whether the
snapshots fit in host memory on every rank."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_stability.callbacks._base import StabilityCallback, any_rank, grad_scaler
from lightning_stability.ops.optim_state import unwrap_optimizer
from lightning_stability.ops.snapshot import HostSnapshot
from lightning_stability.ops.snapshot_ring import (
    Slot,
    SnapshotRing,
    host_memory_problem,
    mib,
    snapshot_bytes_estimate,
)

MemoryProblem = Callable[[pl.Trainer, int, str], "str | None"]


def optimizers(trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
    return [unwrap_optimizer(o) for o in trainer.optimizers]


def memory_problem(trainer: pl.Trainer, owner: str, keep: int, keep_given: bool, needed: int, what: str,
                   max_host_bytes: int | None) -> str | None:
    """Why ``needed`` more bytes of snapshots (``what``) do not fit in this process's share of host memory, or ``None``."""
    ranks = max(int(getattr(trainer, "num_devices", 1)), 1) if trainer.world_size > 1 else 1
    return host_memory_problem(owner, keep, keep_given, needed, what, max_host_bytes, ranks)


def refuse_short_memory(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str, keep: int,
                        problem_of: MemoryProblem) -> None:
    """Refuse, before the first snapshot, ``keep`` snapshots that do not fit; every rank refuses
    together (one may be short of memory, the others would wait for it)."""
    per_snapshot = snapshot_bytes_estimate(pl_module, optimizers(trainer))
    problem = problem_of(trainer, per_snapshot * keep, f"keep={keep} snapshots of {mib(per_snapshot)}")
    if any_rank(trainer, [problem is not None])[0]:
        raise ValueError(problem or f"{owner}(keep={keep}): another rank lacks host memory")


def rewindable(trainer: pl.Trainer, exclude: type) -> list[StabilityCallback]:
    """The stability callbacks whose state goes back with a rollback (every one but the rollbacks, ``exclude``,
    and those that keep what they know, ``rewinds = False``)."""
    callbacks = getattr(trainer, "callbacks", [])
    return [cb for cb in callbacks if isinstance(cb, StabilityCallback) and not isinstance(cb, exclude) and cb.rewinds]


def trainer_extras(trainer: pl.Trainer, exclude: type) -> dict[str, Any]:
    """The trainer's part of a snapshot (``HostSnapshot.extra``)."""
    return {
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "callbacks": {cb.state_key: cb.snapshot_state() for cb in rewindable(trainer, exclude)},
        "scaler": scaler.state_dict() if (scaler := grad_scaler(trainer)) is not None else None,
    }


def capture_into(
    ring: SnapshotRing,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    memory_problem: MemoryProblem,
    exclude: type,
) -> tuple[Slot | None, int, str | None]:
    """Capture the training state into the ring's next slot: ``(slot, bytes newly needed, None)``; or
    ``(None, bytes, problem)`` when the new slot does not fit in host memory on some rank (every rank
    gives it up together)."""
    slot = ring.free_slot()
    needed = slot.snapshot.bytes_needed(pl_module, optimizers(trainer))
    problem = memory_problem(trainer, needed, "the new snapshot slot") if needed else None
    if any_rank(trainer, [problem is not None])[0]:
        ring.release(slot)
        return None, needed, problem
    slot.snapshot.capture(trainer.global_step, pl_module, optimizers(trainer), trainer_extras(trainer, exclude))
    return slot, needed, None


@torch.no_grad()
def restore_training_state(
    trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: HostSnapshot, exclude: type
) -> None:
    """Put the whole snapshot back, in place: weights, optimizer state, generators and the trainer's part."""
    for p in pl_module.parameters():
        p.grad = None  # gradients of the discarded step must not leak into the next one
    snapshot.restore(pl_module, optimizers(trainer))
    for config, state in zip(trainer.lr_scheduler_configs, snapshot.extra["schedulers"]):
        config.scheduler.load_state_dict(copy.deepcopy(state))  # the slot may be restored again
    callbacks = snapshot.extra["callbacks"]
    for cb in rewindable(trainer, exclude):
        if cb.state_key in callbacks:
            cb.restore_snapshot_state(callbacks[cb.state_key])
    scaler = grad_scaler(trainer)
    if scaler is not None and snapshot.extra["scaler"] is not None:
        scaler.load_state_dict(snapshot.extra["scaler"])


def skip_step(trainer: pl.Trainer) -> None:
    """Keep the optimizer steps of this batch from changing anything: every optimizer's gradients go
    (manual optimization may step several after one backward)."""
    for opt in trainer.optimizers:
        for group in unwrap_optimizer(opt).param_groups:
            for p in group["params"]:
                p.grad = None
