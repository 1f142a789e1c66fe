"""Host reads of the stability callbacks together, on a user's model: one per optimizer step on quiet
steps (no check, sample, snapshot or logging step), in a single process. On a GPU each read stalls the
host until the backward is done, so every callback's per-step flags ride in the guard's one read."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from tests.callbacks._host_reads import Clock, CountReads, Monitors
from tests.clients.models import Client, loader

pytest.importorskip("transformers")
STEPS = 60


def test_one_host_read_a_step_for_all_the_callbacks_together_on_quiet_steps(tmp_path):
    pl.seed_everything(0, verbose=False)
    monitors = Monitors()
    with CountReads() as reads:
        trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                             callbacks=[Clock(reads), *monitors.callbacks()], enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Client("gpt2", max_steps=STEPS), loader("gpt2", "dict", n=8 * STEPS))
    quiet = monitors.quiet_steps(trainer, STEPS)
    assert len(quiet) >= 45
    assert {s: reads.by_step[s] for s in quiet} == {s: 1 for s in quiet}, reads.where.most_common(5)
    # that one read is the guard's: its statistics and the rollback's flags in one transfer
    assert all(reads.callers[s] == ["_spike_measure.py"] for s in quiet)


def test_under_ddp_every_rank_reads_once_a_quiet_step(tmp_path):
    """Under DDP the guard's one collective carries every callback's flags, so its one read is the
    step's only one on every rank."""
    from tests.callbacks._two_ranks import run_two_ranks

    ranks = run_two_ranks("ddp_host_reads_script.py", tmp_path, timeout=300)
    for rank in ranks:
        assert len(rank["reads"]) >= 25
        assert set(rank["reads"].values()) == {1}, rank["where"]
        assert rank["callers"] == ["_spike_measure.py"]


@pytest.mark.gpu
def test_on_a_gpu_quiet_steps_synchronise_once_under_sync_debug_mode(tmp_path):
    """On a GPU, under ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising call the package
    makes warns; on quiet steps there is one, the guard's."""
    import traceback
    import warnings

    import torch

    from tests.callbacks._host_reads import Clock

    class Syncs:
        step: int | None = None

        def __init__(self) -> None:
            self.by_step: dict[int, list[str]] = {}

    syncs = Syncs()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        ours = [f for f in traceback.extract_stack() if "lightning_stability" in f.filename and "demos.py" not in f.filename]
        if syncs.step is not None and ours and "synchroniz" in str(message):
            syncs.by_step.setdefault(syncs.step, []).append(ours[-1].filename.rsplit("/", 1)[-1])

    pl.seed_everything(0, verbose=False)
    monitors = Monitors()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=STEPS, accelerator="gpu", devices=1, logger=False,
                         callbacks=[Clock(syncs), *monitors.callbacks()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            trainer.fit(Client("gpt2", max_steps=STEPS), loader("gpt2", "dict", n=8 * STEPS))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    quiet = [s for s in monitors.quiet_steps(trainer, STEPS) if s >= 2 and s % 50 != 49]  # no set-up, no logging step
    assert len(quiet) >= 40
    assert {s: syncs.by_step.get(s, []) for s in quiet} == {s: ["_spike_measure.py"] for s in quiet}
