"""Run by test_ddp.py as its own program: Lightning's DDP launcher re-executes this file per rank."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import lightning.pytorch as pl
import torch

from lightning_stability import GradientSpikeGuard, get_event_log
from lightning_stability.demos import FaultInjector, TinyGPT, make_dataloader


class OnOneRank(FaultInjector):
    """Injects its faults on one rank only."""

    def __init__(self, rank: int, faults):
        super().__init__(faults)
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == self.rank:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 120, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=60, warmup_steps=10)
    # rank 1 alone: a NaN loss (before DDP's all-reduce) and a gradient corrupted after the all-reduce
    faults = OnOneRank(1, {40: ("loss_nan", None), 50: ("grad_scale", 1000.0)})
    guard = GradientSpikeGuard()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=60, callbacks=[faults, guard],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    events = [(e.step, e.kind, e.action) for e in get_event_log(trainer)]
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"digest": digest, "events": events, "finite": finite}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
