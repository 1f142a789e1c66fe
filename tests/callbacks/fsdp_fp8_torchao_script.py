"""Run by test_fsdp.py as its own program (FSDP2 on 2 gloo ranks): ``FP8Precision(backend='torchao')``,
the model converted in ``configure_model`` before ``fully_shard``; torchao's conversion faked
(tests/plugins/_fake_torchao.py), or with the modes ``real-...`` the real torchao, its float8 training on
these CPUs through torch's CPU ``_scaled_mm`` (only the hardware check told it has an SM 9.0 GPU).

``blocks``: fully_shard on every block (FSDP2 gathers a block's weights before its layers run);
``layers``: on every converted layer too, so the plugin's hook runs before FSDP2's gather; ``real-gather-``
modes: with torchao's float8 all-gather (``float8_all_gather=True``). Each mode trains, names one layer by
an event on rank 1 only (it falls back to bf16 on both ranks at the next health check), saves a
distributed checkpoint with the layer in fallback, and resumes from it.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_stability import get_event_log
from lightning_stability.ops.fp8 import E4M3, current_scale, fp8_health
from lightning_stability.plugins import _te, _torchao
from lightning_stability.plugins.fp8 import FP8Precision
from tests.callbacks import _two_ranks as two_ranks
from tests.callbacks._fsdp_model import ShardedGPT, fsdp_trainer, sharded_gpt
from tests.plugins._fake_torchao import FakeFloat8Linear, install

REAL = len(sys.argv) > 2 and sys.argv[2].startswith("real")  # one launch runs the fake's modes or the real ones
if REAL:
    from torchao.float8.float8_linear import Float8Linear as FP8_LAYER

    _torchao.device_capability = lambda: (9, 0)
    _te.TE_AVAILABLE = False
else:
    SEEN = install(setattr, lambda mapping, key, value: mapping.__setitem__(key, value))
    FP8_LAYER = FakeFloat8Linear
TARGET, NAMED_AT, SAVE_AT, STEPS = "blocks.0.mlp.0", 4, 8, 12
FP8_CALLS: dict[int, int] = {}  # the real layers' forwards that ran the FP8 GEMM
GATHERED_AS: set[str] = set()  # the weights' types in the forward: float8 where FSDP2 gathered them so


def count_fp8(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    """A real Float8Linear's forward ran in FP8 where its output is not the plain linear's (on the
    weight as gathered: dequantised where it came in float8)."""
    if module.training:
        weight = module.weight
        GATHERED_AS.add(type(weight).__name__)
        with torch.no_grad():
            plain = weight.to_original_precision() if hasattr(weight, "to_original_precision") else weight
            if not torch.equal(out, F.linear(args[0], plain, module.bias)):
                FP8_CALLS[id(module)] = FP8_CALLS.get(id(module), 0) + 1


def fp8_calls(module: nn.Module) -> int:
    return (FP8_CALLS if REAL else FakeFloat8Linear.calls).get(id(module), 0)


class ConvertThenShard(ShardedGPT):
    shard_layers = False

    def configure_model(self) -> None:
        self.trainer.precision_plugin.convert_module(self)  # whole weights: before the sharding
        for module in self.modules():
            if isinstance(module, FP8_LAYER):
                if REAL:
                    module.register_forward_hook(count_fp8)  # runs after FSDP2's gather: whole weights
                if self.shard_layers:
                    fully_shard(module, mesh=self.device_mesh["data_parallel"])
        super().configure_model()


class Record(pl.Callback):
    """Per step: the layers in fallback, the plugin's health of the target's weight against the same
    statistics of the whole weight (gathered here), and whether the target ran in FP8."""

    def __init__(self, plugin: FP8Precision) -> None:
        self.plugin, self.steps, self.whole = plugin, [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = pl_module.get_submodule(TARGET).weight.full_tensor().detach()
        self.whole = {k: float(v) for k, v in fp8_health(w, current_scale(w, E4M3), E4M3).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if step == NAMED_AT and trainer.global_rank == 1:  # a monitor on rank 1 alone names the layer
            get_event_log(trainer).emit(step, "my_check", "MyMonitor", "warning", {}, None, TARGET)
        health = {k.rsplit("/", 1)[-1]: v for k, v in self.plugin.last_health.items() if k.startswith(f"{TARGET}/weight/")}
        self.steps.append({"step": step, "fallback": self.plugin.fallback_layers, "health": health, "whole": self.whole,
                           "fp8_calls": fp8_calls(pl_module.get_submodule(TARGET))})


def fit(out: str, mode: str, steps: int, ckpt: str | None, save: str | None) -> tuple[pl.Trainer, FP8Precision, Record]:
    model, loader = sharded_gpt(STEPS, d_model=48)  # FP8 GEMMs take multiples of 16
    model.__class__ = ConvertThenShard
    model.shard_layers = mode.endswith("layers")
    plugin = FP8Precision(backend="torchao", health_every_n_steps=2, cooldown=100, float8_all_gather="gather" in mode)
    record = Record(plugin)
    callbacks: list[pl.Callback] = [record]
    if save is not None:
        class Save(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == SAVE_AT:
                    trainer.save_checkpoint(save)
        callbacks.append(Save())
    trainer = fsdp_trainer(out, steps, callbacks, plugins=[plugin])
    trainer.fit(model, loader, ckpt_path=ckpt)
    return trainer, plugin, record


def main(out: str, mode: str) -> None:
    GATHERED_AS.clear()
    path = os.path.join(out, "sharded.ckpt")
    if not REAL:
        SEEN.filtered.clear()
    trainer, plugin, record = fit(out, mode, SAVE_AT + 1, None, path)
    model = trainer.lightning_module
    # what torchao was asked to convert in this fit; the real one: the layers it made its own
    filtered = [n for n, m in model.named_modules() if isinstance(m, FP8_LAYER)] if REAL else list(SEEN.filtered)
    _, resumed, after = fit(out, mode, STEPS, path, None)
    report = {
        "converted": plugin.converted_layers,
        "filtered": filtered,
        "gathered_as": sorted(GATHERED_AS),
        "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "steps": record.steps,
        "resumed_fallback_at_start": after.steps[0]["fallback"] if after.steps else None,
        "resumed": after.steps,
        "events": [(e.step, e.kind, e.target) for e in get_event_log(trainer) if e.source == "FP8Precision"],
        "finite": all(bool(torch.isfinite(p.full_tensor()).all()) for p in trainer.lightning_module.parameters()),
        # where the weights ended: the same with or without the float8 all-gather (the same casts)
        "weights": [float(p.full_tensor().double().abs().sum()) for p in trainer.lightning_module.parameters()],
        # the float8 all-gather's scales, set as the forward started (precompute_float8_dynamic_scale_for_fsdp)
        "precomputed": [getattr(m.weight._local_tensor, "_precomputed_scale", None) is not None
                        for m in model.modules() if isinstance(m, FP8_LAYER)],
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    two_ranks.each_mode(main, sys.argv[1:])
