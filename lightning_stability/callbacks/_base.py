"""What every stability callback shares: the trainer's event log, its stream and its checkpointing."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_stability.events import EventLog, get_event_log

EVENTS_CHECKPOINT_KEY = "lightning_stability_events"


class TrainingHalted(RuntimeError):
    """Raised by a stability callback with ``on_halt="raise"`` when it stops training (after saving a checkpoint)."""


class StabilityCallback(Callback):
    """Base class: streams the event log on rank zero and saves it with every checkpoint.

    The stream goes to ``<trainer.log_dir>/stability_events.jsonl`` when the trainer has a logger.

    Several stability callbacks may be attached; each saves and restores the same shared log, so the
    result does not depend on which of them is present.
    """

    def __init__(self, name: str | None = None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{type(self).__name__}(name={name!r}): expected a non-empty str or None")
        self.name = name

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name) if self.name else type(self).__qualname__

    @property
    def source(self) -> str:
        return f"{type(self).__name__}[{self.name}]" if self.name else type(self).__name__

    def event_log(self, trainer: pl.Trainer) -> EventLog:
        return get_event_log(trainer)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.loggers:
            return  # without a logger there is no run directory to write into; the log stays in memory
        log_dir = trainer.log_dir  # a collective under DDP (a broadcast): every rank must ask
        if trainer.is_global_zero and log_dir:
            self.event_log(trainer).stream_to(log_dir)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.event_log(trainer).close_stream()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[EVENTS_CHECKPOINT_KEY] = self.event_log(trainer).state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if EVENTS_CHECKPOINT_KEY in checkpoint:
            self.event_log(trainer).load_state_dict(checkpoint[EVENTS_CHECKPOINT_KEY])

    # -- snapshots (InMemoryRollback) ------------------------------------------------------------
    def snapshot_state(self) -> dict[str, Any]:
        """What :class:`InMemoryRollback` keeps of this callback in a snapshot (a deep copy of its state)."""
        return copy.deepcopy(self.state_dict())

    def restore_snapshot_state(self, state: dict[str, Any]) -> None:
        """Go back to a snapshot's state; override to keep records (counts, reports) that must not rewind."""
        self.load_state_dict(copy.deepcopy(state))


def is_logging_step(trainer: pl.Trainer) -> bool:
    # LightningModule.log costs ~0.1 ms a key; call it only where the logger will write, as
    # Lightning decides it (its logger connector), and on steps with a detection.
    connector = getattr(trainer, "_logger_connector", None)
    return bool(connector.should_update_logs) if connector is not None else True


def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}({name}={value!r}): expected an int >= {minimum}")
    if value < minimum:
        raise ValueError(f"{owner}({name}={value!r}): expected an int >= {minimum}")
    return value


def check_positive(owner: str, name: str, value: Any, above: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}({name}={value!r}): expected a finite float > {above}")
    if not math.isfinite(value) or value <= above:
        raise ValueError(f"{owner}({name}={value!r}): expected a finite float > {above}")
    return float(value)
