"""Run by test_ddp.py as its own program: the guard's repairs under DDP, from a fault on one rank.

Rank 1 alone multiplies the gradient flowing back from its output by 1000, 3000 and 9000 at steps
40, 44 and 48 (before DDP's all-reduce: the loss is untouched, the averaged gradient spikes on every
rank). Each spike comes back larger within the recovery window, so with ``patience=1`` the guard
climbs one rung a detection: skip, reset_moments, lr_backoff (without ``clip``, which would absorb
these spikes and stay). The report
hashes the weights and the whole optimizer state (moments, step counts, learning rates).
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import lightning.pytorch as pl
import torch

from lightning_stability import GradientSpikeGuard, get_event_log
from lightning_stability.demos import TinyGPT, make_dataloader

SPIKES = {40: 1000.0, 44: 3000.0, 48: 9000.0}


class GradientSpikeOnOneRank(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        def spike(module, args, out):
            if trainer.global_rank == 1 and trainer.global_step in SPIKES and out.requires_grad:
                factor = SPIKES[trainer.global_step]
                out.register_hook(lambda grad: grad * factor)

        pl_module.lm_head.register_forward_hook(spike)


def state_digest(model, optimizer) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            h.update(key.encode())
            h.update(value.detach().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode())
    for group in optimizer.param_groups:
        h.update(repr(group["lr"]).encode())
    return h.hexdigest()


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 120, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=56, warmup_steps=10)
    guard = GradientSpikeGuard(warmup=16, ladder=("skip", "reset_moments", "lr_backoff"), patience=1,
                               reset_warmup=5, lr_backoff_steps=4, lr_backoff_factor=0.25)
    digests = {}

    class Digest(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step - 1 in SPIKES:  # right after each repair
                digests[trainer.global_step - 1] = state_digest(pl_module, trainer.optimizers[0])

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=56,
        callbacks=[GradientSpikeOnOneRank(), guard, Digest()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    events = [(e.step, e.kind, e.action) for e in get_event_log(trainer) if e.severity != "info"]
    spike_norms = [e.metrics["grad_norm"] / e.metrics["grad_baseline"] for e in get_event_log(trainer)
                   if e.kind == "grad_spike"]
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"events": events, "digests": digests, "final": state_digest(model, trainer.optimizers[0]),
                   "spike_ratios": spike_norms, "finite": finite}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
