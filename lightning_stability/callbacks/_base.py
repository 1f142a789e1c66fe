"""What every stability callback shares: the trainer's event log, its stream and its checkpointing."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability.core.lightning import (  # noqa: F401  (the adapters' shared helpers, re-exported)
    any_rank,
    grad_scaler,
    halt_checkpoint_path,
    is_logging_step,
    log_metrics,
    loss_scale,
    rank_gather,
    sharded_strategy,
    step_loss,
    synchronised_sources,
)
from lightning_stability.core.lr_backoff import Provider, lr_owner
from lightning_stability.events import EventLog, StabilityEvent, get_event_log
from lightning_stability.ops.optim_state import unwrap_optimizer

EVENTS_CHECKPOINT_KEY = "lightning_stability_events"


class TrainingHalted(RuntimeError):
    """Raised by a stability callback with ``on_halt="raise"`` when it stops training (after saving a checkpoint)."""


class StabilityCallback(Callback):
    """Base class: streams the event log on rank zero and saves it with every checkpoint.

    The stream goes to ``<trainer.log_dir>/stability_events.jsonl`` when the trainer has a logger.

    Several stability callbacks may be attached; each saves and restores the same shared log, so the
    result does not depend on which of them is present.
    """

    # its events are decided from statistics every rank shares: every rank emits them alike
    synchronised_events = True
    # its state goes back with a rollback's snapshot (False: what it holds is about the data, not the
    # training state, and a rollback must not make it forget)
    rewinds = True

    def __init__(self, name: str | None = None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{type(self).__name__}(name={name!r}): expected a non-empty str or None")
        self.name = name
        self.on_halt = "stop"
        self.halt_report: str | None = None
        self._halted = False
        self._counts: dict[str, int] = {}  # events this callback emitted, by kind
        self._lr_optimizers: list[torch.optim.Optimizer] = []  # where this callback provides LR factors
        self._unsubscribe: Callable[[], None] | None = None  # its subscription to the event log (listen)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name) if self.name else type(self).__qualname__

    @property
    def halted(self) -> bool:
        """Whether this callback halted the last fit (``on_halt="stop"`` ends ``fit`` normally: ask here)."""
        return self._halted

    @property
    def source(self) -> str:
        return f"{type(self).__name__}[{self.name}]" if self.name else type(self).__name__

    def event_log(self, trainer: pl.Trainer) -> EventLog:
        return get_event_log(trainer)

    def emit(
        self,
        trainer: pl.Trainer,
        kind: str,
        severity: str,
        metrics: dict[str, float],
        action: str | None,
        target: str | None = None,
        details: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> None:
        """Emit an event from this callback at the current step (or ``step``, one that has just ended), and
        count it by kind."""
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self.event_log(trainer).emit(trainer.global_step if step is None else step, kind, self.source, severity,
                                     metrics, action, target, details)

    def event_count_metrics(self) -> dict[str, float]:
        """``stability/events/<kind>``: the cumulative count of this callback's events of each kind."""
        return {f"stability/events/{kind}": float(n) for kind, n in self._counts.items()}

    # -- learning rate ----------------------------------------------------------------------------
    def register_lr_provider(self, trainer: pl.Trainer, make_provider: Callable[[int], Provider]) -> None:
        """Give every optimizer's LR owner (:mod:`lightning_stability.core.lr_backoff`) this callback's
        per-step factors: ``make_provider(index)`` answers them for optimizer ``index``. Several
        callbacks' factors for the same step compose by the smallest. Removed when training ends."""
        self.remove_lr_provider()
        for index, optimizer in enumerate(trainer.optimizers):
            opt = unwrap_optimizer(optimizer)
            lr_owner(opt).register(self._lr_key, make_provider(index))
            self._lr_optimizers.append(opt)

    def remove_lr_provider(self) -> None:
        # An exception inside optimizer.step(closure) skips the post-hook: the owner puts the LR back.
        for opt in self._lr_optimizers:
            owner = lr_owner(opt)
            owner.restore()
            owner.unregister(self._lr_key)
        self._lr_optimizers = []

    @property
    def _lr_key(self) -> str:
        return f"{self.source}@{id(self):x}"

    # -- the step's loss ---------------------------------------------------------------------------
    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # every stability callback feeds the trainer's one StepLoss; it keeps each loss once
        step_loss(trainer).add(loss, trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_lr_provider()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.remove_lr_provider()

    # -- halting ---------------------------------------------------------------------------------
    def halt(self, trainer: pl.Trainer, report: str, path: str, kind: str, metrics: dict[str, float]) -> None:
        """Stop the fit: record the halt, save a checkpoint to ``path``, then stop or raise (``on_halt``).

        The halt is recorded before the save, so that the checkpoint knows about it.
        """
        self.halt_report = report
        self._halted = True
        self.emit(trainer, kind, "critical", metrics, "halt")
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        if self.on_halt == "raise":
            raise TrainingHalted(report)
        rank_zero_warn(report)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.loggers:
            return  # without a logger there is no run directory to write into; the log stays in memory
        log_dir = trainer.log_dir  # a collective under DDP (a broadcast): every rank must ask
        if trainer.is_global_zero and log_dir:
            self.event_log(trainer).stream_to(log_dir)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stop_listening()
        self.event_log(trainer).close_stream()

    def listen(self, trainer: pl.Trainer, listener: Callable[[StabilityEvent], None]) -> None:
        """Hand every event of the trainer's log to ``listener`` from now on, until teardown: one
        subscription per callback (a new fit's replaces the last)."""
        self.stop_listening()
        self._unsubscribe = self.event_log(trainer).subscribe(listener)

    def stop_listening(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[EVENTS_CHECKPOINT_KEY] = self.event_log(trainer).state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if EVENTS_CHECKPOINT_KEY in checkpoint:
            self.event_log(trainer).load_state_dict(checkpoint[EVENTS_CHECKPOINT_KEY])

    # -- the ranks' per-step agreement ------------------------------------------------------------
    # A callback that must know, before the optimizer step, whether something seen on one rank only
    # happened on any rank returns its flags from ``agreement_flags``. When a carrier is attached (a
    # callback with ``carries_agreement`` that has a collective of its own in every step), the flags
    # travel in that collective, so the step has one collective instead of two; otherwise the callback
    # agrees with :func:`any_rank` itself.
    carries_agreement = False

    def agreement_flags(self, trainer: pl.Trainer) -> list[Any] | None:
        """Flags (bools, or 0-d tensors of 0/1) the ranks must agree on now, or ``None`` for none.

        Called at the same point of the step on every rank; a call that returns flags expects
        :meth:`on_agreement` with the result.
        """
        return None

    def on_agreement(self, trainer: pl.Trainer, flags: list[bool]) -> None:
        """Each flag of :meth:`agreement_flags`, true where it was true on any rank."""

    # -- snapshots (InMemoryRollback) ------------------------------------------------------------
    def snapshot_state(self) -> dict[str, Any]:
        """What :class:`InMemoryRollback` keeps of this callback in a snapshot (a deep copy of its state)."""
        return copy.deepcopy(self.state_dict())

    def restore_snapshot_state(self, state: dict[str, Any]) -> None:
        """Go back to a snapshot's state; override to keep records (counts, reports) that must not rewind."""
        self.load_state_dict(copy.deepcopy(state))


# The exit code the examples (and the CLI's scripts) use for a fit that a stability callback halted.
HALTED_EXIT_CODE = 3


def halt_report(trainer: pl.Trainer) -> str | None:
    """The report of the stability callback that halted the trainer's last fit, or ``None``.

    With ``on_halt="stop"`` a halt ends ``Trainer.fit`` like a finished run (Lightning has no status
    for it); scripts ask here and exit with an error code::

        trainer.fit(model, loader)
        if (report := halt_report(trainer)) is not None:
            print(report)
            sys.exit(HALTED_EXIT_CODE)
    """
    for cb in getattr(trainer, "callbacks", []):
        if isinstance(cb, StabilityCallback) and cb.halted:
            return cb.halt_report or f"{cb.source} halted training"
    return None


def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}({name}={value!r}): expected an int >= {minimum}")
    if value < minimum:
        raise ValueError(f"{owner}({name}={value!r}): expected an int >= {minimum}")
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}({name}={value!r}): expected a bool")
    return value


