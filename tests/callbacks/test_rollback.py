from __future__ import annotations

import json
import os
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    TrainingHalted,
    get_event_log,
    read_quarantine,
)
from lightning_stability.demos import FaultInjector
from tests.conftest import make_trainer, tiny_gpt


def events(trainer: pl.Trainer, kind: str) -> list:
    return [e for e in get_event_log(trainer) if e.kind == kind]


def training_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """A deep copy of everything a rollback must bring back, for bit-for-bit comparison."""
    opt = trainer.optimizers[0]
    return {
        "weights": [p.detach().clone() for p in pl_module.parameters()],
        "param_ids": [id(p) for p in pl_module.parameters()],
        "opt_state": [
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"]
        ],
        "opt_state_ids": [{k: id(v) for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]],
        "lr": [g["lr"] for g in opt.param_groups],
        "scheduler_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert len(a["weights"]) == len(b["weights"])
    for x, y in zip(a["weights"], b["weights"]):
        assert torch.equal(x, y)
    assert len(a["opt_state"]) == len(b["opt_state"])
    for sa, sb in zip(a["opt_state"], b["opt_state"]):
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k
    assert a["lr"] == b["lr"]
    assert a["scheduler_epoch"] == b["scheduler_epoch"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert np.array_equal(a["numpy_rng"], b["numpy_rng"])
    assert a["python_rng"] == b["python_rng"]


class StateProbe(pl.Callback):
    """Records the training state at the end of chosen steps, and right after each rollback.

    Attach it after ``InMemoryRollback``: its ``on_train_batch_end`` then sees the state the
    rollback left behind.
    """

    def __init__(self, at_steps: tuple[int, ...] = ()) -> None:
        self.at_steps = at_steps
        self.states: dict[int, dict[str, Any]] = {}
        self.after_rollback: list[dict[str, Any]] = []
        self.losses: dict[int, float] = {}
        self.batch_ids: dict[int, list[int]] = {}
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_ids[trainer.global_step] = batch["index"].tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step in self.at_steps:
            self.states[trainer.global_step] = training_state(trainer, pl_module)
        rollbacks = events(trainer, "rollback")
        if len(rollbacks) > self._seen:
            self._seen = len(rollbacks)
            self.after_rollback.append(training_state(trainer, pl_module))


def fit(tmp_path, steps, rollback, faults=None, guard=None, optimizer="adamw", probe=None, seed=0, **kw):
    model, loader = tiny_gpt(steps, optimizer=optimizer, seed=seed)
    callbacks = [FaultInjector(faults or {})]
    if guard is not None:
        callbacks.append(guard)
    callbacks.append(rollback)
    if probe is not None:
        callbacks.append(probe)
    trainer = make_trainer(tmp_path, steps, callbacks, **kw)
    trainer.fit(model, loader)
    return trainer, model


# -- restoring -------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_nan_weight_is_undone_bit_for_bit(tmp_path, optimizer):
    probe = StateProbe(at_steps=(20,))
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    trainer, model = fit(tmp_path, 80, rollback, {25: ("weight_nan", None)}, optimizer=optimizer, probe=probe)

    [record] = rollback.rollbacks
    assert record["restored_step"] == 20 and record["step"] == 26 and record["reason"] == "nonfinite_loss"
    [after] = probe.after_rollback
    before = probe.states[20]
    assert_same_state(before, after)
    # in place: the optimizer, DDP and hooks keep their references
    assert after["param_ids"] == before["param_ids"]
    assert after["opt_state_ids"] == before["opt_state_ids"]
    if optimizer == "adamw8bit":
        assert any(s["state1"].dtype == torch.uint8 for s in after["opt_state"] if "state1" in s)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 80


def test_run_after_rollback_ends_close_to_a_clean_run(tmp_path):
    clean_probe, probe = StateProbe(), StateProbe()
    fit(tmp_path / "clean", 150, InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3), probe=clean_probe)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    fit(tmp_path / "fault", 150, rollback, {45: ("weight_nan", None)}, probe=probe)
    assert len(rollback.rollbacks) == 1
    tail = range(131, 151)
    clean = np.mean([clean_probe.losses[s] for s in tail])
    faulty = np.mean([probe.losses[s] for s in tail])
    assert np.isfinite(faulty)
    assert abs(faulty - clean) / clean < 0.05, (faulty, clean)
    first = np.mean([clean_probe.losses[s] for s in range(1, 11)])
    assert faulty < 0.9 * first  # it kept learning after the rollback


def test_snapshot_taken_during_a_spike_is_never_used(tmp_path):
    # Snapshots at 30 (committed at 33) and 40; gradient spikes at 41 and 42 fall in the probation of
    # the snapshot at 40, so the NaN at 46 must go back to 30, not 40.
    guard = GradientSpikeGuard(warmup=8, theta=None)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=5)
    probe = StateProbe(at_steps=(30, 40))
    faults = {41: ("grad_scale", 1e4), 42: ("grad_scale", 1e4), 46: ("weight_nan", None)}
    trainer, model = fit(tmp_path, 60, rollback, faults, guard=guard, probe=probe)

    assert [e.metrics["snapshot_step"] for e in events(trainer, "snapshot_discarded")] == [40.0]
    assert [r["restored_step"] for r in rollback.rollbacks] == [30]
    assert_same_state(probe.states[30], probe.after_rollback[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_snapshot_is_postponed_while_a_step_is_in_trouble(tmp_path):
    guard = GradientSpikeGuard(warmup=8, theta=None)
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    trainer, _ = fit(tmp_path, 45, rollback, {39: ("grad_scale", 1e4)}, guard=guard)
    # the step ending at 40 had a spike: the snapshot waits for the next healthy step
    assert [e.step for e in events(trainer, "snapshot")] == [0, 10, 20, 30, 41]


def test_guard_ladder_asks_for_rollback(tmp_path):
    guard = GradientSpikeGuard(warmup=8, theta=None, ladder=("rollback", "halt"))
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    probe = StateProbe(at_steps=(30,))
    trainer, _ = fit(tmp_path, 45, rollback, {33: ("grad_scale", 1e4)}, guard=guard, probe=probe)
    [detection] = [e for e in get_event_log(trainer) if e.source == "GradientSpikeGuard" and e.action]
    assert detection.kind == "grad_spike" and detection.action == "rollback"
    assert rollback.rollbacks[0]["restored_step"] == 30
    assert rollback.rollbacks[0]["reason"].startswith("grad_spike")
    assert_same_state(probe.states[30], probe.after_rollback[0])


def test_without_a_rollback_callback_the_guard_takes_the_next_rung(tmp_path):
    guard = GradientSpikeGuard(warmup=8, theta=None, ladder=("rollback", "skip"))
    model, loader = tiny_gpt(40)
    trainer = make_trainer(tmp_path, 40, [FaultInjector({33: ("grad_scale", 1e4)}), guard])
    trainer.fit(model, loader)
    assert [(e.step, e.kind, e.action) for e in get_event_log(trainer) if e.action] == [(33, "grad_spike", "skip")]


def test_the_responder_is_unregistered_when_the_fit_ends(tmp_path):
    trainer, _ = fit(tmp_path, 5, InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3))
    assert get_event_log(trainer).has_responder("rollback") is False


class Requester(pl.Callback):
    """Any component can ask for a rollback through the event log."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            get_event_log(trainer).emit(trainer.global_step, "my_check", "MyMonitor", "critical", {}, "rollback")
            for p in pl_module.parameters():
                p.grad = None


def test_any_component_can_request_a_rollback(tmp_path):
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    model, loader = tiny_gpt(30)
    trainer = make_trainer(tmp_path, 30, [Requester(24), rollback])
    trainer.fit(model, loader)
    [record] = rollback.rollbacks
    assert record.pop("seconds") > 0
    assert record == {"step": 25, "restored_step": 20, "reason": "my_check (from MyMonitor)", "lost_steps": 5,
                      "quarantined": 5}


def test_nonfinite_loss_without_a_good_snapshot_skips_the_step(tmp_path):
    # a NaN loss at step 2: nothing is committed yet, but the step must still not reach the weights
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=5)
    trainer, model = fit(tmp_path, 12, rollback, {2: ("loss_nan", None)})
    assert [e.step for e in events(trainer, "rollback_unavailable")] == [3]
    assert rollback.rollbacks == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- quarantine ------------------------------------------------------------------------------------
def test_quarantine_lists_the_discarded_batches(tmp_path):
    probe = StateProbe()
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    trainer, _ = fit(tmp_path, 40, rollback, {27: ("weight_nan", None)}, probe=probe,
                     logger=CSVLogger(tmp_path, name="run"))
    run_dir = trainer.log_dir
    with open(os.path.join(run_dir, "quarantine.json")) as f:
        data = json.load(f)
    [entry] = data["rollbacks"]
    assert entry["restored_step"] == 20 and entry["step"] == 28
    assert [b["step"] for b in entry["batches"]] == list(range(20, 28))
    expected = {i for s in range(20, 28) for i in probe.batch_ids[s]}
    assert read_quarantine(run_dir) == expected
    assert set(data["sample_ids"]) == expected
    assert len(events(trainer, "quarantine")) == 8
    # the batches before the snapshot were kept
    assert not expected & set(probe.batch_ids[19])


# -- budget ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_halt", ["stop", "raise"])
def test_exceeding_the_rollback_budget_halts_with_a_checkpoint(tmp_path, on_halt):
    probe = StateProbe(at_steps=(20,))
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3, max_rollbacks=2, on_halt=on_halt)
    faults = {25: ("weight_nan", None), 27: ("weight_nan", None), 29: ("weight_nan", None)}
    model, loader = tiny_gpt(60)
    trainer = make_trainer(tmp_path, 60, [FaultInjector(faults), rollback, probe])
    if on_halt == "raise":
        with pytest.raises(TrainingHalted, match="max_rollbacks=2"):
            trainer.fit(model, loader)
    else:
        trainer.fit(model, loader)
        assert trainer.global_step == 30
    assert [r["restored_step"] for r in rollback.rollbacks] == [20, 20, 20]
    assert rollback.lost_steps == 10  # steps 20..29, each counted once over three rollbacks to 20
    assert "exceed max_rollbacks=2" in rollback.halt_report
    path = os.path.join(tmp_path, "checkpoints", "rollback-halt-step=30.ckpt")
    assert os.path.exists(path)
    saved = torch.load(path, weights_only=False)
    for (name, _), before in zip(model.named_parameters(), probe.states[20]["weights"]):
        assert torch.equal(saved["state_dict"][name], before)
    assert [e.kind for e in get_event_log(trainer) if e.action == "halt"] == ["rollback_halt"]


def test_rollbacks_outside_the_budget_window_do_not_count(tmp_path):
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3, max_rollbacks=1, budget_window=10)
    trainer, model = fit(tmp_path, 60, rollback, {25: ("weight_nan", None), 45: ("weight_nan", None)})
    assert [r["restored_step"] for r in rollback.rollbacks] == [20, 40]
    assert rollback.halt_report is None and trainer.global_step == 60


# -- LR back-off and TOR ---------------------------------------------------------------------------
class LrProbe(pl.Callback):
    def __init__(self) -> None:
        self.applied: dict[int, float] = {}
        self.scheduled: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):  # registered after the rollback's hook: sees the applied LR
            self.applied[trainer.global_step] = optimizer.param_groups[0]["lr"]
            self.scheduled[trainer.global_step] = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]

        trainer.optimizers[0].register_step_pre_hook(record)


def test_lr_backoff_after_a_rollback(tmp_path):
    lr = LrProbe()
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3, lr_backoff_factor=0.25, lr_backoff_steps=5)
    fit(tmp_path, 40, rollback, {25: ("weight_nan", None)}, probe=lr)
    for step in range(26, 31):
        assert lr.applied[step] == pytest.approx(0.25 * lr.scheduled[step])
    for step in (24, 31, 35):
        assert lr.applied[step] == pytest.approx(lr.scheduled[step])


class _TickClock:
    """The rollback's clock, one second per reading: each optimizer step lasts exactly one second from
    the reading that ends the previous step to the one that ends it (a machine's load cannot move it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_tor_counts_discarded_and_skipped_steps(tmp_path, monkeypatch):
    from lightning_stability.callbacks import rollback as rollback_module

    monkeypatch.setattr(rollback_module, "time", _TickClock())
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3)
    guard = GradientSpikeGuard(warmup=8, theta=None)
    faults = {15: ("grad_nan", None), 25: ("weight_nan", None)}
    trainer, _ = fit(tmp_path, 40, rollback, faults, guard=guard, logger=CSVLogger(tmp_path, name="run"),
                     log_every_n_steps=1)
    # step 15 skipped by the guard; steps 20..25 discarded by the rollback to 20 (25 itself skipped)
    assert rollback.lost_steps == 1 + 6
    summary = rollback.summary
    # 40 steps of one second each, 7 of them lost; the restore read the clock twice (one second)
    assert summary["lost_seconds"] == 7.0 and summary["restore_seconds"] == 1.0
    steps_s = summary["observed_seconds"] - summary["snapshot_seconds"] - summary["restore_seconds"]
    assert steps_s == pytest.approx(40.0)
    assert summary["tor"] == pytest.approx(33.0 / summary["observed_seconds"])
    assert trainer.callback_metrics["stability/rollback/tor"] == pytest.approx(rollback.tor, rel=0.05)
    assert trainer.callback_metrics["stability/rollback/count"] == 1
    [tor_event] = events(trainer, "tor")
    assert tor_event.metrics["tor"] == summary["tor"]


# -- state, memory, arguments ----------------------------------------------------------------------
def test_state_survives_save_and_resume(tmp_path):
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3, lr_backoff_factor=0.5, lr_backoff_steps=50)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True, save_top_k=-1)
    model, loader = tiny_gpt(40, batches=20)
    trainer = make_trainer(tmp_path, 40, [FaultInjector({25: ("weight_nan", None)}), rollback, ckpt],
                           enable_checkpointing=True)
    trainer.fit(model, loader)
    path = str(tmp_path / "ckpt" / "epoch=1-step=40.ckpt")
    saved = torch.load(path, weights_only=False)["callbacks"][rollback.state_key]
    assert saved["rollbacks"] and saved["backoff_until"] == 76 and saved["ring"]

    resumed = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3, lr_backoff_factor=0.5, lr_backoff_steps=50)
    seen: dict[str, Any] = {}

    held: dict[str, Any] = {}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(resumed.state_dict())

    class AfterStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            held.update(ring=resumed.state_dict()["ring"], bytes=resumed.snapshot_bytes)

    model, loader = tiny_gpt(60, batches=20)
    trainer = make_trainer(tmp_path, 60, [AtStart(), resumed, AfterStart()], enable_checkpointing=True)
    trainer.fit(model, loader, ckpt_path=path)
    assert seen == saved
    # the saved snapshots lived in the old process's memory; the one of the checkpoint's own step (40)
    # is the state just restored: the resumed fit holds it again at once, without a second event
    at_40 = [r for r in saved["ring"] if r["step"] == 40]
    assert at_40 and held["bytes"] > 0 and [r for r in held["ring"] if r["step"] == 40] == at_40
    snapshots = [e.step for e in events(trainer, "snapshot")]
    assert snapshots[-3:] == [40, 50, 60] and snapshots.count(40) == 1
    assert resumed.rollbacks == saved["rollbacks"]


