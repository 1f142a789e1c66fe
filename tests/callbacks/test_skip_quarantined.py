"""Never train on a quarantined sample again: in later epochs of the run, and after a resume."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    QuarantineSampler,
    SkipQuarantined,
    get_event_log,
)
from lightning_stability.demos import FaultInjector, TinyGPT, make_dataloader


def test_quarantined_indices_are_replaced_by_the_next_ones_and_the_length_kept():
    sampler = QuarantineSampler(SequentialSampler(range(10)), {2, 5, 6})
    out = list(sampler)
    assert len(out) == len(sampler) == 10 and not {2, 5, 6} & set(out)
    assert out == [0, 1, 0, 3, 4, 1, 3, 7, 8, 9]  # each slot filled by the next kept index, in turn
    assert sampler.skipped == 3
    # a random order: the same holds for every epoch's permutation
    random = QuarantineSampler(RandomSampler(range(50), generator=torch.Generator().manual_seed(0)), set(range(0, 50, 3)))
    assert all(len(list(random)) == 50 and not set(range(0, 50, 3)) & set(random) for _ in range(3))


def test_under_ddp_every_rank_keeps_its_number_of_samples():
    ids = {1, 4, 9, 16, 25}
    ranks = [QuarantineSampler(DistributedSampler(range(30), num_replicas=2, rank=r, shuffle=True, seed=0), ids)
             for r in (0, 1)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)  # passed on: the shuffle follows the epoch
        seen = [list(s) for s in ranks]
        assert len(seen[0]) == len(seen[1]) == 15  # the same number of batches on every rank: no rank waits
        assert not ids & (set(seen[0]) | set(seen[1]))
    assert ranks[0].sampler.epoch == 1


def test_with_every_sample_quarantined_nothing_is_left_out():
    with pytest.warns(UserWarning, match="every sample of this epoch is quarantined"):
        assert list(QuarantineSampler(SequentialSampler(range(3)), {0, 1, 2})) == [0, 1, 2]


class SeenIds(pl.Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.by_step[trainer.global_step] = batch["index"].tolist()


def _trainer(root, steps, callbacks, **kw):
    return pl.Trainer(default_root_dir=root, max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def test_quarantined_samples_are_never_seen_again_in_the_run_nor_after_a_resume(tmp_path):
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 30, seed=0, shuffle=True)  # 30 a epoch
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=200, warmup_steps=10)
    seen, skip = SeenIds(), SkipQuarantined()
    # a NaN loss at step 25: the rollback restores the snapshot of step 20 and quarantines the batches of 20..25
    callbacks = [FaultInjector({25: ("loss_nan", None)}), seen, GradientSpikeGuard(),
                 InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3), skip,
                 ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=70)]
    trainer = _trainer(tmp_path, 70, callbacks)
    trainer.fit(model, loader)
    quarantined = set(json.loads((tmp_path / "quarantine.json").read_text())["sample_ids"])
    assert len(quarantined) == 8 * 6  # six batches of eight, each its own samples (shuffled epochs)
    assert skip.ids == quarantined  # learned from the rollback's events, without reading the file
    later = {i for step, ids in seen.by_step.items() if step >= 30 for i in ids}  # the epochs after the rollback's
    assert later and not later & quarantined
    skipped = [e.metrics["samples"] for e in get_event_log(trainer) if e.kind == "quarantine_skip"]
    assert skipped[0] == 48  # the whole epoch after the rollback's: each quarantined sample once (then a part one)
    # a new process would start here: a new trainer, resumed from the checkpoint, reads the file
    pl.seed_everything(0, verbose=False)
    loader, _ = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 30, seed=0, shuffle=True)
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=200, warmup_steps=10)
    resumed_seen, fresh = SeenIds(), SkipQuarantined()
    _trainer(tmp_path, 130, [resumed_seen, fresh]).fit(model, loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    after = {i for ids in resumed_seen.by_step.values() for i in ids}
    assert len(resumed_seen.by_step) == 60 and after and not after & quarantined
    assert fresh.ids == quarantined


class Poisoned(pl.Callback):
    """A data fault: every batch holding sample ``bad`` gives a NaN loss, each time it is seen."""

    def __init__(self, bad: int) -> None:
        self.bad, self.hook, self.seen_at = bad, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.bad in batch["index"].tolist():
            self.seen_at.append(trainer.global_step)
            self.hook = pl_module.register_forward_hook(lambda m, a, out: out + float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def test_retry_tells_a_data_fault_that_spikes_again_from_a_transient_one(tmp_path):
    pl.seed_everything(0, verbose=False)
    loader, ds = make_dataloader(block_size=16, batch_size=8, n_samples=8 * 30, seed=0, shuffle=True)  # 30 a epoch
    model = TinyGPT(len(ds.vocab), block_size=16, d_model=32, n_layer=1, n_head=2, max_steps=200, warmup_steps=10)
    seen, skip = SeenIds(), SkipQuarantined(retry=True)
    bad = 7
    poison = Poisoned(bad)
    callbacks = [FaultInjector({25: ("loss_nan", None)}), poison, seen, GradientSpikeGuard(),
                 InMemoryRollback(nonfinite_patience=1, every_n_steps=10, commit_after=3), skip]
    trainer = _trainer(tmp_path, 120, callbacks)  # four epochs
    trainer.fit(model, loader)
    events = get_event_log(trainer)
    rollbacks = [e.step for e in events if e.kind == "rollback"]
    # the transient fault at 25 rolls back at 26; the bad sample at 28 (its first epoch) and at 45 (its
    # retry, in the next epoch) rolls back twice, and is never seen again
    assert rollbacks == [26, 29, 46] and poison.seen_at == [28, 45]
    verdicts = [e for e in events if e.kind == "quarantine_verdict"]
    faults = {i for e in verdicts for i in e.details.get("data_fault", [])}
    transient = {i for e in verdicts for i in e.details.get("transient", [])}
    # a data fault: in the batch of a step that spiked twice (the others each rollback discarded are not
    # suspects); the bad sample, and any other that shared a spiking batch twice by chance
    culprits = [set(seen.by_step[r - 1]) for r in rollbacks]
    assert bad in faults and faults == {i for i in set().union(*culprits) if sum(i in c for c in culprits) >= 2}
    assert faults == skip.ids and not faults & transient
    # the samples quarantined with the transient fault came back, were trained on again and judged transient
    at_25 = {i for e in events if e.kind == "quarantine" and e.step == 26 for i in e.details["sample_ids"]}
    assert len(at_25) == 48 and (at_25 - faults) <= transient
    later = {i for step, ids in seen.by_step.items() if step >= 60 for i in ids}
    assert (at_25 - faults) <= later and not faults & later
    assert not skip.trial  # every sample on trial judged by the end of the run
    # the verdicts survive a resume exactly
    state = skip.state_dict()
    again = SkipQuarantined(retry=True)
    again.load_state_dict(state)
    assert again.state_dict() == state and again.ids == skip.ids and again.verdicts == skip.verdicts
