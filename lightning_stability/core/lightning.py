"""Where the shared layer meets Lightning: the one logging path, halting, and the per-trainer
objects every callback and plugin shares (the step's loss, the ranks' gather)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_stability.core.agreement import Gather
from lightning_stability.core.step_loss import StepLoss

_STEP_LOSS = "_lightning_stability_step_loss"


# -- logging ----------------------------------------------------------------------------------------
def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this batch's metrics to the loggers (``log_every_n_steps``), as its
    logger connector decides it."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(connector.should_update_logs) if connector is not None else True


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], detection: bool = False, force: bool = False) -> bool:
    """The one path by which stability metrics reach the loggers and ``trainer.callback_metrics``.

    Written on Lightning's logging steps, and always on a detection step (``detection``) or when the
    caller's own cadence says so (``force``): the panels and the report must show a spike on the step
    it happened. The loggers get them straight from rank zero at the step Lightning logs this batch's
    metrics at (``LightningModule.log_dict`` costs tens of microseconds a key: too slow for a hundred
    layers' statistics); ``trainer.callback_metrics`` gets them on every rank, so that
    ``EarlyStopping`` and ``ModelCheckpoint`` can monitor any of them. Non-finite values reach
    ``callback_metrics`` (a monitor must see the NaN) but not the loggers. Answers whether it wrote.
    """
    if not metrics or not (force or detection or is_logging_step(trainer)):
        return False
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
    if trainer.is_global_zero and trainer.loggers:
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=step)
    return True


# -- halting ----------------------------------------------------------------------------------------
def run_dir(trainer: pl.Trainer) -> str:
    """The run's directory: the logger's ``log_dir``, else ``default_root_dir``."""
    return trainer.log_dir or trainer.default_root_dir


def halt_checkpoint_path(trainer: pl.Trainer, prefix: str) -> str:
    """Where a halt saves its checkpoint: ``<run dir>/checkpoints/<prefix>-halt-step=<step>.ckpt``."""
    return os.path.join(run_dir(trainer), "checkpoints", f"{prefix}-halt-step={trainer.global_step}.ckpt")


# -- the trainer's shared objects -------------------------------------------------------------------
def step_loss(trainer: pl.Trainer) -> StepLoss:
    """The trainer's :class:`StepLoss`: every stability callback feeds it the losses it sees in
    ``on_before_backward`` (each once) and reads the step's loss from it."""
    loss = trainer.__dict__.get(_STEP_LOSS)
    if loss is None:
        loss = trainer.__dict__[_STEP_LOSS] = StepLoss()
    return loss


def loss_scale(trainer: pl.Trainer) -> float:
    """The AMP loss scale the losses seen in ``on_before_backward`` carry (1 without fp16 AMP)."""
    scaler = grad_scaler(trainer)
    if scaler is None:
        return 1.0
    scale = float(scaler.get_scale())
    return scale if scale > 0 else 1.0


def rank_gather(trainer: pl.Trainer) -> Gather | None:
    """The function :mod:`lightning_stability.core.agreement` gathers with: the strategy's
    ``all_gather`` under several processes, ``None`` in one."""
    return trainer.strategy.all_gather if trainer.world_size > 1 else None


def any_rank(trainer: pl.Trainer, flags: Sequence[bool]) -> list[bool]:
    """Each flag, true if it is true on any rank: one all-reduce of ``len(flags)`` numbers under DDP.

    ``torch.distributed`` is called directly: Lightning's ``strategy.reduce`` puts a barrier before
    every all-reduce, a second collective that a per-step decision does not need.
    """
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def grad_scaler(trainer: pl.Trainer) -> Any:
    """The enabled AMP gradient scaler of the trainer's precision plugin, or ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    return scaler


def sharded_strategy(trainer: pl.Trainer) -> str | None:
    """The name of the trainer's strategy when it shards parameters (FSDP, ModelParallel), else ``None``."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    return type(strategy).__name__ if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) else None


def synchronised_sources(trainer: pl.Trainer) -> set[str]:
    """The event sources whose events every rank emits alike, in the same step.

    The stability callbacks and the FP8 plugin decide from statistics all ranks share (the gathered
    ones, or the weights DDP keeps identical), so their events need no agreement between ranks. An
    event from anywhere else (a user's check) may happen on one rank only.
    """
    sources = {cb.source for cb in trainer.callbacks if getattr(cb, "synchronised_events", False)}  # type: ignore[attr-defined]
    if getattr(trainer.precision_plugin, "synchronised_events", False):
        sources.add(type(trainer.precision_plugin).__name__)
    return sources
