"""InMemoryRollback: recover from a corrupted training state inside the same fit, from host-memory snapshots.

Its pieces: the snapshot ring and probation (``ops/snapshot_ring``, ``ops/snapshot``), the event-log
requests, the trainer's part of a snapshot, the TOR meter, the budget and the quarantine
(``_rollback_*``). A step reads measure -> decide -> act -> emit.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_stability.callbacks._base import (
    StabilityCallback,
    agreement_carrier,
    any_rank,
    check_bool,
    check_fraction,
    check_int,
    check_on_halt,
    is_logging_step,
    synchronised_sources,
)
from lightning_stability.callbacks._rollback_budget import RollbackHistory
from lightning_stability.callbacks._rollback_quarantine import (
    QUARANTINE_FILE,
    BatchLog,
    BatchRecord,
    check_sample_ids,
    quarantine,
    read_quarantine,
    sample_ids_of,
)
from lightning_stability.callbacks._rollback_requests import SKIPPING_ACTIONS, Requests, nonfinite_buffers
from lightning_stability.callbacks._rollback_snapshots import Snapshots
from lightning_stability.callbacks._rollback_state import (
    restore_training_state,
    skip_step,
)
from lightning_stability.callbacks._rollback_tor import TorMeter
from lightning_stability.core.lightning import log_metrics, step_loss
from lightning_stability.events import StabilityEvent
from lightning_stability.ops.snapshot_ring import ring_shape


class InMemoryRollback(StabilityCallback):
    r"""Keeps recent snapshots of the training state in host memory and restores one when training goes bad.

    Every ``every_n_steps`` optimizer steps (and at the start) it copies the parameters and buffers,
    every optimizer's state (8-bit codes included), the LR schedulers, the AMP scaler, the random
    generators and the other stability callbacks' states into a ring of ``keep`` host slots (pinned
    and non-blocking on CUDA). A snapshot is *good* after ``commit_after`` steps without a critical
    event, an acted-on warning or a non-finite loss; one taken during a spike is dropped.

    A rollback restores the newest good snapshot in place, at the end of the step that asked for it:
    an event whose ``action`` is ``"rollback"``, or non-finite losses (``nonfinite_patience`` steps in a
    row, each skipped). The optimizer's step counts and the LR schedule are rewound with the
    weights; the batches since the snapshot are quarantined (``quarantine`` events and
    ``<log_dir>/quarantine.json``, :func:`read_quarantine`). More than ``max_rollbacks`` requests
    within ``budget_window`` steps halt with a checkpoint and a report (``on_halt``). The Training
    Overhead Ratio (TOR) is logged and reported at the end. Under DDP every rank snapshots, commits
    and restores at the same step. ``docs/rollback.md`` tells each of these in full.

    Logged metrics (at the logger's cadence): ``stability/rollback/tor`` (the Training Overhead Ratio so
    far, 1.0: nothing lost), ``.../count`` (rollbacks), ``.../lost_steps`` (optimizer steps whose work
    was discarded or skipped), ``.../snapshot_mb`` (host memory of the snapshots, MiB) and
    ``stability/events/<kind>`` (this callback's events of each kind so far).

    Event kinds: ``snapshot``, ``snapshot_committed``, ``snapshot_discarded``, ``snapshot_skipped``,
    ``rollback``, ``quarantine``, ``rollback_unavailable``, ``rollback_halt``, ``tor``.

    Example::

        from lightning_stability import GradientSpikeGuard, InMemoryRollback
        trainer = pl.Trainer(callbacks=[GradientSpikeGuard(), InMemoryRollback(every_n_steps=100)])

    Args:
        every_n_steps: optimizer steps between snapshots (>= 1).
        keep: snapshot slots (>= 2: the newest good snapshot is never overwritten by a new one on
            probation). Left out: 2, or as many as the ``commit_after`` passed needs.
        commit_after: healthy steps after a snapshot before it may be restored (>= 1, and less than
            ``every_n_steps * (keep - 1)`` so that a snapshot can be committed before its slot is reused).
            Left out: 20, shortened to ``every_n_steps * (keep - 1) - 1`` where the ring is shorter.
        max_rollbacks: rollbacks allowed within ``budget_window`` steps (>= 1); one more halts.
        budget_window: the window, in optimizer steps, of the rollback budget (>= 1).
        rollback_on_nonfinite_loss: skip each step with a NaN or infinite loss; roll back after ``nonfinite_patience``
            in a row, or at once when a buffer went non-finite (BatchNorm after a NaN batch).
        nonfinite_patience: those steps in a row (>= 1; 1: roll back at the first non-finite loss).
        lr_backoff_factor: multiply the LR by this (in (0, 1)) for ``lr_backoff_steps`` after a
            rollback; ``None`` for no back-off.
        lr_backoff_steps: length of the back-off in optimizer steps (>= 1).
        sample_ids: where batches carry their sample ids: a key of a mapping batch (a dict or a
            ``BatchEncoding``) or the name of a batch attribute (a dataclass field) holding a tensor, a
            sequence or an int (default ``"index"``), a function ``batch -> ids``, or ``None``. A batch
            without such ids (a plain ``(x, y)`` tuple, say) is recorded by its position: epoch, batch
            index and rank; nothing of the batch itself is kept.
        max_host_bytes: host memory the snapshots of this process may use; ``None`` reads what the
            machine (and its container limit) has available, shared among the local ranks.
        on_halt: ``"stop"`` (set ``trainer.should_stop``) or ``"raise"`` (raise :class:`TrainingHalted`).
        name: distinguishes several instances in one trainer (their checkpoint ``state_key``).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        keep: int | None = None,
        commit_after: int | None = None,
        max_rollbacks: int = 3,
        budget_window: int = 1000,
        rollback_on_nonfinite_loss: bool = True,
        nonfinite_patience: int = 2,
        lr_backoff_factor: float | None = None,
        lr_backoff_steps: int = 100,
        sample_ids: str | Callable[[Any], Any] | None = "index",
        max_host_bytes: int | None = None,
        on_halt: Literal["stop", "raise"] = "stop",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        cls = type(self).__name__
        self.every_n_steps = check_int(cls, "every_n_steps", every_n_steps, 1)
        keep = check_int(cls, "keep", keep, 2) if keep is not None else None
        commit_after = check_int(cls, "commit_after", commit_after, 1) if commit_after is not None else None
        self.keep, self.commit_after = ring_shape(cls, self.every_n_steps, keep, commit_after)
        self.max_rollbacks = check_int(cls, "max_rollbacks", max_rollbacks, 1)
        self.budget_window = check_int(cls, "budget_window", budget_window, 1)
        self.rollback_on_nonfinite_loss = check_bool(cls, "rollback_on_nonfinite_loss", rollback_on_nonfinite_loss)
        self.nonfinite_patience = check_int(cls, "nonfinite_patience", nonfinite_patience, 1)
        self.lr_backoff_factor = (None if lr_backoff_factor is None
                                  else check_fraction(cls, "lr_backoff_factor", lr_backoff_factor, optional=True))
        self.lr_backoff_steps = check_int(cls, "lr_backoff_steps", lr_backoff_steps, 1)
        self.sample_ids = check_sample_ids(cls, sample_ids)
        self.max_host_bytes = None if max_host_bytes is None else check_int(cls, "max_host_bytes", max_host_bytes, 1)
        self._snapshots = Snapshots(InMemoryRollback, self.keep, self.commit_after, keep is not None,
                                    self.max_host_bytes)
        self.on_halt = check_on_halt(cls, on_halt)

        self.summary: dict[str, float] = {}
        self._trainer_ref: Any = None
        self._carrier_later = False  # a callback after this one in the list carries its agreement flags
        self._synchronised: set[str] | None = None  # event sources every rank sees alike (None: all)
        self._run_dir = "."
        self._reset_run()

    def _reset_run(self) -> None:
        """Everything one fit accumulates (and a checkpoint restores)."""
        self._counts: dict[str, int] = {}
        self._history = RollbackHistory(self.max_rollbacks, self.budget_window)
        self._snapshots.reset()
        self._tor = TorMeter()
        self._quarantined = 0
        self._backoff_until = -1
        self._batches = BatchLog()  # since the oldest snapshot held (all quarantined on a rollback to it)
        # within the current step
        self._losses_seen = -1  # the shared step loss's count of losses when this callback last read it
        self._nonfinite = False  # this batch's loss was not finite: every optimizer step of it is skipped
        self._requests = Requests(self.nonfinite_patience)
        self._agreed = False  # the ranks have agreed on this step's flags
        self._halted = False
        self._last_step = -1
        self._mark = time.perf_counter()

    # -- state -----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self._counts),
            **self._history.state_dict(),
            **self._snapshots.state_dict(),
            **self._tor.state_dict(),
            "quarantined_batches": self._quarantined,
            "backoff_until": self._backoff_until,
            "halt_report": self.halt_report,
            **self._requests.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._counts = {str(k): int(v) for k, v in dict(state_dict.get("counts", {})).items()}
        self._history.load_state_dict(state_dict)
        self._snapshots.load_state_dict(state_dict)
        self._tor.load_state_dict(state_dict)
        self._quarantined = int(state_dict.get("quarantined_batches", 0))
        self._backoff_until = int(state_dict.get("backoff_until", -1))
        self.halt_report = state_dict.get("halt_report")
        self._requests.load_state_dict(state_dict)

    @property
    def tor(self) -> float:
        """Training Overhead Ratio: ideal training time over observed training time (1.0 before any step)."""
        return self._tor.tor

    @property
    def lost_steps(self) -> int:
        """Optimizer steps whose work did not count: discarded by a rollback, or skipped."""
        return self._tor.lost_steps

    @property
    def snapshot_bytes(self) -> int:
        """Host memory held by the snapshot slots of this process."""
        return self._snapshots.ring.nbytes

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        """One record per rollback: ``step``, ``restored_step``, ``reason``, ``lost_steps``, ``quarantined``, ``seconds``."""
        return [dict(r) for r in self._history.rollbacks]

    # -- setup and teardown ----------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._reset_run()  # a checkpoint, if any, is restored after setup
        self.summary = {}
        self.halt_report = None
        self._snapshots.ring.clear()
        self._run_dir = (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir
        log = self.event_log(trainer)
        log.register_responder("rollback", self.source)
        self.listen(trainer, self._on_event)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.event_log(trainer).unregister_responder("rollback")
            self._snapshots.release()  # give the host memory back
        super().teardown(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer_ref = weakref.ref(trainer)
        self._synchronised = synchronised_sources(trainer) if trainer.world_size > 1 else None
        carrier = agreement_carrier(trainer)
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        self._carrier_later = carrier is not None and callbacks.index(carrier) > callbacks.index(self)
        self._agreed = False
        self._snapshots.refuse_short_memory(trainer, pl_module)
        self.register_lr_provider(trainer, lambda index: self._lr_factors)
        self._last_step = trainer.global_step
        first = self._snapshots.first(trainer.global_step)
        if first is not None:
            self._take_snapshot(trainer, pl_module, *first)
        self._mark = time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.summary, line = self._tor.report(type(self).__name__, len(self._history.rollbacks),
                                              self._snapshots.taken, len(self._snapshots.ring.slots), self.snapshot_bytes)
        self.emit(trainer, "tor", "info", self.summary, None)
        rank_zero_info(line)

    # -- measure: what the step and the event log say ----------------------------------------------
    def _on_event(self, event: StabilityEvent) -> None:
        if event.source == self.source:
            return
        # Every rank sees the stability callbacks' events alike; any other event waits for the ranks'
        # next agreement (the next optimizer step's, or this one's when it comes before it).
        self._requests.note(event, self._synchronised is None or event.source in self._synchronised)
        if event.action in SKIPPING_ACTIONS:
            self._tor.skip(event.step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        ids = sample_ids_of(batch, self.sample_ids)
        self._batches.add(BatchRecord(trainer.global_step, trainer.current_epoch, batch_idx, ids))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The step's one agreement between ranks: a non-finite loss on any rank, and the requests
        # and warnings that not every rank may have seen. The step must be skipped before it runs.
        # A carrier later in this hook (GradientSpikeGuard) takes the flags in its own collective;
        # one earlier has taken them already. Without one: one all-reduce of three flags.
        if (not self._agreed or self._loss_is_new(trainer)) and not self._carrier_later:
            flags = self.agreement_flags(trainer)
            if flags is not None:
                self.on_agreement(trainer, any_rank(trainer, [bool(f) for f in flags]))
        self._hold_step(trainer)

    @override
    def agreement_flags(self, trainer: pl.Trainer) -> list[Any] | None:
        if self._agreed and not self._loss_is_new(trainer):
            return None
        losses = step_loss(trainer)
        loss = losses.value(trainer.global_step) if self._loss_is_new(trainer) else None
        self._losses_seen = losses.added
        self._agreed = True
        # a 0-d tensor: a carrier gathers it with its own numbers, without a device-to-host copy here
        nonfinite = (~torch.isfinite(loss)).float() if self.rollback_on_nonfinite_loss and loss is not None else False
        return [nonfinite, *self._requests.pending_flags()]

    @override
    def on_agreement(self, trainer: pl.Trainer, flags: list[bool]) -> None:
        nonfinite, request, trouble = flags
        corrupted = nonfinite and self._requests.patient(trainer.global_step) and any_rank(
            trainer, [nonfinite_buffers(trainer.lightning_module)])[0]
        self._requests.agree(request, trouble, nonfinite, trainer.global_step, corrupted)
        if nonfinite:
            self._nonfinite = True
        self._hold_step(trainer)

    def _loss_is_new(self, trainer: pl.Trainer) -> bool:
        """A loss was back-propagated since this callback last read the step's loss."""
        return step_loss(trainer).added != self._losses_seen

    def _hold_step(self, trainer: pl.Trainer) -> None:
        """Keep this batch's optimizer steps from running after a non-finite loss, or once halted."""
        if self._nonfinite:
            self._tor.skip(trainer.global_step)
        if self._halted or self._nonfinite:
            skip_step(trainer)
            if self._halted:
                trainer.should_stop = True  # min_steps/min_epochs keep Lightning going; nothing is applied

    # -- decide, once per optimizer step -----------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._agreed = False
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        elapsed = time.perf_counter() - self._mark
        # Lightning may go on after a halt (min_steps, min_epochs); those steps are skipped: lost time
        self._tor.step_ended(self._last_step, elapsed, halted=self._halted)
        self._last_step = step
        self._nonfinite = False
        if self._halted:
            self._mark = time.perf_counter()
            return

        # The same on every rank without a collective: the flags come from events every rank saw
        # and from the ranks' agreement before the optimizer step.
        request, reason, trouble = self._requests.take()
        if request:
            self._rollback(trainer, pl_module, reason)
        else:
            self._advance_probation(trainer, step, trouble)
            if step % self.every_n_steps == 0 or self._snapshots.due:
                if trouble:
                    self._snapshots.due = True  # not while this step is in trouble: at the next healthy one
                else:
                    self._take_snapshot(trainer, pl_module)
        if is_logging_step(trainer) or request:
            self._log_metrics(trainer, pl_module, request)
        self._mark = time.perf_counter()

    # -- act: snapshots --------------------------------------------------------------------------
    def _take_snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, announce: bool = True, committed: bool = False
    ) -> None:
        seconds = self._snapshots.take(trainer, pl_module, partial(self.emit, trainer), announce, committed)
        if seconds is not None:
            self._prune()
            self._tor.snapshot_s += seconds

    def _advance_probation(self, trainer: pl.Trainer, step: int, trouble: bool) -> None:
        if self._snapshots.probation(step, trouble, partial(self.emit, trainer)):
            self._prune()

    def _prune(self) -> None:
        """Forget per-step records older than every snapshot held (no rollback can discard them now)."""
        oldest = self._snapshots.ring.oldest_step(default=self._last_step)
        self._batches.prune(oldest)
        self._tor.prune(oldest)

    # -- act: rollback ---------------------------------------------------------------------------
    def _rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        step = trainer.global_step
        self._snapshots.ring.distrust()  # a snapshot still on probation is not trusted
        good = self._snapshots.ring.newest_good()
        count = self._history.requests_in_window(step)
        over_budget = self._history.over_budget(step)
        if good is None:
            self._history.unavailable.append(step)
            self.emit(trainer, "rollback_unavailable", "critical", {}, None)
            if over_budget:
                self._halt(trainer, step, count, None)
                return
            rank_zero_warn(
                f"{type(self).__name__}: rollback requested at step {step} ({reason}) but no snapshot has been "
                f"committed yet (a snapshot needs {self.commit_after} healthy steps after it); training goes on."
            )
            return

        start = time.perf_counter()
        restore_training_state(trainer, pl_module, good.snapshot, InMemoryRollback)
        self._tor.discard(good.step, step)
        records = quarantine(self._batches.take_since(good.step), trainer.global_rank, trainer.world_size,
                             trainer.is_global_zero, self._run_dir, (step, good.step, reason),
                             lambda metrics, details: self.emit(trainer, "quarantine", "info", metrics, None,
                                                                details=details),
                             type(self).__name__)
        self._quarantined += len(records)
        if self.lr_backoff_factor is not None:
            self._backoff_until = step + self.lr_backoff_steps
        seconds = time.perf_counter() - start
        self._tor.restore_s += seconds
        metrics = self._history.record(step, good.step, reason, len(records), seconds)
        self.emit(trainer, "rollback", "warning", metrics, "rollback")
        if over_budget:
            self._halt(trainer, step, count, good.step)

    # -- emit ------------------------------------------------------------------------------------
    def _halt(self, trainer: pl.Trainer, step: int, count: int, restored: int | None) -> None:
        path = os.path.join(self._run_dir, "checkpoints", f"rollback-halt-step={step}.ckpt")
        quarantine = os.path.join(self._run_dir, QUARANTINE_FILE)
        report = self._history.halt_report(type(self).__name__, step, count, restored, path, quarantine)
        self.halt(trainer, report, path, "rollback_halt", {"rollbacks": float(count)})

    def _lr_factors(self, optimizer: torch.optim.Optimizer) -> list[float] | None:
        """The back-off after a rollback, for this step (``None``: no change)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None or self.lr_backoff_factor is None or trainer.global_step >= self._backoff_until:
            return None
        return [self.lr_backoff_factor] * len(optimizer.param_groups)

    def _log_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, detection: bool) -> None:
        metrics = {
            "stability/rollback/tor": self.tor,
            "stability/rollback/count": float(len(self._history.rollbacks)),
            "stability/rollback/lost_steps": float(self.lost_steps),
            "stability/rollback/snapshot_mb": self.snapshot_bytes / 2**20,
        }
        metrics.update(self.event_count_metrics())
        log_metrics(trainer, metrics, detection)


__all__ = ["InMemoryRollback", "read_quarantine", "QUARANTINE_FILE"]
