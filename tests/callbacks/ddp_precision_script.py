"""Run by test_ddp.py as its own program: FP8Precision and LowBitOptimizer under DDP, 2 gloo ranks."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import lightning.pytorch as pl

from lightning_stability import FP8Precision, LowBitOptimizer, get_event_log
from lightning_stability.demos import TinyGPT, make_dataloader


class SpikeOnOneRank(pl.Callback):
    """At step 8, rank 1's input to blocks.0.mlp.0 is 1000x larger (a bad batch there only): only that
    rank's FP8 health sees the overflow."""

    def on_train_start(self, trainer, pl_module):
        def spike(module, args):
            if trainer.global_rank == 1 and trainer.global_step == 8 and module.training:
                return (args[0] * 1000.0,)
            return None

        pl_module.blocks[0].mlp[0].register_forward_pre_hook(spike)


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 100, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=64, n_layer=1, n_head=2, max_steps=20, warmup_steps=5)
    plugin = FP8Precision(backend="emulated", health_every_n_steps=1, patience=1, overflow_limit=0.1, cooldown=5)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=20, callbacks=[SpikeOnOneRank(), LowBitOptimizer()],
        plugins=[plugin], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(model, loader)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    events = [(e.step, e.kind, e.action, e.target) for e in get_event_log(trainer) if e.source == "FP8Precision"]
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"digest": digest, "events": events, "optimizer": type(trainer.optimizers[0]).__name__,
                   "health": plugin.last_health}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
