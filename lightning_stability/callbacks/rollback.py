"""InMemoryRollback: recover from a corrupted training state inside the same fit, from host-memory snapshots."""

from __future__ import annotations

import copy
import json
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability.callbacks._base import (
    StabilityCallback,
    agreement_carrier,
    any_rank,
    check_int,
    check_on_halt,
    check_positive,
    grad_scaler,
    is_logging_step,
    log_step_metrics,
    synchronised_sources,
)
from lightning_stability.events import StabilityEvent
from lightning_stability.ops.ladder import ACTIONS
from lightning_stability.ops.optim_state import unwrap_optimizer
from lightning_stability.ops.snapshot import (
    HostSnapshot,
    available_host_memory,
    estimate_optimizer_state_bytes,
    module_tensors,
    nbytes,
)

QUARANTINE_FILE = "quarantine.json"
# Actions after which the optimizer step did not update the weights (every rung above ``clip`` skips
# the step): its time is lost time.
_SKIPPING_ACTIONS = frozenset(ACTIONS) - {"clip"}


@dataclass
class _Slot:
    snapshot: HostSnapshot = field(default_factory=HostSnapshot)
    committed: bool = False

    @property
    def step(self) -> int:
        return self.snapshot.step


@dataclass
class _Batch:
    step: int  # the optimizer step the batch contributed to
    epoch: int
    batch_idx: int
    sample_ids: Any  # a tensor or a sequence, converted to a list only when the batch is quarantined


