"""Run by test_fsdp.py as its own program: Lightning re-executes this file per rank (FSDP2 on 2 gloo ranks).

With ``with_rollback`` an InMemoryRollback comes before the guard in the list: the guard's one
all-reduce a step carries the rollback's flags, and the rollback calls no collective of its own to
agree on them (its calls are recorded)."""

from __future__ import annotations

import json
import math
import sys

import lightning.pytorch as pl
import torch

from lightning_stability import GradientSpikeGuard, InMemoryRollback, get_event_log
from tests.callbacks._fsdp_model import CountCollectives, fsdp_trainer, sharded_gpt
from tests.callbacks._two_ranks import each_mode
from tests.callbacks.ddp_guard_script import (
    OnOneRank,  # under FSDP a gradient fault lands on that rank's rows
)
from tests.callbacks.ddp_rollback_script import count_own_agreements


def full_grad_norm(pl_module) -> float:
    """The unsharded gradient's norm: every gradient gathered whole (a test-only reference)."""
    grads = [p.grad.full_tensor() for p in pl_module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))) if grads else math.nan


class Record(pl.Callback):
    """After the guard: the guard's norm against the gathered gradient's, its collectives, and the norm
    of the gradient it lets through."""

    def __init__(self, guard: GradientSpikeGuard, counter: CountCollectives):
        self.guard, self.counter = guard, counter
        self.norms: list[tuple[int, float, float]] = []  # (step, guard's norm, the gathered gradient's norm before it)
        self.after: dict[int, float] = {}  # the norm of the gradient after the guard acted
        self.collectives: list[dict[str, int]] = []

    def on_train_start(self, trainer, pl_module):
        # the guard's measurement exists once it is set up for this trainer: wrap it to watch it
        measurement = self.guard._measure
        measure = self._counted(measurement.measure)

        def recorded(*args, **kwargs):
            out = measure(*args, **kwargs)
            self.norms.append((trainer.global_step, out.grad_norm, self._before))
            return out

        measurement.measure = recorded
        # a detection's layer norms, made whole: counted with the step's collectives
        measurement.whole_norms = self._counted(measurement.whole_norms)

    def _counted(self, fn):
        """``fn`` with the collectives it makes counted."""
        def counted(*args, **kwargs):
            self.counter.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.counter.active = False

        return counted

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.after[trainer.global_step] = full_grad_norm(pl_module)
        self.collectives.append(self.counter.reset())


class Before(pl.Callback):
    """Before the guard: the gathered gradient's norm as the guard will see it."""

    def __init__(self, record: Record):
        self.record = record

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.record._before = full_grad_norm(pl_module)


def main(out: str, mode: str = "guard") -> None:
    counter = CountCollectives()
    agreements = count_own_agreements()
    model, loader = sharded_gpt(60)
    # rank 1 alone: a NaN loss (its NaN gradients reach every rank's rows through the reduce-scatter)
    # and, after the reduce-scatter, its own rows of the gradient scaled by 1000
    faults = OnOneRank(1, {40: ("loss_nan", None), 50: ("grad_scale", 1000.0)})
    guard = GradientSpikeGuard()
    record = Record(guard, counter)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3) if mode == "with_rollback" else None
    callbacks = [faults, *([rollback] if rollback else []), Before(record), guard, record]
    trainer = fsdp_trainer(out, 60, callbacks)
    trainer.fit(model, loader)
    events = [(e.step, e.kind, e.action) for e in get_event_log(trainer)]
    clip = [e for e in get_event_log(trainer) if e.step == 50]
    finite = all(bool(torch.isfinite(p.to_local()).all()) for p in model.parameters())
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({
            "events": events, "finite": finite, "norms": record.norms, "collectives": record.collectives,
            "after_clip": record.after.get(50), "threshold_at_clip": clip[0].metrics.get("grad_threshold") if clip else None,
            "local_shapes": {n: list(p.to_local().shape) for n, p in model.named_parameters()},
            "agreements": agreements,
            "rollbacks": [(r["step"], r["restored_step"]) for r in rollback.rollbacks] if rollback else [],
        }, fh)


if __name__ == "__main__":
    each_mode(main, sys.argv[1:])
