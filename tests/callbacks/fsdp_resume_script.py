"""Run by test_fsdp.py as its own program (FSDP2 on 2 gloo ranks): SpectralMonitor's state across a
sharded checkpoint.

``full`` trains 20 steps, saves a distributed checkpoint and records each rank's tracking state at
that moment; ``resume`` restores the checkpoint and records the state before its first step. Each
rank holds its own rows of the left vectors, while the checkpoint's callback state is rank zero's.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch

from lightning_stability import SpectralMonitor
from tests.callbacks._fsdp_model import fsdp_trainer, sharded_gpt

SAVE_STEP = 20


def tracking_state(monitor: SpectralMonitor) -> dict[str, dict[str, list]]:
    """Each layer's vectors (this rank's rows of the left ones) and probes, as lists."""
    out = {}
    for name in monitor.layer_names:
        state = monitor._tracker.layer_state(name)
        vectors = {k: v.tolist() for k, v in state.items() if isinstance(v, torch.Tensor)}
        vectors.update({f"probes{i}": p.tolist() for i, p in enumerate(state.get("probes", []))})
        out[name] = vectors
    return out


class SaveAndRecord(pl.Callback):
    """After the monitor in the list: at the end of step ``SAVE_STEP``, save and record."""

    def __init__(self, monitor: SpectralMonitor, path: str) -> None:
        self.monitor, self.path, self.state = monitor, path, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == SAVE_STEP:
            trainer.save_checkpoint(self.path)  # every rank: a distributed checkpoint
            self.state = tracking_state(self.monitor)


class RecordAtStart(pl.Callback):
    def __init__(self, monitor: SpectralMonitor) -> None:
        self.monitor, self.state = monitor, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.state is None:
            self.state = tracking_state(self.monitor)


def main(out: str, mode: str) -> None:
    path = os.path.join(out, "sharded.ckpt")
    model, loader = sharded_gpt(SAVE_STEP + 2)
    monitor = SpectralMonitor(check_every_n_steps=5, warmup=10)
    if mode == "full":
        record: pl.Callback = SaveAndRecord(monitor, path)
        trainer = fsdp_trainer(out, SAVE_STEP + 1, [monitor, record])
        trainer.fit(model, loader)
    else:
        record = RecordAtStart(monitor)
        trainer = fsdp_trainer(out, SAVE_STEP + 1, [monitor, record])
        trainer.fit(model, loader, ckpt_path=path)
    saved = {}
    if mode == "full" and trainer.global_rank == 0:  # what the checkpoint holds (rank zero's callback state)
        meta = torch.load(os.path.join(path, "meta.pt"), weights_only=False)
        layers = meta["callbacks"][monitor.state_key]["layers"]
        saved = {name: {"u": len(s["u"]), "rows": monitor._tracker.layers[name].param.shape[0]} for name, s in layers.items()}
    with open(f"{out}/{mode}-rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"state": record.state, "saved": saved}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
