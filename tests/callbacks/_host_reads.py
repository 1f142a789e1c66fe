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
