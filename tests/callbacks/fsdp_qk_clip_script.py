"""Run by test_fsdp.py as its own program (FSDP2 on 2 gloo ranks): QK-clip on row-sharded projections.

The fused qkv weight has 99 rows (3 heads of 11 for each of q, k, v), 50 on rank 0 and 49 on rank 1:
the key heads' rows span both ranks. ``max_logit_limit`` below the logits the model has makes QK-clip
act at every sample. Around each clip the whole weight is gathered (test-only) before and after, with
the per-head maxima the monitor used, so the test can apply the unsharded rule to it.
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl

from lightning_stability import SoftmaxSaturationMonitor, get_event_log
from tests.callbacks._fsdp_model import fsdp_trainer, sharded_gpt

LAYER = "blocks.0.attn"


def whole(pl_module) -> dict[str, list]:
    qkv = pl_module.blocks[0].attn.qkv
    return {"weight": qkv.weight.full_tensor().tolist(), "bias": qkv.bias.full_tensor().tolist()}


class Before(pl.Callback):
    def __init__(self) -> None:
        self.weights: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step - 1] = whole(pl_module)


class After(pl.Callback):
    def __init__(self, monitor: SoftmaxSaturationMonitor, before: Before) -> None:
        self.monitor, self.before = monitor, before
        self.clips: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if any(e.step == trainer.global_step and e.kind == "qk_clip" for e in get_event_log(trainer)):
            stats = self.monitor.last_stats
            heads = [stats[f"{LAYER}/max_logit_head{h}"] for h in range(3)]
            self.clips.append({"step": step, "heads": heads, "before": self.before.weights[step],
                               "after": whole(pl_module)})


def main(out: str) -> None:
    model, loader = sharded_gpt(12)
    monitor = SoftmaxSaturationMonitor(every_n_steps=5, max_logit_limit=0.5, cooldown=3)
    before = Before()
    after = After(monitor, before)
    trainer = fsdp_trainer(out, 12, [before, monitor, after])
    trainer.fit(model, loader)
    events = [(e.step, e.kind, e.action, e.target) for e in get_event_log(trainer)]
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"events": events, "clips": after.clips, "tau": monitor.qk_clip_tau,
                   "alpha": monitor.qk_clip_alpha}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
