"""Run by test_ddp.py as its own program: halts and exceptions on one rank under DDP
(``python ddp_halt_script.py OUT MODE``, MODE one of the keys of ``MODES``)."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import sys
import warnings

import lightning.pytorch as pl
import torch

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
    get_event_log,
)
from lightning_stability.demos import TinyGPT, make_dataloader
from tests.callbacks._two_ranks import each_mode
from tests.callbacks.ddp_guard_script import OnOneRank

FAIL_STEP = 15
WATCHDOG_S = 90
MODES = ("nan_weight", "halt_stop", "halt_raise", "user_error_rank1", "user_error_rank0", "hook_error_rank1")


class Fails(pl.Callback):
    """A user's callback that raises on one rank only, just before the optimizer step (where the other
    rank goes on into the stability callbacks' collectives)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == self.rank and trainer.global_step == FAIL_STEP:
            raise ValueError(f"user check failed on rank {self.rank} at step {FAIL_STEP}")


def main(out: str, mode: str) -> None:
    warnings.filterwarnings("ignore")
    # a deadlock ends here, with every thread's stack on stderr, instead of at the test's timeout
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 80, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=40, warmup_steps=5)
    with open(os.path.join(out, f"pid{os.environ.get('LOCAL_RANK', '0')}"), "w") as fh:
        fh.write(str(os.getpid()))

    def sample_ids(batch):
        # the rollback's sample-id function, raising on rank 1 only: an exception inside our hook
        trainer = model.trainer
        if mode == "hook_error_rank1" and trainer.global_rank == 1 and trainer.global_step == FAIL_STEP:
            raise RuntimeError(f"sample ids unreadable on rank 1 at step {FAIL_STEP}")
        return batch["index"]

    guard = GradientSpikeGuard(on_halt="raise" if mode == "halt_raise" else "stop")
    callbacks: list[pl.Callback] = [guard, SpectralMonitor(check_every_n_steps=5), SoftmaxSaturationMonitor(every_n_steps=5)]
    if mode.startswith("halt") or mode == "nan_weight":
        # a NaN written into a weight of rank 1 alone: every later loss there is NaN; with no rollback
        # to repair it the guard's ladder climbs (skip, reset_moments, lr_backoff) to halt
        callbacks.insert(0, OnOneRank(1, {12: ("weight_nan", None)}))
    if not mode.startswith("halt"):
        # not on the NaN loss itself: the spectral monitor's check of the weights asks for it
        callbacks.append(InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3, rollback_on_nonfinite_loss=False,
                                          sample_ids=sample_ids))
    if mode.startswith("user_error"):
        callbacks.insert(0, Fails(int(mode[-1])))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=40, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    events = [(e.step, e.kind, e.source, e.action) for e in get_event_log(trainer) if e.severity != "info"]
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"events": events, "report": guard.halt_report, "global_step": trainer.global_step,
                   "digest": hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest(),
                   "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}, fh)


if __name__ == "__main__":
    each_mode(main, sys.argv[1:])
