"""The guard and the rollback under Lightning's FSDPStrategy (FSDP1), which needs CUDA: on one GPU, with
``use_orig_params`` (the gradients of the original parameters are views of the flat shard). Skipped
on machines without one."""

from __future__ import annotations

import hashlib

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    LowBitOptimizer,
    SpectralMonitor,
    get_event_log,
)
from lightning_stability.demos import FaultInjector
from tests.conftest import tiny_gpt

pytestmark = pytest.mark.gpu


def fsdp1_trainer(tmp_path, steps: int, callbacks: list) -> pl.Trainer:
    from lightning.pytorch.strategies import FSDPStrategy

    return pl.Trainer(
        accelerator="gpu", devices=1, strategy=FSDPStrategy(use_orig_params=True), max_steps=steps,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )


class Record(pl.Callback):
    """Before the guard: each step's gradient norm as torch computes it. After the rollback: the digest
    of the weights at the end of each step."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}
        self.digests: dict[int, str] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        data = b"".join(p.detach().float().cpu().numpy().tobytes() for p in pl_module.parameters())
        self.digests[trainer.global_step] = hashlib.sha256(data).hexdigest()


def test_guard_and_rollback_under_fsdp1(tmp_path):
    model, loader = tiny_gpt(60)
    record, after = Record(), Record()
    guard = GradientSpikeGuard(warmup=8)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    faults = FaultInjector({30: ("grad_scale", 1000.0), 45: ("loss_nan", None)})
    trainer = fsdp1_trainer(tmp_path, 60, [faults, record, guard, rollback, after])
    trainer.fit(model, loader)
    events = [(e.step, e.kind, e.action) for e in get_event_log(trainer) if e.severity != "info"]
    assert [e[:2] for e in events if e[1] in ("grad_spike", "nonfinite")] == [(30, "grad_spike"), (45, "nonfinite")]
    spike = next(e for e in get_event_log(trainer) if e.kind == "grad_spike")
    # the guard's norm, summed over the shards, is the whole gradient's
    assert spike.metrics["grad_norm"] == pytest.approx(record.norms[30], rel=1e-5)
    assert [(r["step"], r["restored_step"]) for r in rollback.rollbacks] == [(46, 40)]
    assert after.digests[46] == after.digests[40]  # the snapshot restored exactly
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_fsdp1_refusals_name_the_strategy(tmp_path):
    model, loader = tiny_gpt(2)
    with pytest.raises(NotImplementedError, match=r"FSDPStrategy: FSDP1 flattens"):
        fsdp1_trainer(tmp_path, 2, [SpectralMonitor()]).fit(model, loader)
    pytest.importorskip("bitsandbytes")
    model, loader = tiny_gpt(2)
    with pytest.raises(RuntimeError, match=r"LowBitOptimizer cannot serve FSDPStrategy"):
        fsdp1_trainer(tmp_path, 2, [LowBitOptimizer()]).fit(model, loader)
