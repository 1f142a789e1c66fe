"""Run by test_ddp.py as its own program: two optimizers under manual optimization, under DDP.

Each batch steps optimizer ``a`` then ``b`` (two optimizer steps a batch). Rank 1 alone makes ``a``'s
loss NaN at batch 30 (optimizer step 60): the guard skips that step on both ranks, and the rollback,
its flags carried by the guard's collective, restores both ranks to the same snapshot.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_stability import GradientSpikeGuard, InMemoryRollback, get_event_log


class TwoParts(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        self.b = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss_a = (self.a(x) - x).pow(2).mean()
        if self.trainer.global_rank == 1 and batch_idx == 30:
            loss_a = loss_a * float("nan")
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        loss_b = (self.b(self.a(x).detach()) - y).pow(2).mean()
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.a.parameters(), 1e-2), torch.optim.AdamW(self.b.parameters(), 1e-2)


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 8, 8, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    model = TwoParts()
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=20, commit_after=4, sample_ids=None)
    # b's loss does not reach a's parameters: DDP must be told to expect unused parameters
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=1,
        callbacks=[rollback, GradientSpikeGuard(warmup=8)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(model, loader)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    events = [(e.step, e.kind, e.action) for e in get_event_log(trainer) if e.severity != "info"]
    rollbacks = [(r["step"], r["restored_step"]) for r in rollback.rollbacks]
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"events": events, "digest": digest, "rollbacks": rollbacks, "finite": finite}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
