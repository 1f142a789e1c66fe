"""What ``InMemoryRollback`` costs and what it saves, on the tiny GPT of ``lightning_stability.demos``, on CPU.

Two measurements, each side by side in one process:

1. **Step-time overhead** of snapshots every 100 optimizer steps, next to Lightning's ``ModelCheckpoint``
   writing a checkpoint to disk at the same interval, and next to no callback at all. The cost falls on
   one step in a hundred, so the figures are *means* over the timed steps (two snapshots or checkpoints
   fall in the window): the mean step time, and the mean time per step inside the callback's hooks.
2. **Time to recover**: an in-memory rollback (restore the snapshot in place, rewind the schedulers and
   callbacks, write the quarantine) next to reloading the same state from a checkpoint on disk, both
   the bare reload (``torch.load`` and ``load_state_dict`` of the model, the optimizer and the scheduler)
   and a restart inside the process (a new ``Trainer`` fitting from ``ckpt_path`` until its first batch
   starts; a real restart also pays for a new process, imports and a new data loader).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from benchmarks.overhead import (
    BATCH_SIZE,
    BLOCK_SIZE,
    MODEL_SIZES,
    Measurement,
    ModelSize,
    Setup,
    run_benchmark,
)
from lightning_stability import InMemoryRollback
from lightning_stability.demos import FaultInjector, TinyGPT, make_dataloader

GOAL_RATIO = 1.02  # the project's goal: snapshots every 100 steps cost at most 2% of step time
EVERY = 100


def _rollback(root: str) -> list[Callback]:
    return [InMemoryRollback(every_n_steps=EVERY)]


def _model_checkpoint(root: str) -> list[Callback]:
    return [ModelCheckpoint(dirpath=root, every_n_train_steps=EVERY, save_top_k=1)]


def _nothing(root: str) -> list[Callback]:
    return []


SETUPS = (
    Setup("no callbacks", "the baseline", _nothing),
    Setup("InMemoryRollback", f"`InMemoryRollback(every_n_steps={EVERY})`: snapshots in host memory", _rollback),
    Setup(
        "ModelCheckpoint",
        f"Lightning's `ModelCheckpoint(every_n_train_steps={EVERY}, save_top_k=1)`: a checkpoint on disk",
        _model_checkpoint,
    ),
)


def overhead(
    warmup_steps: int, timed_steps: int, repeats: int, progress: Callable[[str], None] | None = None
) -> list[Measurement]:
    return run_benchmark(warmup_steps, timed_steps, repeats, MODEL_SIZES, SETUPS, progress)


def overhead_table(results: Sequence[Measurement]) -> tuple[str, list[str]]:
    lines = [
        "| model | callbacks | mean ms/step | vs. no callbacks | in-callback ms/step | in-callback share |",
        "|---|---|---:|---:|---:|---:|",
    ]
    goals = []
    for size in MODEL_SIZES:
        base = statistics.median(m.step_mean_ms for m in results if m.size == size.name and m.setup == SETUPS[0].name)
        for setup in SETUPS:
            runs = [m for m in results if m.size == size.name and m.setup == setup.name]
            mean = statistics.median(m.step_mean_ms for m in runs)
            hook = statistics.median(m.hook_ms for m in runs)
            lines.append(
                f"| {size.name} | {setup.name} | {mean:.2f} | {mean / base:.3f}x | {hook:.3f} | {hook / base:.2%} |"
            )
            if setup.name == "InMemoryRollback":
                met = hook / base <= GOAL_RATIO - 1
                goals.append(
                    f"{size.name}: snapshots every {EVERY} steps cost {hook / base:.2%} of a step measured inside the "
                    f"callback, {mean / base - 1:+.1%} in mean step time; goal <= {GOAL_RATIO - 1:.0%}: "
                    f"{'met' if met else 'NOT met'}"
                )
    return "\n".join(lines), goals


@dataclass(frozen=True)
class Recovery:
    size: str
    restore_ms: float  # median in-memory rollback
    reload_ms: float  # median torch.load + load_state_dict (model, optimizer, scheduler)
    restart_ms: float  # median new Trainer + fit(ckpt_path) until the first batch starts
    snapshot_mb: float
    checkpoint_mb: float


class _FirstBatch(Exception):
    """Ends a fit when its first batch starts: the restart has then restored everything."""


class _StopAtFirstBatch(Callback):
    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.seconds = time.perf_counter() - self.start
        raise _FirstBatch


def _trainer(root: str, steps: int, callbacks: list[Callback], **kw: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, default_root_dir=root,
        enable_progress_bar=False, enable_model_summary=False, logger=False, **kw,
    )


def _model(size: ModelSize, steps: int) -> tuple[TinyGPT, Any]:
    pl.seed_everything(0, verbose=False)
    loader, dataset = make_dataloader(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, n_samples=BATCH_SIZE * steps)
    model = TinyGPT(len(dataset.vocab), block_size=BLOCK_SIZE, d_model=size.d_model, n_layer=size.n_layer,
                    n_head=size.n_head, max_steps=steps)
    return model, loader


def recovery(size: ModelSize, rollbacks: int, progress: Callable[[str], None] | None = None) -> Recovery:
    """Rollbacks in a real fit, then reloads of a checkpoint of the same state from disk."""
    every = 10
    faults = {every * (k + 1) + every // 2 + 3: ("weight_nan", None) for k in range(rollbacks)}
    steps = max(faults) + 2
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*rollback requested.*")
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
        warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
        warnings.filterwarnings("ignore", ".*weights_only.*")
        model, loader = _model(size, steps)
        rollback = InMemoryRollback(every_n_steps=every, commit_after=3, max_rollbacks=rollbacks + 1)
        trainer = _trainer(root, steps, [FaultInjector(faults), rollback], enable_checkpointing=False)
        trainer.fit(model, loader)
        restore = [r["seconds"] for r in rollback.rollbacks]
        if len(restore) != rollbacks:
            raise RuntimeError(f"recovery({size.name}): expected {rollbacks} rollbacks, got {len(restore)}")
        path = os.path.join(root, "state.ckpt")
        trainer.save_checkpoint(path)
        optimizer = trainer.optimizers[0]
        scheduler = trainer.lr_scheduler_configs[0].scheduler

        reload = []
        for _ in range(rollbacks):
            start = time.perf_counter()
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(checkpoint["state_dict"])
            optimizer.load_state_dict(checkpoint["optimizer_states"][0])
            scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
            reload.append(time.perf_counter() - start)

        restart = []
        for _ in range(rollbacks):
            fresh, fresh_loader = _model(size, steps + 5)
            stop = _StopAtFirstBatch()
            resumed = _trainer(root, steps + 5, [stop], enable_checkpointing=False)
            stop.start = time.perf_counter()
            with contextlib.suppress(_FirstBatch):
                resumed.fit(fresh, fresh_loader, ckpt_path=path)
            restart.append(stop.seconds)
        result = Recovery(
            size.name,
            restore_ms=statistics.median(restore) * 1e3,
            reload_ms=statistics.median(reload) * 1e3,
            restart_ms=statistics.median(restart) * 1e3,
            snapshot_mb=rollback.summary["snapshot_bytes"] / 2 / 2**20,
            checkpoint_mb=os.path.getsize(path) / 2**20,
        )
    if progress is not None:
        progress(f"recovery {size.name:8s} in memory {result.restore_ms:.2f} ms, from disk {result.reload_ms:.2f} ms")
    return result


def recovery_table(results: Sequence[Recovery]) -> str:
    lines = [
        "| model | snapshot | checkpoint file | in-memory rollback | reload from disk | vs. in memory "
        "| restart from `ckpt_path` | vs. in memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.size} | {r.snapshot_mb:.2f} MiB | {r.checkpoint_mb:.2f} MiB | {r.restore_ms:.2f} ms | "
            f"{r.reload_ms:.2f} ms | {r.reload_ms / r.restore_ms:.1f}x | {r.restart_ms:.0f} ms | "
            f"{r.restart_ms / r.restore_ms:.0f}x |"
        )
    return "\n".join(lines)
