"""Never train on a quarantined sample again: the samples ``InMemoryRollback`` quarantined are left
out of the training data, on resume and for the rest of the run, without changing the user's code.

:class:`QuarantineSampler` wraps any sampler of dataset indices (``RandomSampler``,
``SequentialSampler``, the ``DistributedSampler`` Lightning puts in under DDP) and fills each
quarantined sample's slot with the next sample of the same sampler's share that is not: the number of
samples, and so of batches, stays what it was on every rank (ranks with different numbers of batches
would wait for each other forever under DDP). :class:`SkipQuarantined` puts one into the training
dataloader at the start of the fit, after Lightning has set it up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

from lightning_stability.callbacks._base import StabilityCallback
from lightning_stability.callbacks._rollback_quarantine import QUARANTINE_FILE, read_quarantine
from lightning_stability.events import StabilityEvent


class QuarantineSampler(Sampler[int]):
    """``sampler``'s indices without the quarantined ones (``ids``: a set, read at each epoch, so it may
    grow during the run), each replaced by the next index of the same epoch that is not quarantined.

    ``sample_id(index)`` is the sample id of dataset index ``index`` as the quarantine recorded it;
    by default the index itself (a dataset that returns its own index under ``"index"``, as the
    rollback's default ``sample_ids="index"`` reads it). Every sample of an epoch quarantined: the
    indices are yielded as they are, with a warning (nothing else is left to train on).
    """

    def __init__(self, sampler: Any, ids: set[Any], sample_id: Callable[[int], Any] | None = None) -> None:
        self.sampler = sampler
        self.ids = ids
        self.sample_id = sample_id or (lambda i: i)
        self.skipped = 0  # samples left out since the callback last counted them

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        indices = list(iter(self.sampler))
        if not self.ids:
            yield from indices
            return
        keep = [i for i in indices if self.sample_id(i) not in self.ids]
        if not keep:
            rank_zero_warn("QuarantineSampler: every sample of this epoch is quarantined; none is left out.")
            yield from indices
            return
        fill = 0
        for i in indices:
            if self.sample_id(i) in self.ids:
                self.skipped += 1
                i, fill = keep[fill % len(keep)], fill + 1
            yield i

    def set_epoch(self, epoch: int) -> None:
        """Passed on (``DistributedSampler`` shuffles by epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class SkipQuarantined(StabilityCallback):
    """Leaves the samples in ``quarantine.json`` out of the training data.

    At the start of the fit the training dataloaders' samplers are wrapped in a
    :class:`QuarantineSampler` with the ids of ``path`` (default: the run directory's
    ``quarantine.json``, where an ``InMemoryRollback`` of the same run writes it; a missing file is an
    empty quarantine). Each rollback of the run adds its batches' ids (from its ``quarantine`` events,
    the same on every rank), so later epochs leave them out too. A ``quarantine_skip`` info event at
    an epoch's end counts the samples it left out.

    Args:
        path: a ``quarantine.json`` or the directory holding it; ``None``: the run directory's.
        sample_id: maps a dataset index to its sample id (default: the index).
        name: distinguishes several instances (their ``state_key``).

    Example::

        trainer = pl.Trainer(callbacks=[GradientSpikeGuard(), InMemoryRollback(), SkipQuarantined()])
        trainer.fit(model, datamodule, ckpt_path="last")  # the quarantined samples are never seen again
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, sample_id: Callable[[int], Any] | None = None,
                 name: str | None = None) -> None:
        super().__init__(name)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"SkipQuarantined(path={path!r}): expected a path (str) or None")
        if sample_id is not None and not callable(sample_id):
            raise TypeError(f"SkipQuarantined(sample_id={sample_id!r}): expected a callable index -> id, or None")
        self.path = path
        self.sample_id = sample_id
        self.ids: set[Any] = set()
        self.samplers: list[QuarantineSampler] = []
        self._unsubscribe: Any = None
        self._file = ""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"ids": sorted(self.ids, key=lambda i: (type(i).__name__, str(i))), "file": self._file}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ids.clear()  # the set the samplers hold
        self.ids.update(state_dict.get("ids", []))
        self._file = str(state_dict.get("file", ""))

    def _read(self) -> None:
        if os.path.exists(self._file):
            self.ids |= read_quarantine(self._file)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir
        path = os.fspath(self.path) if self.path is not None else run_dir
        self._file = os.path.join(path, QUARANTINE_FILE) if os.path.isdir(path) or self.path is None else path
        self._read()
        self.samplers = []
        for loader in _loaders(trainer.train_dataloader):
            batches = getattr(loader, "batch_sampler", None)
            if batches is None or not hasattr(batches, "sampler"):
                rank_zero_warn(f"SkipQuarantined: a training dataloader without a batch sampler ({type(loader).__name__}); "
                               "its samples are not filtered.")
                continue
            inner = batches.sampler
            wrapped = inner if isinstance(inner, QuarantineSampler) else QuarantineSampler(inner, self.ids, self.sample_id)
            wrapped.ids = self.ids
            batches.sampler = wrapped
            self.samplers.append(wrapped)
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._unsubscribe = self.event_log(trainer).subscribe(self._on_event)
        self.emit(trainer, "quarantine_loaded", "info", {"samples": float(len(self.ids))}, None, self._file)

    def _on_event(self, event: StabilityEvent) -> None:
        # a rollback's quarantined batch, its ids gathered from every rank: later epochs leave them out too
        if event.kind == "quarantine" and event.details.get("sample_ids"):
            self.ids.update(event.details["sample_ids"])

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skipped = sum(s.skipped for s in self.samplers)
        for sampler in self.samplers:
            sampler.skipped = 0
        if skipped:
            self.emit(trainer, "quarantine_skip", "info", {"samples": float(skipped)}, None)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


def _loaders(loaders: Any) -> list[DataLoader]:
    """The DataLoaders of ``trainer.train_dataloader`` (one, or a collection of them)."""
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _loaders(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in _loaders(v)]
    return []


__all__ = ["QuarantineSampler", "SkipQuarantined"]
