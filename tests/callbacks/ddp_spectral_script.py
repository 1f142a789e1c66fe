"""Run by test_ddp.py as its own program: Lightning's DDP launcher re-executes this file per rank."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import lightning.pytorch as pl
import torch

from lightning_stability import InMemoryRollback, SpectralMonitor, get_event_log
from lightning_stability.demos import TinyGPT, make_dataloader
from tests.callbacks._two_ranks import each_mode


class Bump(pl.Callback):
    """A rank-one bump in one weight at the end of step 120, on every rank alike (as a bad update
    would be after the all-reduce)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == 120:
            w = pl_module.blocks[0].mlp[0].weight
            g = torch.Generator().manual_seed(1)
            a, b = torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g)
            with torch.no_grad():
                w.add_(5.0 * torch.linalg.matrix_norm(w, 2) * torch.outer(a / a.norm(), b / b.norm()))


class LossOnOneRank(pl.Callback):
    """Makes rank 1's loss much worse after the intervention (its batches only): the loss check after
    the intervention must see it through the rank average, and both ranks must then roll back."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and 125 <= trainer.global_step < 130:
            batch["targets"].copy_(torch.randint_like(batch["targets"], 0, pl_module.hparams.vocab_size))


def main(out: str, action: str = "pss") -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 300, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=140, warmup_steps=10)
    monitor = SpectralMonitor(check_every_n_steps=5, warmup=100, ladder=(action,), loss_tolerance=0.05,
                              full_every_n_steps=50)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=20, commit_after=5)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=140, callbacks=[Bump(), LossOnOneRank(), monitor, rollback],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    events = [(e.step, e.kind, e.action, e.target) for e in get_event_log(trainer) if e.source == monitor.source]
    rollbacks = [e.step for e in get_event_log(trainer) if e.kind == "rollback"]
    sigma = {k: v["sigma_max"] for k, v in monitor.estimates().items()}
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"digest": digest, "events": events, "rollbacks": rollbacks, "sigma": sigma}, fh)


if __name__ == "__main__":
    each_mode(main, sys.argv[1:])
