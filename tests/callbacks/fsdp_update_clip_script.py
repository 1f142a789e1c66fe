"""Run by test_fsdp.py as its own program (FSDP2 on 2 gloo ranks): SPECTRA's update clipping on row shards.

A SpectralUpdateClip on three weights of the sharded TinyGPT: tall (132 x 33, rows 66/66), uneven
(99 x 33, rows 50/49) and wide (33 x 132, rows 17/16). Hooks registered before the clip's gather each
whole weight before the step and the optimizer's raw result; after the step the clipped weight is
gathered too, so that the test can apply the unsharded rule to the whole update.
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl

from lightning_stability.ops.spectral import SpectralUpdateClip
from tests.callbacks._fsdp_model import fsdp_trainer, sharded_gpt

NAMES = ("blocks.0.mlp.0.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.2.weight")
C = 0.5


class Probe(pl.Callback):
    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        params = dict(pl_module.named_parameters())
        self.weights = [params[n] for n in NAMES]
        opt = trainer.optimizers[0]
        self.opt = opt

        def before(optimizer, args, kwargs):
            self.current = {"lr": optimizer.param_groups[0]["lr"], "before": [w.full_tensor().tolist() for w in self.weights]}

        def raw(optimizer, args, kwargs):
            self.current["raw"] = [w.full_tensor().tolist() for w in self.weights]

        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(raw)  # before the clip's own post-hook: the optimizer's result
        self.clip = SpectralUpdateClip(opt, C, params=self.weights)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.current["after"] = [w.full_tensor().tolist() for w in self.weights]
        self.records.append(self.current)


def main(out: str) -> None:
    model, loader = sharded_gpt(4)
    probe = Probe()
    trainer = fsdp_trainer(out, 4, [probe])
    trainer.fit(model, loader)
    shards = {n: list(dict(model.named_parameters())[n].to_local().shape) for n in NAMES}
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"records": probe.records, "c": C, "shards": shards}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
