"""Counting the package's host reads, by step: shared by the single-process test and the two-rank script."""

from __future__ import annotations

import traceback
from collections import Counter

import lightning.pytorch as pl
import torch

READS = ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy")


class CountReads:
    """Every host read whose caller is the package's own code (not the user's, not the demos' data)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.by_step: Counter[int] = Counter()
        self.where: Counter[tuple[str, str, int]] = Counter()
        self.callers: dict[int, list[str]] = {}  # the file of the package that read, by step

    def __enter__(self) -> CountReads:
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.step is not None:
                ours = [f for f in traceback.extract_stack(limit=16)
                        if "lightning_stability" in f.filename and "demos.py" not in f.filename]
                if ours:
                    self.by_step[self.step] += 1
                    self.where[(name, ours[-1].filename.rsplit("lightning_stability", 1)[-1], ours[-1].lineno)] += 1
                    self.callers.setdefault(self.step, []).append(ours[-1].filename.rsplit("/", 1)[-1])
            return original(tensor, *args, **kwargs)

        return read


class Clock(pl.Callback):
    def __init__(self, reads: CountReads) -> None:
        self.reads = reads

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.reads.step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.reads.step = None


class Monitors:
    """Every stability callback at its defaults (the rollback's snapshot every 25 steps), and which
    steps of a run are quiet: no spectral check or full spectrum, softmax sample, snapshot or detection,
    nor a neighbour of one (a hook at a step's end reads for the next)."""

    def __init__(self) -> None:
        from lightning_stability import (
            GradientSpikeGuard,
            InMemoryRollback,
            SoftmaxSaturationMonitor,
            SpectralMonitor,
        )

        self.guard, self.spectral = GradientSpikeGuard(), SpectralMonitor()
        self.softmax, self.rollback = SoftmaxSaturationMonitor(), InMemoryRollback(every_n_steps=25)
        self.full_at: list[int] = []  # a layer's full spectrum, spread over its period: recorded where it runs
        full = self.spectral._full.run
        self.spectral._full.run = lambda trainer, tracker, step: (self.full_at.append(step), full(trainer, tracker, step))[1]

    def callbacks(self) -> list[pl.Callback]:
        return [self.guard, self.spectral, self.softmax, self.rollback]

    def quiet_steps(self, trainer: pl.Trainer, steps: int) -> list[int]:
        from lightning_stability import get_event_log

        sampled = {s for s in range(steps) if self.spectral._check_at.due(s) or s % self.softmax.every_n_steps == 0
                   or s % self.rollback.every_n_steps == 0 or s in self.full_at}
        sampled |= {e.step for e in get_event_log(trainer) if e.severity != "info"}  # a detection reads what it names
        sampled |= {s + d for s in sampled for d in (-1, 1)}
        return [s for s in range(steps) if s not in sampled]