def test_refuses_snapshots_that_do_not_fit_in_host_memory(tmp_path):
    model, loader = tiny_gpt(5)
    trainer = make_trainer(tmp_path, 5, [InMemoryRollback(nonfinite_patience=1, max_host_bytes=10_000)])
    with pytest.raises(ValueError, match=r"InMemoryRollback\(keep=2\): keep=2 snapshots of .* KiB need .* KiB of host memory, more than the 9.8 KiB .*\(max_host_bytes=10000\)"):
        trainer.fit(model, loader)


def test_reports_the_bytes_it_holds(tmp_path):
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=5, commit_after=2)
    trainer, model = fit(tmp_path, 12, rollback)
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # two slots: the step-0 snapshot (no Adam state yet) was overwritten; both now hold weights + 2 moments
    expected_slot = params + buffers + 2 * params + 4 * len(list(model.parameters()))
    assert rollback.summary["snapshot_bytes"] == 2 * expected_slot


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"every_n_steps=0\): expected an int >= 1"),
        ({"keep": 1}, r"keep=1\): expected an int >= 2"),
        ({"keep": 2, "commit_after": 100},
         r"keep=2, commit_after=100\): expected commit_after < every_n_steps \* \(keep - 1\) = 100"),
        ({"every_n_steps": 1, "keep": 2}, r"every_n_steps=1, keep=2\): expected every_n_steps \* \(keep - 1\) >= 2"),
        ({"max_rollbacks": 0}, r"max_rollbacks=0"),
        ({"lr_backoff_factor": 1.5}, r"lr_backoff_factor=1.5\): expected a float in \(0, 1\) or None"),
        ({"on_halt": "exit"}, r"on_halt='exit'\): expected 'stop' or 'raise'"),
        ({"max_host_bytes": 0}, r"max_host_bytes=0\): expected an int >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InMemoryRollback(nonfinite_patience=1, **kwargs)


def test_bad_argument_types_are_named():
    with pytest.raises(TypeError, match=r"sample_ids=3\): expected a batch key"):
        InMemoryRollback(nonfinite_patience=1, sample_ids=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"rollback_on_nonfinite_loss='yes'"):
        InMemoryRollback(nonfinite_patience=1, rollback_on_nonfinite_loss="yes")  # type: ignore[arg-type]


def test_repeated_requests_with_nothing_to_restore_halt(tmp_path):
    # a NaN weight at step 2, before any snapshot is committed: every later loss is NaN
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=5, max_rollbacks=2)
    trainer, _ = fit(tmp_path, 30, rollback, {2: ("weight_nan", None)})
    assert [e.step for e in events(trainer, "rollback_unavailable")] == [3, 4, 5]
    assert trainer.global_step == 5
    assert "No snapshot was good to restore" in rollback.halt_report
    assert os.path.exists(os.path.join(tmp_path, "checkpoints", "rollback-halt-step=5.ckpt"))
    saved = torch.load(os.path.join(tmp_path, "checkpoints", "rollback-halt-step=5.ckpt"), weights_only=False)
    assert saved["callbacks"][rollback.state_key]["halt_report"] == rollback.halt_report


