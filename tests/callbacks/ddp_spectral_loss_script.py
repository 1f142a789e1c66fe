"""Run by test_spectral_monitor.py as its own program (Lightning's DDP launcher re-executes it per rank):
the ranks' losses differ tenfold, and the check after an intervention must judge the same loss on both."""

from __future__ import annotations

import json
import sys
import warnings

import lightning.pytorch as pl
import torch

from lightning_stability import SpectralMonitor, get_event_log
from lightning_stability.demos import TinyGPT, make_dataloader


class RankScaledGPT(TinyGPT):
    """Rank 1's loss is 10x rank 0's (each rank's own data, as in any DDP run, only more so)."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * (1.0 + 9.0 * self.global_rank)


class Bump(pl.Callback):
    """A rank-one bump in one weight at the end of step 30, on every rank alike."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == 30:
            w = pl_module.blocks[0].mlp[0].weight
            g = torch.Generator().manual_seed(1)
            a, b = torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g)
            with torch.no_grad():
                w.add_(5.0 * torch.linalg.matrix_norm(w, 2) * torch.outer(a / a.norm(), b / b.norm()))


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 100, seed=0)
    model = RankScaledGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=45, warmup_steps=10)
    monitor = SpectralMonitor(check_every_n_steps=5, warmup=20, ladder=("cap",), loss_tolerance=0.1,
                              full_every_n_steps=None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=45, callbacks=[Bump(), monitor],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    events = [(e.step, e.kind, e.action, e.target) for e in get_event_log(trainer) if e.source == monitor.source]
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"events": events, "last_loss": monitor.state_dict()["last_loss"]}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