class InMemoryRollback(StabilityCallback):
    r"""Keeps recent snapshots of the training state in host memory and restores one when training goes bad.

    Every ``every_n_steps`` optimizer steps (and when training starts) the callback copies into host
    memory: the model's parameters and buffers, every optimizer's state (bitsandbytes 8-bit codes and
    block scales included) and hyperparameters, the LR schedulers, the AMP loss scaler, the random
    generators (torch, CUDA, numpy, python) and the states of the other stability callbacks. On CUDA
    the copy goes to pinned memory without making the host wait. A ring of ``keep`` slots is reused.

    A snapshot becomes *good* only after ``commit_after`` optimizer steps have followed it without a
    critical event, a warning that something acted on (a detection the guard answered, an
    intervention) and with finite losses; one taken while a spike was under way is dropped. Advice (a
    monitor's warning with no action) does not count against a snapshot. A snapshot is postponed while the current step itself is in trouble.

    A rollback restores the newest good snapshot, in place (the same parameter and state tensors: the
    optimizer, DDP and hooks keep their references). It happens at the end of the optimizer step in
    which it was asked for:

    - by any component through the event log: an event whose ``action`` is ``"rollback"`` (this is
      what :class:`GradientSpikeGuard` emits when its ladder reaches ``rollback``);
    - on a non-finite loss (``rollback_on_nonfinite_loss``); that step is skipped first, so the NaN
      never reaches the weights even when there is no good snapshot yet.

    Training then goes forward: Lightning's step counter is not rewound (``max_steps`` bounds the
    work done, lost steps included) while the optimizer's step counts and the LR schedule are, with
    the weights. The batches consumed since the snapshot are not replayed: they are *quarantined*,
    recorded in the event log (``quarantine`` events) and in ``<log_dir>/quarantine.json`` with their
    sample ids where the batch carries them (see :func:`read_quarantine` to skip them in a later run).
    An optional LR back-off (``lr_backoff_factor`` for ``lr_backoff_steps``) eases the way back.

    At most ``max_rollbacks`` rollbacks (requests with nothing to restore included) may happen within
    ``budget_window`` steps. One more restores the newest good snapshot (if any), saves a normal checkpoint to ``<log_dir>/checkpoints/`` and halts with
    a report (``on_halt``: stop the fit, or raise :class:`TrainingHalted`).

    The Training Overhead Ratio (TOR) is the share of the fit's training time that went into steps
    that count: ideal time over observed time, where the time of discarded and skipped steps and of
    taking and restoring snapshots is the difference. It is logged, and reported when the fit ends
    (``summary``, and a ``tor`` event).

    Under DDP every rank snapshots, commits and restores at the same step: the per-step decision is
    one all-reduce of three flags before the optimizer step (a non-finite loss on any rank, and the
    requests and warnings of sources outside the stability callbacks, which may have come from one
    rank only; such an event that comes after that point is acted on one step later).

    The callback's own state (ring metadata, counters, the rollback history, a postponed snapshot) is
    saved in checkpoints; the snapshots are not. A resumed fit takes one at once: silently when the
    checkpoint's step is a snapshot step (it is the same state), as a new ``snapshot`` event otherwise;
    a snapshot that was postponed is taken at the same step as without the interruption. Resuming
    from a checkpoint taken at a snapshot step therefore decides as the uninterrupted fit would, unless
    a rollback reaches back past the checkpoint before the next snapshot is committed.
    A configuration whose snapshots cannot fit in the available host memory is refused when training
    starts.

    Logged metrics (at the logger's cadence):

    ===================================  ==========================================================
    key                                  meaning
    ===================================  ==========================================================
    ``stability/rollback/tor``           Training Overhead Ratio so far (1.0: nothing lost)
    ``stability/rollback/count``         rollbacks so far
    ``stability/rollback/lost_steps``    optimizer steps whose work was discarded or skipped
    ``stability/rollback/snapshot_mb``   host memory held by the snapshots, in MiB
    ``stability/events/<kind>``          cumulative count of this callback's events of each kind
    ===================================  ==========================================================

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
        rollback_on_nonfinite_loss: skip the step and roll back when the loss is NaN or infinite.
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
        self.keep, self.commit_after = _ring_shape(cls, self.every_n_steps, keep, commit_after)
        self._keep_given = keep is not None
        self.max_rollbacks = check_int(cls, "max_rollbacks", max_rollbacks, 1)
        self.budget_window = check_int(cls, "budget_window", budget_window, 1)
        if not isinstance(rollback_on_nonfinite_loss, bool):
            raise TypeError(f"{cls}(rollback_on_nonfinite_loss={rollback_on_nonfinite_loss!r}): expected a bool")
        self.rollback_on_nonfinite_loss = rollback_on_nonfinite_loss
        if lr_backoff_factor is not None:
            lr_backoff_factor = check_positive(cls, "lr_backoff_factor", lr_backoff_factor)
            if lr_backoff_factor >= 1.0:
                raise ValueError(f"{cls}(lr_backoff_factor={lr_backoff_factor!r}): expected a float in (0, 1) or None")
        self.lr_backoff_factor = lr_backoff_factor
        self.lr_backoff_steps = check_int(cls, "lr_backoff_steps", lr_backoff_steps, 1)
        if sample_ids is not None and not isinstance(sample_ids, str) and not callable(sample_ids):
            raise TypeError(f"{cls}(sample_ids={sample_ids!r}): expected a batch key (str), a callable or None")
        self.sample_ids = sample_ids
        if max_host_bytes is not None:
            check_int(cls, "max_host_bytes", max_host_bytes, 1)
        self.max_host_bytes = max_host_bytes
        self.on_halt = check_on_halt(cls, on_halt)

        self.summary: dict[str, float] = {}
        self._slots: list[_Slot] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._trainer_ref: Any = None
        self._carrier_later = False  # a callback after this one in the list carries its agreement flags
        self._synchronised: set[str] | None = None  # event sources every rank sees alike (None: all)
        self._run_dir = "."
        self._reset_run()

    def _reset_run(self) -> None:
        """Everything one fit accumulates (and a checkpoint restores)."""
        self._counts: dict[str, int] = {}
        self._rollbacks: list[dict[str, Any]] = []
        self._ring_meta: list[dict[str, Any]] = []  # the ring as of the last checkpoint (snapshots are not saved)
        self._observed_s = 0.0  # wall time of optimizer steps, without this callback's own work
        self._lost_s = 0.0  # of which: skipped steps and steps discarded by a rollback
        self._snapshot_s = 0.0
        self._restore_s = 0.0
        self._lost_steps = 0  # discarded by rollbacks
        self._discarded_until = -1  # steps before this were already counted as discarded
        self._unavailable: list[int] = []  # steps where a rollback was asked for with nothing to restore
        self._skipped_steps = 0  # skipped, outside the discarded ones
        self._snapshots_taken = 0
        self._quarantined = 0
        self._backoff_until = -1
        # per step, since the oldest snapshot held (all discarded on a rollback to it)
        self._batches: list[_Batch] = []
        self._durations: dict[int, float] = {}
        self._skipped: set[int] = set()
        # within the current step
        self._loss: Tensor | None = None
        self._nonfinite = False  # this batch's loss was not finite: every optimizer step of it is skipped
        self._request: str | None = None
        self._trouble = False
        # requests and warnings from sources some ranks may not have seen, until the ranks agree on them
        self._pending_request: str | None = None
        self._pending_trouble = False
        self._agreed = False  # the ranks have agreed on this step's flags
        self._snapshot_due = False
        self._halted = False
        self._last_step = -1
        self._mark = time.perf_counter()

    # -- state -----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        ring = self._ring() if self._slots else self._ring_meta
        return {
            "counts": dict(self._counts),
            "rollbacks": [dict(r) for r in self._rollbacks],
            "ring": [dict(r) for r in ring],
            "observed_seconds": self._observed_s,
            "lost_seconds": self._lost_s,
            "snapshot_seconds": self._snapshot_s,
            "restore_seconds": self._restore_s,
            "lost_steps": self._lost_steps,
            "discarded_until": self._discarded_until,
            "unavailable": list(self._unavailable),
            "skipped_steps": self._skipped_steps,
            "snapshots_taken": self._snapshots_taken,
            "quarantined_batches": self._quarantined,
            "backoff_until": self._backoff_until,
            "snapshot_due": self._snapshot_due,
            "halt_report": self.halt_report,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._counts = {str(k): int(v) for k, v in dict(state_dict.get("counts", {})).items()}
        self._rollbacks = [dict(r) for r in state_dict.get("rollbacks", [])]
        self._ring_meta = [dict(r) for r in state_dict.get("ring", [])]
        self._observed_s = float(state_dict.get("observed_seconds", 0.0))
        self._lost_s = float(state_dict.get("lost_seconds", 0.0))
        self._snapshot_s = float(state_dict.get("snapshot_seconds", 0.0))
        self._restore_s = float(state_dict.get("restore_seconds", 0.0))
        self._lost_steps = int(state_dict.get("lost_steps", 0))
        self._discarded_until = int(state_dict.get("discarded_until", -1))
        self._unavailable = [int(k) for k in state_dict.get("unavailable", [])]
        self._skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._snapshots_taken = int(state_dict.get("snapshots_taken", 0))
        self._quarantined = int(state_dict.get("quarantined_batches", 0))
        self._backoff_until = int(state_dict.get("backoff_until", -1))
        self._snapshot_due = bool(state_dict.get("snapshot_due", False))
        self.halt_report = state_dict.get("halt_report")
        self._slots = []  # the snapshots of the saved run lived in another process's memory

    def _ring(self) -> list[dict[str, Any]]:
        return [{"step": s.step, "committed": s.committed} for s in sorted(self._slots, key=lambda s: s.step)]

    @property
    def tor(self) -> float:
        """Training Overhead Ratio: ideal training time over observed training time (1.0 before any step)."""
        observed = self._observed_s + self._snapshot_s + self._restore_s
        if observed <= 0:
            return 1.0
        return max(0.0, observed - self._lost_s - self._snapshot_s - self._restore_s) / observed

    @property
    def lost_steps(self) -> int:
        """Optimizer steps whose work did not count: discarded by a rollback, or skipped."""
        return self._lost_steps + self._skipped_steps

    @property
    def snapshot_bytes(self) -> int:
        """Host memory held by the snapshot slots of this process."""
        return sum(slot.snapshot.nbytes for slot in self._slots)

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        """One record per rollback: ``step``, ``restored_step``, ``reason``, ``lost_steps``, ``quarantined``, ``seconds``."""
        return [dict(r) for r in self._rollbacks]

    # -- setup and teardown ----------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._reset_run()  # a checkpoint, if any, is restored after setup
        self.summary = {}
        self.halt_report = None
        self._slots = []
        self._run_dir = (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir
        log = self.event_log(trainer)
        log.register_responder("rollback", self.source)
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._unsubscribe = log.subscribe(self._on_event)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            self.event_log(trainer).unregister_responder("rollback")
            self._ring_meta = self._ring()
            self._slots = []  # give the host memory back
        super().teardown(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer_ref = weakref.ref(trainer)
        self._synchronised = synchronised_sources(trainer) if trainer.world_size > 1 else None
        carrier = agreement_carrier(trainer)
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        self._carrier_later = carrier is not None and callbacks.index(carrier) > callbacks.index(self)
        self._agreed = False
        self._check_memory(trainer, pl_module)
        self.register_lr_provider(trainer, lambda index: self._lr_factors)
        self._last_step = trainer.global_step
        # A fault in the first steps can be undone too. A resumed fit has the ring's steps but not its
        # snapshots: one taken at the checkpoint's own step is the state just restored, captured again
        # without a new event; a snapshot that was postponed comes at the next healthy step, as it
        # would have without the interruption.
        ring = {int(r["step"]): bool(r["committed"]) for r in self._ring_meta}
        if trainer.global_step in ring:
            self._take_snapshot(trainer, pl_module, announce=False, committed=ring[trainer.global_step])
        elif not self._snapshot_due:
            self._take_snapshot(trainer, pl_module)
        self._mark = time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.summary = {
            "tor": self.tor,
            "rollbacks": float(len(self._rollbacks)),
            "lost_steps": float(self.lost_steps),
            "observed_seconds": self._observed_s + self._snapshot_s + self._restore_s,
            "lost_seconds": self._lost_s,
            "snapshot_seconds": self._snapshot_s,
            "restore_seconds": self._restore_s,
            "snapshots": float(self._snapshots_taken),
            "snapshot_bytes": float(self.snapshot_bytes),
        }
        self.emit(trainer, "tor", "info", self.summary, None)
        rank_zero_info(
            f"{type(self).__name__}: {len(self._rollbacks)} rollbacks, {self.lost_steps} steps lost, "
            f"Training Overhead Ratio {self.tor:.4f}; {self._snapshots_taken} snapshots of "
            f"{self.snapshot_bytes / max(len(self._slots), 1) / 2**20:.1f} MiB, "
            f"{self._snapshot_s:.3f} s taking them."
        )

    # -- per step --------------------------------------------------------------------------------
    def _on_event(self, event: StabilityEvent) -> None:
        if event.source == self.source:
            return
        # Every rank sees the stability callbacks' events alike; any other event waits for the ranks'
        # next agreement (the next optimizer step's, or this one's when it comes before it).
        same_on_all_ranks = self._synchronised is None or event.source in self._synchronised
        if event.action == "rollback":
            reason = f"{event.kind} (from {event.source})"
            if same_on_all_ranks:
                self._request = self._request or reason
            else:
                self._pending_request = self._pending_request or reason
        if _troubling(event):
            if same_on_all_ranks:
                self._trouble = True
            else:
                self._pending_trouble = True
        if event.action in _SKIPPING_ACTIONS:
            self._skipped.add(event.step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        ids = self._sample_ids(batch)
        self._batches.append(_Batch(trainer.global_step, trainer.current_epoch, batch_idx, ids))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        value = loss.detach().float().sum()
        self._loss = value if self._loss is None else self._loss + value

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The step's one agreement between ranks: a non-finite loss on any rank, and the requests
        # and warnings that not every rank may have seen. The step must be skipped before it runs.
        # A carrier later in this hook (GradientSpikeGuard) takes the flags in its own collective;
        # one earlier has taken them already. Without one: one all-reduce of three flags.
        if (not self._agreed or self._loss is not None) and not self._carrier_later:
            flags = self.agreement_flags(trainer)
            if flags is not None:
                self.on_agreement(trainer, any_rank(trainer, [bool(f) for f in flags]))
        self._hold_step(trainer)

    @override
    def agreement_flags(self, trainer: pl.Trainer) -> list[Any] | None:
        if self._agreed and self._loss is None:
            return None
        loss, self._loss = self._loss, None
        self._agreed = True
        # a 0-d tensor: a carrier gathers it with its own numbers, without a device-to-host copy here
        nonfinite = (~torch.isfinite(loss)).float() if self.rollback_on_nonfinite_loss and loss is not None else False
        return [nonfinite, self._pending_request is not None, self._pending_trouble]

    @override
    def on_agreement(self, trainer: pl.Trainer, flags: list[bool]) -> None:
        nonfinite, request, trouble = flags
        if request:
            self._request = self._request or self._pending_request or "a request on another rank"
        self._trouble = self._trouble or trouble
        self._pending_request, self._pending_trouble = None, False
        if nonfinite:
            self._nonfinite = True
            self._request = self._request or "nonfinite_loss"
            self._trouble = True
        self._hold_step(trainer)

    def _hold_step(self, trainer: pl.Trainer) -> None:
        """Keep this batch's optimizer steps from running after a non-finite loss, or once halted."""
        if self._nonfinite:
            self._skipped.add(trainer.global_step)
        if self._halted or self._nonfinite:
            # every optimizer of the batch (manual optimization may step several after one backward)
            for opt in trainer.optimizers:
                for group in unwrap_optimizer(opt).param_groups:
                    for p in group["params"]:
                        p.grad = None
            if self._halted:
                trainer.should_stop = True  # min_steps/min_epochs keep Lightning going; nothing is applied

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._agreed = False
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        now = time.perf_counter()
        elapsed = now - self._mark
        self._observed_s += elapsed
        self._durations[self._last_step] = self._durations.get(self._last_step, 0.0) + elapsed
        if self._last_step in self._skipped:
            self._lost_s += elapsed
            self._skipped_steps += 1
        self._last_step = step
        self._nonfinite = False
        if self._halted:
            # Lightning may go on (min_steps, min_epochs); those steps are skipped: lost time
            self._lost_s += elapsed
            self._skipped_steps += 1
            self._mark = time.perf_counter()
            return

        # The same on every rank without a collective: the flags come from events every rank saw
        # and from the ranks' agreement before the optimizer step.
        request, trouble = self._request is not None, self._trouble
        reason = self._request or "a request on another rank"
        self._request, self._trouble = None, False
        if request:
            self._rollback(trainer, pl_module, reason)
        else:
            self._advance_probation(trainer, step, trouble)
            if step % self.every_n_steps == 0 or self._snapshot_due:
                if trouble:
                    self._snapshot_due = True  # not while this step is in trouble: at the next healthy one
                else:
                    self._take_snapshot(trainer, pl_module)
        if is_logging_step(trainer) or request:
            self._log_metrics(trainer, pl_module, request)
        self._mark = time.perf_counter()

    # -- snapshots -------------------------------------------------------------------------------
    def _optimizers(self, trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
        return [unwrap_optimizer(o) for o in trainer.optimizers]

    def _check_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_snapshot = nbytes(module_tensors(pl_module)) + sum(
            estimate_optimizer_state_bytes(o) for o in self._optimizers(trainer)
        )
        problem = self._memory_problem(trainer, per_snapshot * self.keep, f"keep={self.keep} snapshots of {_mib(per_snapshot)}")
        # every rank refuses together (one may be short of memory, the others would wait for it)
        if any_rank(trainer, [problem is not None])[0]:
            raise ValueError(problem or f"{type(self).__name__}(keep={self.keep}): another rank lacks host memory")

    def _memory_problem(self, trainer: pl.Trainer, needed: int, what: str) -> str | None:
        if self.max_host_bytes is not None:
            limit, source = self.max_host_bytes, f"max_host_bytes={self.max_host_bytes}"
        else:
            available = available_host_memory()
            if available is None:
                return None
            ranks = max(int(getattr(trainer, "num_devices", 1)), 1) if trainer.world_size > 1 else 1
            limit = available // ranks
            source = f"{_mib(available)} available on this machine" + (f", shared by {ranks} local ranks" if ranks > 1 else "")
        if needed <= limit:
            return None
        return (
            f"{type(self).__name__}(keep={self.keep}): {what} need {_mib(needed)} of host memory, more than "
            f"the {_mib(limit)} this process may use ({source}). Lower keep{'' if self._keep_given else ' (2 by default)'} (>= 2), free host memory, "
            "or set max_host_bytes if the limit is wrong."
        )

    def _take_snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, announce: bool = True, committed: bool = False
    ) -> None:
        start = time.perf_counter()
        self._snapshot_due = False
        slot = self._free_slot()
        optimizers = self._optimizers(trainer)
        needed = slot.snapshot.bytes_needed(pl_module, optimizers)
        problem = self._memory_problem(trainer, needed, "the new snapshot slot") if needed else None
        if any_rank(trainer, [problem is not None])[0]:
            # mid-fit: better to go on with the snapshots held than to stop the run
            if slot.step < 0:
                self._slots.remove(slot)
            self.emit(trainer, "snapshot_skipped", "info", {"bytes": float(needed)}, None)
            rank_zero_warn(f"{problem or 'another rank lacks host memory'}; this snapshot is skipped.")
            return
        extra = {
            "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
            "callbacks": {cb.state_key: cb.snapshot_state() for cb in _rewindable(trainer)},
            "scaler": scaler.state_dict() if (scaler := grad_scaler(trainer)) is not None else None,
        }
        slot.snapshot.capture(trainer.global_step, pl_module, optimizers, extra)
        slot.committed = committed
        self._prune()
        seconds = time.perf_counter() - start
        self._snapshot_s += seconds
        if not announce:
            return
        self._snapshots_taken += 1
        self.emit(
            trainer, "snapshot", "info", {"bytes": float(slot.snapshot.nbytes), "seconds": seconds}, None
        )

    def _free_slot(self) -> _Slot:
        if len(self._slots) < self.keep:
            self._slots.append(_Slot())
            return self._slots[-1]
        # The newest good snapshot is never given up for one still on probation.
        good = self._newest_good()
        candidates = [s for s in self._slots if s is not good]
        slot = min(candidates, key=lambda s: s.step)
        self._slots.remove(slot)
        self._slots.append(slot)
        return slot

    def _newest_good(self) -> _Slot | None:
        good = [s for s in self._slots if s.committed]
        return max(good, key=lambda s: s.step) if good else None

    def _advance_probation(self, trainer: pl.Trainer, step: int, trouble: bool) -> None:
        discarded = False
        for slot in list(self._slots):
            if slot.committed:
                continue
            if trouble:
                self._slots.remove(slot)  # taken while something was going wrong: never restore it
                discarded = True
                self.emit(trainer, "snapshot_discarded", "info", {"snapshot_step": float(slot.step)}, None)
            elif step - slot.step >= self.commit_after:
                slot.committed = True
                self.emit(trainer, "snapshot_committed", "info", {"snapshot_step": float(slot.step)}, None)
        # While the ring is unchanged its oldest step is too, and nothing new is old enough to drop.
        if discarded or not self._slots:
            self._prune()

    def _prune(self) -> None:
        """Forget per-step records older than every snapshot held (no rollback can discard them now)."""
        oldest = min((s.step for s in self._slots), default=self._last_step)
        self._batches = [b for b in self._batches if b.step >= oldest]
        self._durations = {k: v for k, v in self._durations.items() if k >= oldest}
        self._skipped = {k for k in self._skipped if k >= oldest}

    # -- rollback --------------------------------------------------------------------------------
    def _rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        step = trainer.global_step
        for slot in [s for s in self._slots if not s.committed]:
            self._slots.remove(slot)  # a snapshot still on probation is not trusted
        good = self._newest_good()
        recent = [r["step"] for r in self._rollbacks] + self._unavailable
        recent = [k for k in recent if k > step - self.budget_window]
        over_budget = len(recent) >= self.max_rollbacks
        if good is None:
            self._unavailable.append(step)
            self.emit(trainer, "rollback_unavailable", "critical", {}, None)
            if over_budget:
                self._halt(trainer, step, len(recent) + 1, None)
                return
            rank_zero_warn(
                f"{type(self).__name__}: rollback requested at step {step} ({reason}) but no snapshot has been "
                f"committed yet (a snapshot needs {self.commit_after} healthy steps after it); training goes on."
            )
            return

        start = time.perf_counter()
        self._restore(trainer, pl_module, good)
        lost = [k for k in self._durations if k >= good.step]
        self._lost_s += sum(self._durations[k] for k in lost if k not in self._skipped)
        self._lost_steps += step - max(good.step, self._discarded_until)  # a second rollback to the same snapshot
        self._discarded_until = step
        self._skipped_steps -= len([k for k in self._skipped if k >= good.step])  # now counted as discarded
        quarantined = [b for b in self._batches if b.step >= good.step]
        self._batches = [b for b in self._batches if b.step < good.step]
        for k in lost:
            self._durations.pop(k, None)
        self._skipped = {k for k in self._skipped if k < good.step}
        records = self._quarantine(trainer, step, good.step, reason, quarantined)
        if self.lr_backoff_factor is not None:
            self._backoff_until = step + self.lr_backoff_steps
        seconds = time.perf_counter() - start
        self._restore_s += seconds
        self._rollbacks.append(
            {"step": step, "restored_step": good.step, "reason": reason, "lost_steps": step - good.step,
             "quarantined": len(records), "seconds": seconds}
        )
        self.emit(
            trainer, "rollback", "warning",
            {"restored_step": float(good.step), "lost_steps": float(step - good.step),
             "quarantined_batches": float(len(records)), "rollbacks": float(len(self._rollbacks)),
             "seconds": seconds},
            "rollback",
        )
        if over_budget:
            self._halt(trainer, step, len(recent) + 1, good.step)

    @torch.no_grad()
    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, slot: _Slot) -> None:
        snapshot = slot.snapshot
        for p in pl_module.parameters():
            p.grad = None  # gradients of the discarded step must not leak into the next one
        snapshot.restore(pl_module, self._optimizers(trainer))
        for config, state in zip(trainer.lr_scheduler_configs, snapshot.extra["schedulers"]):
            config.scheduler.load_state_dict(copy.deepcopy(state))  # the slot may be restored again
        callbacks = snapshot.extra["callbacks"]
        for cb in _rewindable(trainer):
            if cb.state_key in callbacks:
                cb.restore_snapshot_state(callbacks[cb.state_key])
        scaler = grad_scaler(trainer)
        if scaler is not None and snapshot.extra["scaler"] is not None:
            scaler.load_state_dict(snapshot.extra["scaler"])

    def _quarantine(
        self, trainer: pl.Trainer, step: int, restored: int, reason: str, batches: list[_Batch]
    ) -> list[dict[str, Any]]:
        local = [
            {"rank": trainer.global_rank, "step": b.step, "epoch": b.epoch, "batch_idx": b.batch_idx,
             "sample_ids": _to_list(b.sample_ids)}
            for b in batches
        ]
        records = _gather_objects(trainer, local)
        self._quarantined += len(records)
        for r in records:
            self.emit(trainer, "quarantine", "info",
                       {"epoch": float(r["epoch"]), "batch_idx": float(r["batch_idx"]),
                        "batch_step": float(r["step"]), "rank": float(r["rank"]),
                        "samples": float(len(r["sample_ids"] or []))}, None)
        if trainer.is_global_zero:
            path = os.path.join(self._run_dir, QUARANTINE_FILE)
            data: dict[str, Any] = {"version": 1, "rollbacks": []}
            if os.path.exists(path):
                with open(path) as f:
                    data = json.load(f)
            data["rollbacks"].append({"step": step, "restored_step": restored, "reason": reason, "batches": records})
            ids = {i for rb in data["rollbacks"] for r in rb["batches"] for i in (r["sample_ids"] or [])}
            data["sample_ids"] = sorted(ids, key=lambda i: (isinstance(i, str), i if isinstance(i, (int, float)) else str(i)))
            try:
                os.makedirs(self._run_dir, exist_ok=True)
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(data, f, indent=1, default=str)
                os.replace(tmp, path)  # a crash mid-write leaves the previous file whole
            except OSError as err:  # the rollback itself is done; losing the file must not stop training
                rank_zero_warn(f"{type(self).__name__}: could not write {path}: {err}")
        return records

    def _halt(self, trainer: pl.Trainer, step: int, count: int, restored: int | None) -> None:
        path = os.path.join(self._run_dir, "checkpoints", f"rollback-halt-step={step}.ckpt")
        history = "; ".join(
            [f"step {r['step']} -> {r['restored_step']} ({r['reason']})" for r in self._rollbacks]
            + [f"step {k}: nothing to restore" for k in self._unavailable]
        )
        saved = (
            f"The newest good snapshot (step {restored}) was restored and saved to {path}"
            if restored is not None
            else f"No snapshot was good to restore; the current state was saved to {path}"
        )
        report = (
            f"{type(self).__name__} halted training at optimizer step {step}: {count} rollback requests within "
            f"{self.budget_window} steps exceed max_rollbacks={self.max_rollbacks} ({history}). {saved}; the "
            f"quarantined batches are listed in {os.path.join(self._run_dir, QUARANTINE_FILE)}."
        )
        self.halt(trainer, report, path, "rollback_halt", {"rollbacks": float(count)})

    # -- helpers ---------------------------------------------------------------------------------
    def _lr_factors(self, optimizer: torch.optim.Optimizer) -> list[float] | None:
        """The back-off after a rollback, for this step (``None``: no change)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None or self.lr_backoff_factor is None or trainer.global_step >= self._backoff_until:
            return None
        return [self.lr_backoff_factor] * len(optimizer.param_groups)

    def _sample_ids(self, batch: Any) -> Any:
        """The batch's sample ids, or ``None`` (the batch is then known by its position).

        Only the ids are kept, never the batch: a bound method (``tuple.index``, ``list.index``) or
        any other attribute that is not id-like is not taken for ids.
        """
        if self.sample_ids is None:
            return None
        if callable(self.sample_ids):
            ids = self.sample_ids(batch)
        elif isinstance(batch, Mapping):
            ids = batch.get(self.sample_ids)
        elif isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
            ids = None  # a plain tuple or list has no named fields; its attributes are its methods
        else:
            ids = getattr(batch, self.sample_ids, None)  # dataclasses, named tuples, custom batches
        return _detached_ids(ids)

    def _log_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, detection: bool) -> None:
        metrics = {
            "stability/rollback/tor": self.tor,
            "stability/rollback/count": float(len(self._rollbacks)),
            "stability/rollback/lost_steps": float(self.lost_steps),
            "stability/rollback/snapshot_mb": self.snapshot_bytes / 2**20,
        }
        metrics.update(self.event_count_metrics())
        log_step_metrics(trainer, pl_module, metrics, detection)


def _troubling(event: StabilityEvent) -> bool:
    """Does the event say the training state may be going bad (so a snapshot on probation is not
    trusted)? A critical event, or a warning that something acted on: a detection the guard answered,
    an intervention. Advice alone (a monitor's warning with no action, or ``advise``) observes a slow
    trend, not a corrupted state: it does not discard snapshots."""
    if event.severity == "critical":
        return True
    return event.severity == "warning" and event.action not in (None, "advise", "warn")


def read_quarantine(path: str | os.PathLike[str]) -> set[Any]:
    """The sample ids quarantined in ``quarantine.json`` (a file, or the run directory holding it).

    Feed them back to leave those samples out of a later run::

        skip = read_quarantine("runs/demo/version_0")
        keep = [i for i in range(len(dataset)) if i not in skip]
        loader = DataLoader(torch.utils.data.Subset(dataset, keep), ...)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, QUARANTINE_FILE)
    with open(path) as f:
        data = json.load(f)
    return {i for rollback in data.get("rollbacks", []) for r in rollback["batches"] for i in (r["sample_ids"] or [])}


