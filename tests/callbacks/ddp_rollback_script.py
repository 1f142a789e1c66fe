"""Run by test_ddp.py as its own program: Lightning's DDP launcher re-executes this file per rank.

With ``guard_after``, a GradientSpikeGuard comes after the rollback in the callback list: its
collective, later in the same hook, carries the rollback's flags, and the rollback calls no
collective of its own to agree on them. ``accumulate`` does the same with two micro-batches an
optimizer step (twice the batches: the NaN loss and the quarantine cover both of a step's).
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import lightning.pytorch as pl
import torch

import lightning_stability.callbacks._rollback_state as rollback_state
import lightning_stability.callbacks.rollback as rollback_module
from lightning_stability import GradientSpikeGuard, InMemoryRollback, get_event_log
from lightning_stability.demos import TinyGPT, make_dataloader
from tests.callbacks._two_ranks import each_mode
from tests.callbacks.ddp_guard_script import OnOneRank


class RequestOnOneRank(pl.Callback):
    """Asks for a rollback through the event log on one rank only."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            get_event_log(trainer).emit(trainer.global_step, "my_check", "MyMonitor", "critical", {}, "rollback")


def count_own_agreements() -> list[int]:
    """From now on, the steps in which InMemoryRollback agrees with the other ranks by itself (its own
    ``any_rank`` collective: the step's flags, the snapshots' memory checks), appended to the list returned."""
    agreements: list[int] = []
    for module in (rollback_module, rollback_state):
        own = module.any_rank

        def counted(trainer, flags, own=own):
            agreements.append(trainer.global_step)
            return own(trainer, flags)

        module.any_rank = counted
    return agreements


def main(out: str, mode: str = "alone") -> None:
    warnings.filterwarnings("ignore")
    agreements = count_own_agreements()
    pl.seed_everything(0, verbose=False)
    accumulate = 2 if mode == "accumulate" else 1
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 120 * accumulate, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=60, warmup_steps=10)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    # a NaN loss on rank 1 alone at step 25; a rollback request on rank 0 alone at step 44
    callbacks = [OnOneRank(1, {25: ("loss_nan", None)}), RequestOnOneRank(0, 44), rollback]
    if mode in ("guard_after", "accumulate"):
        callbacks.append(GradientSpikeGuard(ladder=("skip",)))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=60, callbacks=callbacks, accumulate_grad_batches=accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    rollbacks = [(r["step"], r["restored_step"], r["quarantined"]) for r in rollback.rollbacks]
    events = [(e.step, e.kind) for e in get_event_log(trainer) if e.source == rollback.source]
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"digest": digest, "rollbacks": rollbacks, "events": events, "finite": finite,
                   "agreements": agreements}, fh)


if __name__ == "__main__":
    each_mode(main, sys.argv[1:])
