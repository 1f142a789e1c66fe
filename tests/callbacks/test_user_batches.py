"""The guard and the rollback on what users pass them: tuple, list, dict, ``BatchEncoding`` and dataclass
batches, defaults that follow the arguments given, detections logged at their step, halts that say so."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import weakref
from collections import namedtuple
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    StabilityPanels,
    get_event_log,
    halt_report,
    read_quarantine,
)
from lightning_stability.callbacks import _spike_measure, spike_guard
from lightning_stability.callbacks._rollback_quarantine import sample_ids_of
from lightning_stability.demos import FaultInjector
from tests.conftest import MemoryLogger, make_trainer, tiny_gpt

Pair = namedtuple("Pair", ["x", "y", "index"])


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


class Regression(Dataset):
    """``n`` samples of a linear map with noise, returned in the shape ``kind`` names."""

    def __init__(self, kind: str, n: int = 512, d: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
        self.kind = kind

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        x, y = self.x[i], self.y[i]
        if self.kind == "tuple":
            return x, y
        if self.kind == "list":
            return [x, y]
        if self.kind in ("dict", "batch_encoding"):
            return {"x": x, "y": y, "index": i}
        if self.kind == "namedtuple":
            return Pair(x, y, i)
        return x, y, i  # "dataclass": collated below


def collate(kind: str):
    default = torch.utils.data.default_collate

    def fn(items: list[Any]) -> Any:
        batch = default(items)
        if kind == "batch_encoding":
            from transformers import BatchEncoding

            return BatchEncoding(batch)
        if kind == "dataclass":
            return Batch(*batch)
        if kind == "namedtuple":
            return Pair(*batch)
        return batch

    return fn


class Mlp(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, (Batch, Pair)):
            x, y = batch.x, batch.y
        elif isinstance(batch, (tuple, list)):
            x, y = batch
        else:
            x, y = batch["x"], batch["y"]
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


IDS = {"tuple": False, "list": False, "dict": True, "batch_encoding": True, "dataclass": True, "namedtuple": True}


@pytest.mark.parametrize("kind", list(IDS))
def test_rollback_at_its_defaults_on_every_batch_type(tmp_path, kind):
    # A NaN weight at step 27: every later loss is NaN until the rollback restores the snapshot of 10
    # (the one of 20 is not committed yet: commit_after follows every_n_steps, 9 steps).
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10)
    loader = DataLoader(Regression(kind), batch_size=8, collate_fn=collate(kind))
    trainer = make_trainer(tmp_path, 40, [FaultInjector({27: ("weight_nan", None)}), rollback],
                           logger=CSVLogger(tmp_path, name="run"))
    model = Mlp()
    trainer.fit(model, loader)

    [record] = rollback.rollbacks
    assert (record["step"], record["restored_step"]) == (28, 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with open(os.path.join(trainer.log_dir, "quarantine.json")) as f:
        [entry] = json.load(f)["rollbacks"]
    assert [(b["epoch"], b["batch_idx"], b["rank"]) for b in entry["batches"]] == [(0, s, 0) for s in range(10, 28)]
    if IDS[kind]:
        assert read_quarantine(trainer.log_dir) == set(range(10 * 8, 28 * 8))
    else:  # known by their position only
        assert all(b["sample_ids"] is None for b in entry["batches"])
        assert read_quarantine(trainer.log_dir) == set()


@pytest.mark.parametrize("kind", ["tuple", "list"])
def test_a_recorded_tuple_batch_is_not_kept_alive(tmp_path, kind):
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10)
    refs: list[weakref.ref] = []

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            refs.append(weakref.ref(batch[0]))

    loader = DataLoader(Regression(kind), batch_size=8)
    trainer = make_trainer(tmp_path, 12, [rollback, Keep()])
    trainer.fit(Mlp(), loader)
    gc.collect()
    assert len(rollback._batches.batches) > 0
    assert all(b.sample_ids is None for b in rollback._batches.batches)
    # the batches the rollback still records (steps 10 and 11) are gone from memory
    assert [r() for r in refs[-2:]] == [None, None]


def test_ids_that_are_a_view_of_a_larger_tensor_are_copied():
    big = torch.arange(4096).reshape(512, 8)
    ids = sample_ids_of(big, lambda b: b[:, 0])
    assert ids.untyped_storage().nbytes() == 512 * 8  # 512 int64 ids, not the 4096 elements of the batch
    assert ids.tolist() == list(range(0, 4096, 8))


def test_a_named_key_that_is_not_ids_is_ignored():
    assert sample_ids_of({"index": lambda: 0}, "index") is None
    assert sample_ids_of({"index": [[1, 2], [3]]}, "index") is None
    assert sample_ids_of({"index": 7}, "index") == [7]
    assert sample_ids_of({"index": ["a", "b"]}, "index") == ["a", "b"]


# -- defaults follow the arguments given -------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "keep", "commit_after"),
    [
        ({}, 2, 20),
        ({"every_n_steps": 20}, 2, 19),
        ({"every_n_steps": 5}, 2, 4),
        ({"every_n_steps": 1}, 3, 1),
        ({"every_n_steps": 10, "commit_after": 25}, 4, 25),
        ({"every_n_steps": 10, "keep": 4}, 4, 20),
    ],
)
def test_rollback_defaults_follow_the_arguments_given(kwargs, keep, commit_after):
    rollback = InMemoryRollback(nonfinite_patience=1, **kwargs)
    assert (rollback.keep, rollback.commit_after) == (keep, commit_after)
    assert rollback.commit_after < rollback.every_n_steps * (rollback.keep - 1)


@pytest.mark.parametrize(("kwargs", "window", "warmup"), [({}, 128, 32), ({"window": 16}, 16, 16), ({"warmup": 200}, 200, 200), ({"window": 64, "warmup": 8}, 64, 8)])
def test_guard_defaults_follow_the_arguments_given(kwargs, window, warmup):
    guard = GradientSpikeGuard(**kwargs)
    assert (guard.window, guard.warmup) == (window, warmup)


# -- detections reach the logger at their step ------------------------------------------------------
@pytest.mark.parametrize("name", [None, "main"])
def test_a_detection_on_a_quiet_step_is_logged_at_that_step(tmp_path, name):
    logger = MemoryLogger()
    guard = GradientSpikeGuard(name=name)
    panels = StabilityPanels()
    model, loader = tiny_gpt(100)
    trainer = make_trainer(tmp_path, 100, [FaultInjector({73: ("grad_scale", 1000.0)}), guard, panels],
                           logger=logger, log_every_n_steps=50)
    trainer.fit(model, loader)
    assert [e.step for e in get_event_log(trainer) if e.kind == "grad_spike"] == [73]
    logged = {s for s, m in logger.records if "stability/grad/norm" in m}
    assert 73 in logged and {49, 99} <= logged
    spike = logger.metrics_at(73)["stability/grad/norm"]
    quiet = logger.metrics_at(49)["stability/grad/norm"]
    assert spike > 100 * quiet
    # the panels' progress-bar count sees a named guard's detections too
    assert panels._counts["spikes"] == 1


# -- halts say so -----------------------------------------------------------------------------------
def test_a_halt_with_on_halt_stop_is_reported_after_fit(tmp_path):
    guard = GradientSpikeGuard(ladder=("halt",))
    model, loader = tiny_gpt(60)
    trainer = make_trainer(tmp_path, 60, [FaultInjector({45: ("grad_nan", None)}), guard])
    trainer.fit(model, loader)
    assert trainer.global_step == 46
    assert guard.halted
    report = halt_report(trainer)
    assert report is not None and "halted training at optimizer step 45" in report
    # a new fit that does not halt says so too
    model, loader = tiny_gpt(20)
    trainer = make_trainer(tmp_path, 20, [guard])
    trainer.fit(model, loader)
    assert not guard.halted and halt_report(trainer) is None


# -- private attributes of torch the guard reads ------------------------------------------------------
def test_the_grad_scaler_table_the_guard_reads_is_where_torch_keeps_it():
    # Pinned: torch's GradScaler records what unscale_ found per optimizer under these private names.
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(model(torch.full((2, 4), 1e38)).sum()).backward()  # overflows in float32
    scaler.unscale_(opt)
    states = getattr(scaler, spike_guard.SCALER_STATES)
    found = states[id(opt)][spike_guard.SCALER_FOUND_INF]
    assert sum(float(t.sum()) for t in found.values()) > 0


def test_a_moved_grad_scaler_table_warns_and_leaves_overflows_to_the_scaler(monkeypatch):
    class Scaler:
        def is_enabled(self) -> bool:
            return True

    class Trainer:
        precision_plugin = type("P", (), {"scaler": Scaler()})()

    monkeypatch.setattr(_spike_measure, "_warned_scaler", [])
    with pytest.warns(UserWarning, match="_per_optimizer_states.*not where torch"):
        assert spike_guard._scaler_skips(Trainer(), torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0))


def test_advice_alone_does_not_discard_a_snapshot(tmp_path):
    # A monitor's advice (a warning with no action) at step 1 observes a trend: the snapshot of step 0
    # stays on probation and is committed; a NaN weight at 27 is then rolled back to it.
    class Advisor(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (1, 2):
                get_event_log(trainer).emit(trainer.global_step, "attention_collapse", "Advisor", "warning", {}, "advise")

    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=100)
    loader = DataLoader(Regression("tuple"), batch_size=8)
    trainer = make_trainer(tmp_path, 40, [FaultInjector({27: ("weight_nan", None)}), Advisor(), rollback])
    model = Mlp()
    trainer.fit(model, loader)
    assert [(r["step"], r["restored_step"]) for r in rollback.rollbacks] == [(28, 0)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
