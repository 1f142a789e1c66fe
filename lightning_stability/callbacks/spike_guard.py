"""GradientSpikeGuard: detect non-finite values and gradient/loss spikes, and act on what was detected."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_stability.callbacks._base import (
    StabilityCallback,
    agreement_riders,
    any_rank,
    check_fraction,
    check_int,
    check_on_halt,
    check_positive,
    deliver_flags,
    grad_scaler,
    halt_checkpoint_path,
    is_logging_step,
    log_metrics,
    loss_scale,
    rank_gather,
    rider_flags,
    sharded_strategy,
    step_loss,
)
from lightning_stability.callbacks._rollback_quarantine import SampleIds, check_sample_ids
from lightning_stability.callbacks._spike_act import apply_action
from lightning_stability.callbacks._spike_forensics import Forensics
from lightning_stability.callbacks._spike_measure import (  # noqa: F401  (SCALER_*: pinned by a test)
    SCALER_FOUND_INF,
    SCALER_STATES,
    StepMeasure,
    scaler_found_inf,
    warn_norm_only,
)
from lightning_stability.callbacks._spike_policy import (
    SEVERITY,
    OptimizerTrack,
    describe_halt,
    detect,
    detection_size,
    loss_in_band,
)
from lightning_stability.core.escalation import ACTIONS, cosine_ramp, validate_ladder
from lightning_stability.ops.optim_state import moment_family, unwrap_optimizer
from lightning_stability.ops.sharded import local

DEFAULT_LADDER = ACTIONS


class GradientSpikeGuard(StabilityCallback):
    r"""Detects non-finite values and gradient/loss spikes every optimizer step and intervenes.

    Runs in ``on_before_optimizer_step``: once per optimizer step (not per micro-batch), after AMP
    unscaling and before Lightning's gradient clipping. Five detectors:

    1. **non-finite** loss or gradients (on any rank);
    2. **global gradient-norm spikes**: robust z-score ``(norm - median) / (1.4826 MAD)`` at least
       ``grad_zscore`` *and* ``norm / median`` at least ``grad_ratio``, against a rolling window of
       the last ``window`` accepted steps;
    3. **per-element spikes** (SPAM): ``g^2 > theta * v`` with ``v`` the optimizer's second moment
       (torch Adam/AdamW, bitsandbytes Adam-family in 8 and 32 bits); norm-only for other optimizers;
    4. **loss spikes**: the same robust rule on the loss (averaged over micro-batches and ranks);
    5. **learning-rate spikes**: a rate ``lr_jump`` times the run's largest, before its update applies.

    Flagged and non-finite values never enter the baselines. Detection is armed once ``warmup``
    healthy steps are in the window; before that, only a gradient norm 100 times the median of the
    (at least 4) steps seen so far is a spike.

    Each detection is answered by a rung of ``ladder`` (default: clip, skip, reset_moments,
    lr_backoff, rollback, halt). A detection starts at the first rung that can repair it (``clip``
    is not used for non-finite values or loss spikes), and climbs one rung every ``patience``
    detections until ``cooldown`` healthy steps have passed. The rungs:

    ========================  ================================================================
    action                    effect on the step
    ========================  ================================================================
    ``clip``                  clamp spiking elements to ``sign(g) sqrt(theta v)`` and rescale the
                              global norm to the spike threshold (the largest norm not a spike)
    ``skip``                  every ``.grad`` set to ``None``: weights and moments unchanged,
                              the LR schedule moves on
    ``reset_moments``         skip, zero first and second moments, then ramp updates back in
                              over ``reset_warmup`` steps (cosine from 0.01)
    ``lr_backoff``            skip, then scale the LR by ``lr_backoff_factor`` for
                              ``lr_backoff_steps`` steps (via optimizer step hooks)
    ``rollback``              skip and ask ``InMemoryRollback`` (if attached) to restore a snapshot
    ``halt``                  skip, save a checkpoint and stop the fit with a report
    ========================  ================================================================

    Non-finite gradients are never applied, whatever the ladder says. Under fp16 AMP, gradients that
    overflow while the loss is finite are left to the loss scaler (an ``info`` event ``amp_overflow``).

    Logged metrics (every step, written at the logger's cadence):

    ================================  ==============================================================
    key                               meaning
    ================================  ==============================================================
    ``stability/grad/norm``           global L2 norm of the gradients (before any clipping)
    ``stability/grad/norm_zscore``    robust z-score of the norm against the baseline
    ``stability/grad/norm_baseline``  the baseline median of the norm
    ``stability/grad/norm_threshold`` the norm above which a step is a gradient spike (both rules)
    ``stability/grad/spike_fraction`` share of elements with ``g^2 > theta v``
    ``stability/loss/zscore``         robust z-score of the loss against the baseline
    ``stability/events/<kind>``       cumulative count of this guard's events of each kind
    ================================  ==============================================================

    With several optimizers, each has its own baselines and ladder; optimizer ``i > 0`` logs under
    ``.../opt{i}`` suffixes.

    Example::

        from lightning_stability import GradientSpikeGuard
        trainer = pl.Trainer(callbacks=[GradientSpikeGuard()])

    Under DDP and FSDP the guard's one collective a step (an all-gather of four numbers, or an
    all-reduce over shards) also carries the flags other callbacks need agreed before the optimizer
    step (``InMemoryRollback``'s three), so that they need no collective of their own.

    Manual optimization works the same: the check runs inside each ``optimizer.step()`` call, the loss
    the sum of those passed to ``manual_backward`` since any optimizer's previous step (step each
    optimizer right after its own backward).

    Args:
        window: number of accepted steps in the rolling baselines (>= 2); left out, 128 (or
            ``warmup`` when that is larger).
        warmup: healthy steps needed before spike detection is armed (1..window); left out, 32 (or
            ``window`` when that is smaller).
        grad_zscore, grad_ratio: both must be reached for a gradient-norm spike.
        loss_zscore, loss_ratio: both must be reached for a loss spike (the ratio is ignored
            when the loss baseline is not positive).
        theta: SPAM's element spike threshold; ``None`` turns per-element detection off.
        ladder: ordered actions from ``ACTIONS``; each may appear once.
        patience: failures of a rung before climbing to the next (>= 1): a rung failed when the fault
            came back within ``recovery`` steps at the same or a larger size (a spike that ``clip``
            absorbed, the loss staying in its band, is not a failure), or the loss stayed out of its band.
        cooldown: healthy steps that end an incident and reset the ladder (>= 1).
        recovery: steps within which a detection counts against the rung applied before it (>= 1);
            ``rollback`` and ``halt`` are for a lost run: a loss that has not come back to its band
            since the incident began, or a non-finite step that came back after the rungs below.
        reset_warmup: steps of update warm-up after a moment reset (>= 1).
        lr_backoff_factor: LR multiplier during a back-off, in (0, 1).
        lr_backoff_steps: length of a back-off in optimizer steps (>= 1).
        on_halt: ``"stop"`` (set ``trainer.should_stop``) or ``"raise"`` (raise :class:`TrainingHalted`).
        sample_ids: the batch's sample ids (as ``InMemoryRollback``'s), named in a detection's ``details``
            (and, where ``training_step`` returns ``"sample_losses"``, in the ``sample_losses`` event after it).
        lr_jump: a learning rate this many times the largest the run used is an ``lr_spike`` (> 1; ``None``: off).
        name: distinguishes several guards in one trainer (their checkpoint ``state_key``).
    """

    carries_agreement = True

    def __init__(
        self,
        window: int | None = None,
        warmup: int | None = None,
        grad_zscore: float = 6.0,
        grad_ratio: float = 2.5,
        loss_zscore: float = 6.0,
        loss_ratio: float = 1.25,
        theta: float | None = 5000.0,
        ladder: Sequence[str] = DEFAULT_LADDER,
        patience: int = 3,
        cooldown: int = 50,
        recovery: int = 10,
        reset_warmup: int = 20,
        lr_backoff_factor: float = 0.5,
        lr_backoff_steps: int = 100,
        on_halt: Literal["stop", "raise"] = "stop",
        sample_ids: SampleIds = "index",
        lr_jump: float | None = 10.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        cls = type(self).__name__
        # Each default follows the other argument where only one is given: window=16 arms after 16
        # steps, warmup=200 gets a window of 200.
        if warmup is not None:
            warmup = check_int(cls, "warmup", warmup, 1)
        self.window = check_int(cls, "window", window, 2) if window is not None else max(128, warmup or 0)
        self.warmup = warmup if warmup is not None else min(32, self.window)
        if window is not None and self.warmup > self.window:
            raise ValueError(f"{cls}(warmup={warmup!r}, window={window!r}): expected warmup at most window")
        self.grad_zscore = check_positive(cls, "grad_zscore", grad_zscore)
        self.grad_ratio = check_positive(cls, "grad_ratio", grad_ratio, above=1.0)
        self.loss_zscore = check_positive(cls, "loss_zscore", loss_zscore)
        self.loss_ratio = check_positive(cls, "loss_ratio", loss_ratio, above=1.0)
        self.theta = None if theta is None else check_positive(cls, "theta", theta)
        self.ladder = validate_ladder(ladder, f"{cls}(ladder)")
        self.patience = check_int(cls, "patience", patience, 1)
        self.cooldown = check_int(cls, "cooldown", cooldown, 1)
        self.recovery = check_int(cls, "recovery", recovery, 1)
        self.reset_warmup = check_int(cls, "reset_warmup", reset_warmup, 1)
        self.lr_backoff_factor = check_fraction(cls, "lr_backoff_factor", lr_backoff_factor)
        self.lr_backoff_steps = check_int(cls, "lr_backoff_steps", lr_backoff_steps, 1)
        self.on_halt = check_on_halt(cls, on_halt)
        self.sample_ids = check_sample_ids(cls, sample_ids)
        self.lr_jump = None if lr_jump is None else check_positive(cls, "lr_jump", lr_jump, above=1.0)
        self._forensics = Forensics(self.sample_ids)  # which layers and which batch a detection concerns

        self._tracks: dict[int, OptimizerTrack] = {}
        self._halt_report: str | None = None  # a halt decided in this step, carried out at its end
        self._warned_norm_only: set[str] = set()
        self._trainer_ref: Any = None
        self._riders: list[StabilityCallback] = []  # callbacks whose agreement flags ride on our collective
        self._sharded = False  # parameters are shards (FSDP, ModelParallel): statistics are sums over ranks
        self._measure = StepMeasure(self.theta, sharded=False, gather=None)

    # -- state -----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "tracks": {i: t.state_dict() for i, t in self._tracks.items()},
            "halt_report": self.halt_report,
            "counts": dict(self._counts),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tracks = {}
        for i, track_state in dict(state_dict.get("tracks", {})).items():
            track = OptimizerTrack(self)
            track.load_state_dict(track_state)
            self._tracks[int(i)] = track
        self.halt_report = state_dict.get("halt_report")
        self._counts = {str(k): int(v) for k, v in dict(state_dict.get("counts", {})).items()}

    @override
    def restore_snapshot_state(self, state: dict[str, Any]) -> None:
        # Baselines, ladders and back-offs go back with the model; the record of events does not.
        counts, report = self._counts, self.halt_report
        super().restore_snapshot_state(state)
        self._counts, self.halt_report = counts, report

    def _track(self, index: int) -> OptimizerTrack:
        if index not in self._tracks:
            self._tracks[index] = OptimizerTrack(self)
        return self._tracks[index]

    # -- hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._sharded = sharded_strategy(trainer) is not None
        hybrid = str(getattr(trainer.strategy, "sharding_strategy", ""))
        if self._sharded and "HYBRID" in hybrid:
            raise NotImplementedError(
                f"{type(self).__name__} cannot measure gradients under {type(trainer.strategy).__name__}"
                f"(sharding_strategy={hybrid.split('.')[-1]!r}): its flat shards are replicated across nodes, so a sum "
                "over ranks counts them several times. Use FULL_SHARD or SHARD_GRAD_OP, or ModelParallelStrategy."
            )
        if stage == "fit":
            # A new fit starts from a clean slate (a checkpoint, if any, is restored after setup):
            # baselines, back-offs and warm-ups of an earlier fit belong to another run.
            self._tracks = {}
            self._counts = {}
            self.halt_report = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer_ref = weakref.ref(trainer)
        self._halt_report = None
        self._halted = False
        self._riders = agreement_riders(trainer, self)
        self._measure = StepMeasure(self.theta, self._sharded, rank_gather(trainer))
        self.register_lr_provider(trainer, self._make_lr_provider)
        if self.theta is not None:
            warn_norm_only(type(self).__name__, trainer.optimizers, self._warned_norm_only)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        opt = unwrap_optimizer(optimizer)
        index = _optimizer_index(trainer, opt)
        track = self._track(index)
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        # sharded: the local shards (the rows this rank holds); everything elementwise acts on them
        grads = [local(p.grad) for p in params] if self._sharded else [p.grad for p in params]  # type: ignore[misc]
        loss = step_loss(trainer).value(trainer.global_step)  # scaled under fp16 AMP: unscaled after the reduction
        if not grads or self._halted:
            # nothing measured this step, but the riders still expect their flags agreed
            riders, flags = rider_flags(trainer, self._riders, trainer.strategy.root_device)
            if riders:
                deliver_flags(trainer, riders, [float(f) for f in any_rank(trainer, [bool(f) for f in flags])])
        if not grads:
            return
        if self._halted:
            # Lightning keeps going until min_steps/min_epochs are met; nothing more is applied.
            for p in params:
                p.grad = None
            trainer.should_stop = True
            return

        step = trainer.global_step
        # SPAM: after a moment reset the second moment is not meaningful yet; elements are not tested against it
        elements = self.theta is not None and track.armed and not track.in_reset_warmup(step, self.reset_warmup)
        riders, flags = rider_flags(trainer, self._riders, grads[0].device)  # in its one read, also on one process
        measured = self._measure.measure(opt, params, grads, loss, elements and moment_family(opt) is not None, flags)
        deliver_flags(trainer, riders, measured.flags)
        grad_norm, spike_count, checked = measured.grad_norm, measured.spike_count, measured.checked
        loss_value = None if measured.loss is None else measured.loss / loss_scale(trainer)
        ranks_disagree = measured.ranks_disagree

        gb = track.grad_window.baseline()
        lb = track.loss_window.baseline()
        stats = {
            "grad_norm": grad_norm,
            "grad_baseline": gb.median,
            "grad_threshold": gb.threshold(self.grad_zscore, self.grad_ratio),
            "grad_zscore": gb.zscore(grad_norm),
            "grad_ratio": gb.ratio(grad_norm),
            "spike_count": spike_count,
            "spike_fraction": spike_count / checked if checked else 0.0,
        }
        if loss_value is not None:
            stats.update(loss=loss_value, loss_baseline=lb.median, loss_zscore=lb.zscore(loss_value),
                         loss_ratio=lb.ratio(loss_value))

        detection = detect(self, track, stats, loss_value, [float(g["lr"]) for g in opt.param_groups])
        in_band = loss_in_band(self, track, stats, loss_value)
        track.ladder.observe(step, in_band)
        log = self.event_log(trainer)
        if detection == "nonfinite" and _finite(loss_value) and _scaler_skips(trainer, opt):
            # fp16 AMP: overflowing gradients with a finite loss are the loss scaler's business. It
            # skips this step and lowers its scale; not a detection, and no strike on the ladder.
            self.emit(trainer, "amp_overflow", "info", stats, "skip")
        elif detection is None:
            track.grad_window.push(grad_norm)
            if loss_value is not None:
                track.loss_window.push(loss_value)
            if not track.armed and len(track.grad_window) >= self.warmup:
                track.armed = True
                self.emit(trainer, "armed", "info", {"window": float(len(track.grad_window))}, None)
            track.level_shift(False)
            self._forensics.healthy_step(index, params, measured)
            if track.ladder.healthy():  # called on every healthy optimizer step: the cooldown counts steps
                self.emit(trainer, "recovered", "info", {"healthy_steps": float(self.cooldown)}, None)
        else:
            unavailable = set() if log.has_responder("rollback") else {"rollback"}
            persistent = track.ladder.persistent
            action = track.ladder.decide(detection, unavailable, step, detection_size(detection, stats), in_band)
            if action == "clip" and (detection == "nonfinite" or ranks_disagree):
                action = "skip"  # a NaN cannot be clipped; ranks with different gradients cannot clip alike
            absorbed = action == "clip" and in_band and detection in ("grad_spike", "element_spike")
            if track.level_shift(absorbed) and math.isfinite(grad_norm):
                # the norm's level has moved (at a high LR, say): its new level enters the baseline
                track.grad_window.push(grad_norm)
                if loss_value is not None:
                    track.loss_window.push(loss_value)
            if track.ladder.persistent and not persistent:
                self._warn_persistent(trainer, index, detection, stats)
            halt = apply_action(action, detection, opt, track, step, params, grads, self._measure, stats,
                                stats["grad_threshold"], self.theta, self.lr_backoff_steps)
            if halt and self._halt_report is None:
                self._halt_report = describe_halt(type(self).__name__, step, index, detection, stats, track)
            track.actions[action] = track.actions.get(action, 0) + 1
            severity = "critical" if action in ("rollback", "halt") else SEVERITY[detection]
            details = self._forensics.details(index, pl_module, params, measured, self._measure, trainer.world_size)
            self.emit(trainer, detection, severity, stats, action, details=details)

        self._log_metrics(trainer, pl_module, index, stats, detection is not None)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._forensics.see_batch(trainer.global_step, trainer.current_epoch, batch_idx, batch)  # read on a detection only

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # a detection's per-sample losses, known only now that its step is over
        if (follow := self._forensics.batch_end(trainer.global_step, outputs, trainer.world_size)) is not None:
            self.emit(trainer, "sample_losses", "info", follow["metrics"], None, None, follow["details"], follow["step"])
        if self._halt_report is None:
            return
        report, self._halt_report = self._halt_report, None
        path = halt_checkpoint_path(trainer, "stability")
        report += f" A checkpoint of the state after the skipped step is at {path}."
        self.halt(trainer, report, path, "halt", {})

    # -- actions ---------------------------------------------------------------------------------
    def _warn_persistent(self, trainer: pl.Trainer, index: int, detection: str, stats: dict[str, float]) -> None:
        """Once per incident: the run is noisy, not lost; it goes on at the strongest rung below a rollback."""
        self.emit(trainer, "persistent_instability", "warning", stats, None)
        rank_zero_warn(
            f"{type(self).__name__}: {detection} keeps coming back at step {trainer.global_step} (optimizer {index}) "
            "but the run is not lost (its loss is finite and has not stayed out of its band through the rungs below), "
            "so training goes on at the strongest rung short of a rollback or a halt. "
            "If it persists: lower the learning rate, enable QK-clip or z-loss (SoftmaxSaturationMonitor), "
            "or raise grad_zscore / theta if these spikes are this model's normal noise."
        )

    def _make_lr_provider(self, index: int) -> Any:
        def factors(optimizer: torch.optim.Optimizer) -> list[float] | None:
            """This step's LR factors: the back-off, times the update warm-up after a moment reset."""
            trainer = self._trainer_ref() if self._trainer_ref is not None else None
            track = self._tracks.get(index)
            if trainer is None or track is None:
                return None
            step = trainer.global_step
            backoff = self.lr_backoff_factor if step < track.backoff_until else 1.0
            warm = cosine_ramp(step - track.warmup_from, self.reset_warmup) if track.warmup_from >= 0 else 1.0
            if backoff == 1.0 and warm == 1.0:
                return None
            return [backoff * (warm if i in track.warmup_groups else 1.0) for i in range(len(optimizer.param_groups))]

        return factors

    def _log_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, stats: dict[str, float],
                     detection: bool) -> None:
        if not (detection or is_logging_step(trainer)):
            return
        suffix = f"/opt{index}" if index > 0 else ""
        metrics = {f"stability/grad/norm{suffix}": stats["grad_norm"],
                   f"stability/grad/spike_fraction{suffix}": stats["spike_fraction"]}
        if math.isfinite(stats["grad_zscore"]):
            metrics[f"stability/grad/norm_zscore{suffix}"] = stats["grad_zscore"]
        if math.isfinite(stats["grad_threshold"]):  # with the norm on one chart: where a spike begins
            metrics[f"stability/grad/norm_baseline{suffix}"] = stats["grad_baseline"]
            metrics[f"stability/grad/norm_threshold{suffix}"] = stats["grad_threshold"]
        if math.isfinite(stats.get("loss_zscore", math.nan)):
            metrics[f"stability/loss/zscore{suffix}"] = stats["loss_zscore"]
        metrics.update(self.event_count_metrics())
        log_metrics(trainer, metrics, detection)


def _optimizer_index(trainer: pl.Trainer, opt: torch.optim.Optimizer) -> int:
    for i, candidate in enumerate(trainer.optimizers):
        if unwrap_optimizer(candidate) is opt:
            return i
    return 0


def _scaler_skips(trainer: pl.Trainer, opt: torch.optim.Optimizer) -> bool:
    """Will the fp16 AMP loss scaler skip this optimizer's step itself (it found an inf)?"""
    scaler = grad_scaler(trainer)
    return scaler is not None and scaler_found_inf(scaler, opt)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
