"""Run by test_ddp.py as its own program: a DDP fit with faults on one rank, whole or resumed from the
checkpoint of its first epoch (``python ddp_resume_script.py OUT full|resume``)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
    get_event_log,
)
from lightning_stability.demos import TinyGPT, make_dataloader
from tests.callbacks.ddp_guard_script import OnOneRank

EPOCH = 30  # optimizer steps an epoch, on each of the two ranks
STEPS = 2 * EPOCH


class StepData(pl.Callback):
    """Each step's batch is drawn from the step and the rank alone: Lightning's loops resume their data
    loaders at another position (a checkpoint at an epoch's end counts as inside it), and the
    comparison is about the callbacks, not about the loader."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        g = torch.Generator().manual_seed(1000 * trainer.global_step + trainer.global_rank)
        picks = torch.randint(0, len(self.dataset), (len(batch["index"]),), generator=g)
        items = [self.dataset[int(i)] for i in picks]
        for key in ("input_ids", "targets", "index"):
            batch[key].copy_(torch.stack([item[key] for item in items]))


def shift_on_one_rank(model: TinyGPT) -> None:
    """From step 24 to 39, rank 1's logits move up by 60: log Z drifts there only, and the z-loss the
    softmax monitor turns on is still on at the checkpoint (step 30). The hook is the model's own,
    registered before the fit (the monitor's soft-cap goes in front of it, resumed or not)."""

    def shift(module, args, out):
        trainer = model.trainer
        if trainer.global_rank == 1 and 24 <= trainer.global_step < 40:
            return out + 60.0
        return None

    model.lm_head.register_forward_hook(shift)


def main(out: str, mode: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 2 * EPOCH, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=STEPS, warmup_steps=5)
    shift_on_one_rank(model)
    # rank 1 alone: NaN losses on both sides of the checkpoint (rollbacks to the snapshots of steps 10
    # and 40) and a gradient corrupted after the all-reduce (the guard skips the step)
    faults = OnOneRank(1, {15: ("loss_nan", None), 46: ("loss_nan", None), 52: ("grad_scale", 1000.0)})
    guard = GradientSpikeGuard(window=32, warmup=8)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    spectral = SpectralMonitor(check_every_n_steps=5, warmup=10, full_every_n_steps=20)
    softmax = SoftmaxSaturationMonitor(every_n_steps=5, warmup=5, logz_limit=20.0, cooldown=3,
                                       remedies={"logit_drift": ("z_loss", "softcap", "advise")})
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=-1, save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS,
        callbacks=[StepData(ds), faults, guard, spectral, softmax, rollback, ckpt],
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    path = os.path.join(out, "ckpt", f"epoch=0-step={EPOCH}.ckpt") if mode == "resume" else None
    trainer.fit(model, loader, ckpt_path=path)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    result = {
        "digest": digest,
        "events": [e.to_dict() for e in get_event_log(trainer)],
        "guard": guard.state_dict(),
        "softmax": softmax.state_dict(),
        "sigma": {k: v["sigma_max"] for k, v in spectral.estimates().items()},
        "rollbacks": [(r["step"], r["restored_step"]) for r in rollback.rollbacks],
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    }
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