def test_numpy_sample_ids_are_written(tmp_path):
    rollback = InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3, sample_ids=lambda b: b["index"].numpy())
    probe = StateProbe()
    fit(tmp_path, 30, rollback, {23: ("weight_nan", None)}, probe=probe)
    assert read_quarantine(tmp_path) == {i for s in range(20, 24) for i in probe.batch_ids[s]}


class _BatchNormNet(pl.LightningModule):
    """A user's regressor with BatchNorm, on plain ``(x, y)`` tuples: a NaN batch poisons its running
    statistics in the forward, before any optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 1))
        self.nan_at: int | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.trainer.global_step == self.nan_at:
            x = x.clone()
            x[0, 0] = float("nan")
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _xy_loader(n: int = 8 * 60):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def test_by_default_one_bad_batch_is_skipped_and_a_state_that_keeps_making_nans_is_rolled_back(tmp_path):
    # one NaN-loss batch (its forward poisons nothing): skipped, no rollback, no steps lost
    pl.seed_everything(0, verbose=False)
    rollback = InMemoryRollback(every_n_steps=10, commit_after=3)
    trainer = make_trainer(tmp_path / "batch", 40, [FaultInjector({25: ("loss_nan", None)}), GradientSpikeGuard(),
                                                     rollback])
    trainer.fit(*tiny_gpt())
    assert rollback.rollbacks == [] and [e.step for e in events(trainer, "nonfinite")] == [25]
    # a NaN written into a weight: every loss after it is NaN; the second non-finite step in a row rolls back
    pl.seed_everything(0, verbose=False)
    rollback = InMemoryRollback(every_n_steps=10, commit_after=3)
    trainer = make_trainer(tmp_path / "weight", 40, [FaultInjector({25: ("weight_nan", None)}), GradientSpikeGuard(),
                                                      rollback])
    model, loader = tiny_gpt()
    trainer.fit(model, loader)
    # (a rollback is recorded at the step after the one that asked: NaN steps 25 and 26, recorded at 27)
    assert [r["step"] for r in rollback.rollbacks] == [27] and rollback.rollbacks[0]["restored_step"] == 20
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # a NaN batch through BatchNorm: the loss and the running statistics are NaN in the same forward, so
    # the next loss would be fine and the buffers still poisoned: rolled back at once
    pl.seed_everything(0, verbose=False)
    model = _BatchNormNet()
    model.nan_at = 25
    rollback = InMemoryRollback(every_n_steps=10, commit_after=3)
    trainer = make_trainer(tmp_path / "bn", 40, [GradientSpikeGuard(), rollback])
    trainer.fit(model, _xy_loader())
    assert [r["step"] for r in rollback.rollbacks] == [26]  # asked at step 25, the first NaN
    assert all(torch.isfinite(b).all() for b in model.buffers())
    with pytest.raises(ValueError, match=r"InMemoryRollback\(nonfinite_patience=0\): expected an int >= 1"):
        InMemoryRollback(nonfinite_patience=0)