def check_on_halt(owner: str, value: Any) -> str:
    if value not in ("stop", "raise"):
        raise ValueError(f"{owner}(on_halt={value!r}): expected 'stop' or 'raise'")
    return str(value)


def agreement_carrier(trainer: pl.Trainer) -> StabilityCallback | None:
    """The callback whose per-step collective carries the others' agreement flags under DDP or FSDP,
    and whose one host read carries them in a single process (the flags are device tensors: read
    alone, each would be a host read of its own).

    The first attached callback that carries one, or ``None``.
    """
    return next((cb for cb in trainer.callbacks if isinstance(cb, StabilityCallback) and cb.carries_agreement), None)  # type: ignore[attr-defined]


def agreement_riders(trainer: pl.Trainer, carrier: StabilityCallback) -> list[StabilityCallback]:
    """The callbacks whose agreement flags ``carrier`` takes: every other one that has such flags."""
    if agreement_carrier(trainer) is not carrier:
        return []
    return [
        cb for cb in trainer.callbacks  # type: ignore[attr-defined]
        if isinstance(cb, StabilityCallback) and cb is not carrier
        and type(cb).agreement_flags is not StabilityCallback.agreement_flags
    ]


def rider_flags(trainer: pl.Trainer, riders: Sequence[StabilityCallback], device: torch.device
                ) -> tuple[list[tuple[StabilityCallback, int]], list[Tensor]]:
    """The riders with flags to agree on now (each with how many), and the flags as 0-d 0/1 floats on
    ``device``, for the carrier's collective."""
    asking: list[tuple[StabilityCallback, int]] = []
    flags: list[Tensor] = []
    for rider in riders:
        mine = rider.agreement_flags(trainer)
        if mine is not None:
            asking.append((rider, len(mine)))
            flags += [torch.as_tensor(f, dtype=torch.float32, device=device).reshape(()) for f in mine]
    return asking, flags


def deliver_flags(trainer: pl.Trainer, riders: list[tuple[StabilityCallback, int]], agreed: Sequence[float]) -> None:
    """Hand each rider of :func:`rider_flags` its flags back, agreed between the ranks."""
    start = 0
    for rider, n in riders:
        rider.on_agreement(trainer, [v > 0 for v in agreed[start:start + n]])
        start += n


def check_fraction(owner: str, name: str, value: Any, closed: bool = False, optional: bool = False) -> float:
    """A float in (0, 1), or (0, 1] with ``closed``; ``optional``: the message says ``None`` is allowed too."""
    allowed = ("(0, 1]" if closed else "(0, 1)") + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}({name}={value!r}): expected a float in {allowed}")
    if not (0.0 < value < 1.0 or (closed and value == 1.0)):
        raise ValueError(f"{owner}({name}={value!r}): expected a float in {allowed}")
    return float(value)


def check_positive(owner: str, name: str, value: Any, above: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}({name}={value!r}): expected a finite float > {above}")
    if not math.isfinite(value) or value <= above:
        raise ValueError(f"{owner}({name}={value!r}): expected a finite float > {above}")
    return float(value)
