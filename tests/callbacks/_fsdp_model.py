"""What the FSDP scripts share: a TinyGPT sharded with FSDP2 and a 2-rank CPU trainer for it."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_stability.demos import TinyGPT, make_dataloader


class ShardedGPT(TinyGPT):
    """TinyGPT whose every module with weights is sharded by FSDP2 (``fully_shard``) over the data-parallel
    mesh: parameters, gradients and optimizer states become row-sharded DTensors (width 33: the attention
    projections of 99 and 33 rows shard unevenly, 50 and 49, 17 and 16)."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for module in (self.tok_emb, self.pos_emb, *self.blocks, self.ln_f, self.lm_head):
            fully_shard(module, mesh=mesh)


def sharded_gpt(steps: int, seed: int = 0, d_model: int = 33, **kw: Any) -> tuple[ShardedGPT, Any]:
    warnings.filterwarnings("ignore")
    pl.seed_everything(seed, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 2 * steps, seed=seed)
    kw.setdefault("warmup_steps", 10)
    model = ShardedGPT(len(ds.vocab), block_size=16, d_model=d_model, n_layer=1, n_head=3, max_steps=steps, **kw)
    return model, loader


def fsdp_trainer(out: str, steps: int, callbacks: list, **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out, **kw,
    )


class CountCollectives:
    """Counts the calls of torch.distributed's collectives made while ``active`` is set."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
             "reduce_scatter_tensor")

    def __init__(self) -> None:
        self.active = False
        self.calls: dict[str, int] = {}
        for name in self.NAMES:
            original = getattr(torch.distributed, name)
            setattr(torch.distributed, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted

    def reset(self) -> dict[str, int]:
        calls, self.calls = self.calls, {}
        return calls
