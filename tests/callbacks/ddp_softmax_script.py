"""Run by test_ddp.py as its own program: Lightning's DDP launcher re-executes this file per rank."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import lightning.pytorch as pl

from lightning_stability import SoftmaxSaturationMonitor, get_event_log
from lightning_stability.demos import TinyGPT, make_dataloader
from tests.callbacks._two_ranks import each_mode


class ShiftOnOneRank(pl.Callback):
    """From step 10 to 29, rank 1's output logits all move up by 60: log Z drifts there only (the loss
    does not change), so only the ranks' combined statistics can make both ranks act alike."""

    def on_train_start(self, trainer, pl_module):
        def shift(module, args, out):
            if trainer.global_rank == 1 and 10 <= trainer.global_step < 30:
                return out + 60.0
            return None

        pl_module.lm_head.register_forward_hook(shift, prepend=True)


def main(out: str, remedy: str = "z_loss") -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 100, seed=0)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=45, warmup_steps=5)
    # max_logit_limit below the logits the model has: QK-clip runs from the first sample, with the
    # per-head maxima of both ranks (their data differ), so the replicas stay identical only if the
    # ranks scale alike
    # remedy: what the drift turns on (z-loss, the default; or the perpendicular gradient, which
    # projects every gradient against its weight before the step: the ranks must project alike)
    remedies = {"logit_drift": (remedy,)}
    monitor = SoftmaxSaturationMonitor(every_n_steps=5, logz_limit=20.0, max_logit_limit=0.5, cooldown=3,
                                       remedies=remedies)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=45, callbacks=[ShiftOnOneRank(), monitor],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    events = [(e.step, e.kind, e.action, e.target) for e in get_event_log(trainer) if e.source == monitor.source]
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"digest": digest, "events": events, "stats": monitor.last_stats}, fh)


if __name__ == "__main__":
    each_mode(main, sys.argv[1:])
