"""What every stability callback shares: the trainer's event log, its stream and its checkpointing."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_stability.events import EventLog, get_event_log

EVENTS_CHECKPOINT_KEY = "lightning_stability_events"


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