def _rewindable(trainer: pl.Trainer) -> list[StabilityCallback]:
    """The stability callbacks whose state goes back with a rollback (every one but the rollbacks)."""
    callbacks = getattr(trainer, "callbacks", [])
    return [cb for cb in callbacks if isinstance(cb, StabilityCallback) and not isinstance(cb, InMemoryRollback)]


def _gather_objects(trainer: pl.Trainer, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Records of different lengths from each rank, once per rollback: all_gather_object fits, tensors do not.
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return items
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [r for rank_items in gathered for r in rank_items]


def _ring_shape(cls: str, every_n_steps: int, keep: int | None, commit_after: int | None) -> tuple[int, int]:
    """``keep`` and ``commit_after``, each following what the user passed when left out.

    A snapshot must be committed before its slot is reused: ``commit_after < every_n_steps * (keep - 1)``.
    Left out, ``commit_after`` is 20 steps, shortened to fit the ring; ``keep`` is 2, or as many slots
    as the ``commit_after`` the user asked for needs.
    """
    if keep is not None:
        keep = check_int(cls, "keep", keep, 2)
    if commit_after is not None:
        commit_after = check_int(cls, "commit_after", commit_after, 1)
    if keep is None:
        if commit_after is not None:
            keep = max(2, commit_after // every_n_steps + 2)
        else:
            keep = 3 if every_n_steps == 1 else 2  # a snapshot every step: one more slot to commit one
    limit = every_n_steps * (keep - 1)
    if commit_after is None:
        if limit < 2:
            raise ValueError(
                f"{cls}(every_n_steps={every_n_steps}, keep={keep}): expected every_n_steps * (keep - 1) >= 2, "
                "or no snapshot could be committed before its slot is reused; raise keep"
            )
        commit_after = min(20, limit - 1)
    if commit_after >= limit:
        raise ValueError(
            f"{cls}(every_n_steps={every_n_steps}, keep={keep}, commit_after={commit_after}): expected "
            f"commit_after < every_n_steps * (keep - 1) = {limit}, or no snapshot could be committed before its "
            "slot is reused; raise keep or every_n_steps, or lower commit_after"
        )
    return keep, commit_after


def _detached_ids(ids: Any) -> Any:
    """Sample ids that keep nothing else alive: a tensor, a list of scalars, or ``None`` when ``ids``
    does not look like ids (a method, a string of text, a nested structure)."""
    if ids is None or callable(ids):
        return None
    if isinstance(ids, Tensor):
        ids = ids.detach()
        if ids.untyped_storage().nbytes() > ids.numel() * ids.element_size():
            ids = ids.clone()  # a view of a larger tensor would keep all of it
        return ids
    if isinstance(ids, (bool, int, str)) or (hasattr(ids, "tolist") and not isinstance(ids, (list, tuple))):
        return _to_list(ids)
    if isinstance(ids, Sequence) and all(isinstance(i, (int, str)) or isinstance(i, Tensor) and i.numel() == 1 for i in ids):
        return list(ids)
    return None


def _to_list(ids: Any) -> list[Any] | None:
    if ids is None:
        return None
    if isinstance(ids, Tensor):
        return ids.detach().flatten().cpu().tolist()
    if hasattr(ids, "tolist"):  # numpy arrays and scalars
        out = ids.tolist()
        return out if isinstance(out, list) else [out]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        return [ids]
    return [i.item() if hasattr(i, "item") else i for i in ids]


def _mib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


__all__ = ["InMemoryRollback", "read_quarantine", "QUARANTINE_FILE"]
