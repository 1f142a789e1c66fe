"""Host reads of the stability callbacks together, on a user's model: one per optimizer step on quiet
steps (no check, sample, snapshot or logging step), in a single process. On a GPU each read stalls the
host until the backward is done, so every callback's per-step flags ride in the guard's one read."""

from __future__ import annotations

import traceback
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
    get_event_log,
)
from tests.clients.models import Client, loader

pytest.importorskip("transformers")
READS = ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy")
STEPS = 60


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


def test_one_host_read_a_step_for_all_the_callbacks_together_on_quiet_steps(tmp_path):
    pl.seed_everything(0, verbose=False)
    guard, spectral, softmax = GradientSpikeGuard(), SpectralMonitor(), SoftmaxSaturationMonitor()
    rollback = InMemoryRollback(every_n_steps=25)
    full_at: list[int] = []  # a layer's full spectrum, spread over its period: recorded where it runs
    full = spectral._full.run
    spectral._full.run = lambda trainer, tracker, step: (full_at.append(step), full(trainer, tracker, step))[1]
    with CountReads() as reads:
        trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                             callbacks=[Clock(reads), guard, spectral, softmax, rollback], enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Client("gpt2", max_steps=STEPS), loader("gpt2", "dict", n=8 * STEPS))
    # the steps where a callback samples at its defaults, with their neighbours (a hook at a step's end
    # reads for the next): the spectral checks and full spectra, the softmax samples, the snapshots
    sampled = {s for s in range(STEPS) if spectral._check_at.due(s) or s % softmax.every_n_steps == 0
               or s % rollback.every_n_steps == 0 or s in full_at}
    sampled |= {e.step for e in get_event_log(trainer) if e.severity != "info"}  # a detection reads what it names
    sampled |= {s + d for s in sampled for d in (-1, 1)}
    quiet = [s for s in range(STEPS) if s not in sampled]
    assert len(quiet) >= 45
    assert {s: reads.by_step[s] for s in quiet} == {s: 1 for s in quiet}, reads.where.most_common(5)
    # that one read is the guard's: its statistics and the rollback's flags in one transfer
    assert all(reads.callers[s] == ["_spike_measure.py"] for s in quiet)
