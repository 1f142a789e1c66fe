"""Never train on a quarantined sample again: the samples ``InMemoryRollback`` quarantined are left
out of the training data, on resume and for the rest of the run, without changing the user's code.

:class:`QuarantineSampler` wraps any sampler of dataset indices (``RandomSampler``,
``SequentialSampler``, the ``DistributedSampler`` Lightning puts in under DDP) and fills each
quarantined sample's slot with the next sample of the same sampler's share that is not: the number of
samples, and so of batches, stays what it was on every rank (ranks with different numbers of batches
would wait for each other forever under DDP). :class:`SkipQuarantined` puts one into the training
dataloader at the start of the fit, after Lightning has set it up.

A rollback quarantines every batch since the snapshot it restores, most of them innocent: with
``retry=True`` a sample quarantined in the run is trained on once more in a later epoch, and only a
sample quarantined again (its retry spiked too: a data fault) is left out from then on; one that
trains through a whole later epoch without being quarantined again was transient and stays in.
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

    With ``retry=True`` a newly quarantined sample (of this run, or of the file where no checkpoint
    says what became of it) is not left out at once: it is retried in the epochs that follow. Quarantined
    again, it is a data fault and left out for the rest of the run; not quarantined again by the end of
    the first whole epoch after its quarantine, it was transient and is trained on as any other. Each
    verdict is a ``quarantine_verdict`` info event (``details``: ``data_fault`` and ``transient`` ids),
    which the report sums up; the verdicts survive a resume (``state_dict``).

    Args:
        path: a ``quarantine.json`` or the directory holding it; ``None``: the run directory's.
        sample_id: maps a dataset index to its sample id (default: the index).
        retry: retry each quarantined sample once before leaving it out (default ``False``: left out at once).
        name: distinguishes several instances (their ``state_key``).

    Example::

        trainer = pl.Trainer(callbacks=[GradientSpikeGuard(), InMemoryRollback(), SkipQuarantined()])
        trainer.fit(model, datamodule, ckpt_path="last")  # the quarantined samples are never seen again
    """

    rewinds = False  # a rollback must not make it forget the samples it quarantined

    def __init__(self, path: str | os.PathLike[str] | None = None, sample_id: Callable[[int], Any] | None = None,
                 retry: bool = False, name: str | None = None) -> None:
        super().__init__(name)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"SkipQuarantined(path={path!r}): expected a path (str) or None")
        if sample_id is not None and not callable(sample_id):
            raise TypeError(f"SkipQuarantined(sample_id={sample_id!r}): expected a callable index -> id, or None")
        if not isinstance(retry, bool):
            raise TypeError(f"SkipQuarantined(retry={retry!r}): expected True or False")
        self.path = path
        self.sample_id = sample_id
        self.retry = retry
        self.ids: set[Any] = set()  # left out (the set every wrapped sampler holds)
        # retry=True: quarantined, on trial -> (the epoch of its latest quarantine, whether it was in a culprit batch)
        self.trial: dict[Any, tuple[int, bool]] = {}
        self.verdicts: dict[Any, str] = {}  # retried: "data_fault" (left out) or "transient" (kept)
        self._pending: dict[str, list[Any]] = {"data_fault": [], "transient": []}  # verdicts to emit
        self._incoming: list[tuple[int, float, list[Any]]] = []  # (rollback step, batch step, ids) to take in
        self._epoch = 0
        self.samplers: list[QuarantineSampler] = []
        self._file = ""

    @override
    def state_dict(self) -> dict[str, Any]:
        self._take_in()
        return {"ids": _sorted(self.ids), "file": self._file, "trial": [[i, *self.trial[i]] for i in _sorted(self.trial)],
                "verdicts": [[i, self.verdicts[i]] for i in _sorted(self.verdicts)]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ids.clear()  # the set the samplers hold
        self.ids.update(state_dict.get("ids", []))
        self._file = str(state_dict.get("file", ""))
        self.trial = {i: (int(epoch), bool(struck)) for i, epoch, struck in state_dict.get("trial", [])}
        self.verdicts = {i: str(v) for i, v in state_dict.get("verdicts", [])}

    def _read(self, epoch: int) -> None:
        if os.path.exists(self._file):
            self._quarantined(read_quarantine(self._file), epoch - 1)  # on trial from the first epoch on

    def _quarantined(self, ids: Any, epoch: int, culprit: frozenset[Any] = frozenset()) -> None:
        """Samples quarantined (in ``epoch``): left out, or with ``retry`` on trial. A sample found in the
        ``culprit`` batch (the one of the step that spiked, not the others the rollback discarded with it)
        a second time is a data fault; otherwise its trial starts over, remembering whether it was a
        culprit. Those already judged transient stay in; those left out, out."""
        for i in ids:
            if i in self.ids or self.verdicts.get(i) == "transient":
                continue
            if not self.retry:
                self.ids.add(i)
            elif i in culprit and self.trial.get(i, (0, False))[1]:
                del self.trial[i]
                self.ids.add(i)
                self.verdicts[i] = "data_fault"
                self._pending["data_fault"].append(i)
            else:
                self.trial[i] = (epoch, i in culprit or self.trial.get(i, (0, False))[1])

    def _take_in(self) -> None:
        """The rollbacks' quarantined batches since the last call, a rollback at a time: its culprit is
        the batch of the latest step it discarded (the one whose detection made it roll back)."""
        incoming, self._incoming = self._incoming, []
        for step in sorted({s for s, _, _ in incoming}):
            batches = [(b, ids) for s, b, ids in incoming if s == step]
            last = max(b for b, _ in batches)
            culprit = frozenset(i for b, ids in batches if b == last for i in ids)
            self._quarantined([i for _, ids in batches for i in ids], self._epoch, culprit)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir
        path = os.fspath(self.path) if self.path is not None else run_dir
        self._file = os.path.join(path, QUARANTINE_FILE) if os.path.isdir(path) or self.path is None else path
        self._epoch = trainer.current_epoch
        self._read(self._epoch)
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
        self.listen(trainer, self._on_event)
        self.emit(trainer, "quarantine_loaded", "info", {"samples": float(len(self.ids))}, None, self._file)

    def _on_event(self, event: StabilityEvent) -> None:
        # a rollback's quarantined batch, its ids gathered from every rank: later epochs leave them out too
        if event.kind == "quarantine" and event.details.get("sample_ids"):
            self._incoming.append((event.step, event.metrics.get("batch_step", event.step), list(event.details["sample_ids"])))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._incoming:  # the previous step's rollback, all of its batches
            self._take_in()
        if self._pending["data_fault"]:
            self._emit_verdicts(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_in()
        self._emit_verdicts(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_in()
        skipped = sum(s.skipped for s in self.samplers)
        for sampler in self.samplers:
            sampler.skipped = 0
        if skipped:
            self.emit(trainer, "quarantine_skip", "info", {"samples": float(skipped)}, None)
        # on trial through a whole epoch after the one of its quarantine, and not quarantined again
        cleared = [i for i, (epoch, _) in self.trial.items() if epoch < trainer.current_epoch]
        for i in cleared:
            del self.trial[i]
            self.verdicts[i] = "transient"
        self._pending["transient"] += cleared
        self._emit_verdicts(trainer)

    def _emit_verdicts(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, {"data_fault": [], "transient": []}
        if pending["data_fault"] or pending["transient"]:
            self.emit(trainer, "quarantine_verdict", "info",
                      {"data_fault": float(len(pending["data_fault"])), "transient": float(len(pending["transient"])),
                       "on_trial": float(len(self.trial))}, None,
                      details={k: _sorted(v) for k, v in pending.items() if v})


def _sorted(ids: Any) -> list[Any]:
    """Ids in a stable order: numbers by value, then the others by their text."""
    return sorted(ids, key=lambda i: (0, i, "") if isinstance(i, (int, float)) else (1, 0, str(i)))


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
