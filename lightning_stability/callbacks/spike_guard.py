"""GradientSpikeGuard: detect non-finite values and gradient/loss spikes, and act on what was detected."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability.callbacks._base import (
    StabilityCallback,
    agreement_riders,
    any_rank,
    check_fraction,
    check_int,
    check_on_halt,
    check_positive,
    grad_scaler,
    halt_checkpoint_path,
    is_logging_step,
    log_metrics,
    loss_scale,
    sharded_strategy,
    step_loss,
)
from lightning_stability.core.escalation import ACTIONS, EscalationLadder, cosine_ramp, validate_ladder
from lightning_stability.ops.optim_state import (
    moment_family,
    reset_moments_,
    second_moments,
    unwrap_optimizer,
)
from lightning_stability.ops.robust import Baseline, RollingWindow
from lightning_stability.ops.sharded import all_reduce_sum_, local, local_sum_of_squares
from lightning_stability.ops.spikes import (
    chunk_by_numel,
    clip_element_spikes_,
    count_element_spikes,
    global_grad_norm,
    max_spike_excess,
    scale_grads_,
)

DEFAULT_LADDER = ACTIONS
# Element checks run over chunks of at most this many elements: the temporaries stay bounded
# (two float32 copies of a chunk) on large models, and small models need a single chunk.
CHUNK_NUMEL = 1 << 26
# Before arming, a gradient norm this many times the median of the (at least this many) healthy
# steps seen so far is a spike.
PRE_ARM_RATIO = 100.0
PRE_ARM_MIN_SAMPLES = 4
_SEVERITY = {"nonfinite": "critical", "grad_spike": "warning", "loss_spike": "warning", "element_spike": "warning"}


class _OptimizerTrack:
    """Everything the guard remembers about one optimizer."""

    def __init__(self, guard: GradientSpikeGuard) -> None:
        self.grad_window = RollingWindow(guard.window)
        self.loss_window = RollingWindow(guard.window)
        self.ladder = EscalationLadder(guard.ladder, guard.patience, guard.cooldown)
        self.armed = False
        self.backoff_until = -1  # global step (exclusive) until which the LR is backed off
        self.warmup_from = -1  # first global step of the update warm-up after a moment reset
        self.warmup_groups: list[int] = []
        self.actions: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "grad_window": self.grad_window.state_dict(),
            "loss_window": self.loss_window.state_dict(),
            "ladder": self.ladder.state_dict(),
            "armed": self.armed,
            "backoff_until": self.backoff_until,
            "warmup_from": self.warmup_from,
            "warmup_groups": list(self.warmup_groups),
            "actions": dict(self.actions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_window.load_state_dict(state.get("grad_window", {}))
        self.loss_window.load_state_dict(state.get("loss_window", {}))
        self.ladder.load_state_dict(state.get("ladder", {}))
        self.armed = bool(state.get("armed", False))
        self.backoff_until = int(state.get("backoff_until", -1))
        self.warmup_from = int(state.get("warmup_from", -1))
        self.warmup_groups = [int(i) for i in state.get("warmup_groups", [])]
        self.actions = {str(k): int(v) for k, v in dict(state.get("actions", {})).items()}


class GradientSpikeGuard(StabilityCallback):
    r"""Detects non-finite values and gradient/loss spikes every optimizer step and intervenes.

    Runs in ``on_before_optimizer_step``: once per optimizer step (not per micro-batch), after AMP
    unscaling and before Lightning's gradient clipping. Four detectors:

    1. **non-finite** loss or gradients (on any rank);
    2. **global gradient-norm spikes**: robust z-score ``(norm - median) / (1.4826 MAD)`` at least
       ``grad_zscore`` *and* ``norm / median`` at least ``grad_ratio``, against a rolling window of
       the last ``window`` accepted steps;
    3. **per-element spikes** (SPAM): ``g^2 > theta * v`` with ``v`` the optimizer's second moment
       (torch Adam/AdamW, bitsandbytes Adam-family in 8 and 32 bits); norm-only for other optimizers;
    4. **loss spikes**: the same robust rule on the loss (averaged over micro-batches and ranks).

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
                              global norm to the baseline median
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

    With several optimizers, optimizer ``i > 0`` logs under ``.../opt{i}`` suffixes.

    Example::

        from lightning_stability import GradientSpikeGuard
        trainer = pl.Trainer(callbacks=[GradientSpikeGuard()])

    Under DDP and FSDP the guard's one collective a step (an all-gather of four numbers, or an
    all-reduce over shards) also carries the flags other callbacks need agreed before the optimizer
    step (``InMemoryRollback``'s three), so that they need no collective of their own.

    Manual optimization works the same: the check runs inside each ``optimizer.step()`` call, and the
    loss is the sum of the losses passed to ``manual_backward`` since the previous step of any
    optimizer (step each optimizer right after its own backward).
    With several optimizers, each has its own baselines and ladder.

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
        patience: detections per rung before climbing (>= 1).
        cooldown: healthy steps that end an incident and reset the ladder (>= 1).
        reset_warmup: steps of update warm-up after a moment reset (>= 1).
        lr_backoff_factor: LR multiplier during a back-off, in (0, 1).
        lr_backoff_steps: length of a back-off in optimizer steps (>= 1).
        on_halt: ``"stop"`` (set ``trainer.should_stop``) or ``"raise"`` (raise :class:`TrainingHalted`).
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
        reset_warmup: int = 20,
        lr_backoff_factor: float = 0.5,
        lr_backoff_steps: int = 100,
        on_halt: Literal["stop", "raise"] = "stop",
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
        self.reset_warmup = check_int(cls, "reset_warmup", reset_warmup, 1)
        self.lr_backoff_factor = check_fraction(cls, "lr_backoff_factor", lr_backoff_factor)
        self.lr_backoff_steps = check_int(cls, "lr_backoff_steps", lr_backoff_steps, 1)
        self.on_halt = check_on_halt(cls, on_halt)

        self._tracks: dict[int, _OptimizerTrack] = {}
        self._halt_report: str | None = None  # a halt decided in this step, carried out at its end
        self._warned_norm_only: set[str] = set()
        self._trainer_ref: Any = None
        self._riders: list[StabilityCallback] = []  # callbacks whose agreement flags ride on our collective
        self._sharded = False  # parameters are shards (FSDP, ModelParallel): statistics are sums over ranks

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
            track = _OptimizerTrack(self)
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

    def _track(self, index: int) -> _OptimizerTrack:
        if index not in self._tracks:
            self._tracks[index] = _OptimizerTrack(self)
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
        self.register_lr_provider(trainer, self._make_lr_provider)
        for optimizer in trainer.optimizers:
            opt = unwrap_optimizer(optimizer)
            if self.theta is not None and moment_family(opt) is None:
                name = type(opt).__name__
                if name not in self._warned_norm_only:
                    self._warned_norm_only.add(name)
                    rank_zero_warn(
                        f"{type(self).__name__}: {name} keeps no second moment this guard can read; "
                        "per-element (SPAM) spike detection is off for it, norm and loss detection stay on."
                    )

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
            riders, flags = self._rider_flags(trainer, trainer.strategy.root_device)
            if riders:
                self._deliver(trainer, riders, [float(f) for f in any_rank(trainer, [bool(f) for f in flags])])
        if not grads:
            return
        if self._halted:
            # Lightning keeps going until min_steps/min_epochs are met; nothing more is applied.
            for p in params:
                p.grad = None
            trainer.should_stop = True
            return

        grad_norm, spike_count, checked, loss_value, ranks_disagree = self._measure(
            trainer, opt, track, params, grads, loss
        )

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

        detection = self._detect(track, stats, loss_value)
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
            if track.ladder.healthy():  # called on every healthy optimizer step: the cooldown counts steps
                self.emit(trainer, "recovered", "info", {"healthy_steps": float(self.cooldown)}, None)
        else:
            unavailable = set() if log.has_responder("rollback") else {"rollback"}
            action = track.ladder.decide(detection, unavailable)
            if action == "clip" and (detection == "nonfinite" or ranks_disagree):
                action = "skip"  # a NaN cannot be clipped; ranks with different gradients cannot clip alike
            self._apply(trainer, opt, index, track, action, detection, stats, params, grads, gb)
            track.actions[action] = track.actions.get(action, 0) + 1
            severity = "critical" if action in ("rollback", "halt") else _SEVERITY[detection]
            self.emit(trainer, detection, severity, stats, action)

        self._log_metrics(trainer, pl_module, index, stats, detection is not None)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._halt_report is None:
            return
        report, self._halt_report = self._halt_report, None
        path = halt_checkpoint_path(trainer, "stability")
        report += f" A checkpoint of the state after the skipped step is at {path}."
        self.halt(trainer, report, path, "halt", {})

    # -- detection and actions -------------------------------------------------------------------
    def _measure(
        self,
        trainer: pl.Trainer,
        opt: torch.optim.Optimizer,
        track: _OptimizerTrack,
        params: list[Tensor],
        grads: list[Tensor],
        loss: Tensor | None,
    ) -> tuple[float, float, int, float | None, bool]:
        """The step's statistics on the host, the same on every rank.

        Returns the gradient norm, the spiking-element count, the number of elements checked, the
        (unscaled, rank-averaged) loss or ``None``, and whether the ranks' gradient norms differ.
        """
        step = trainer.global_step
        # sharded: this rank's share of the sum of squares, not a norm (summed over ranks below)
        norm = local_sum_of_squares([p.grad for p in params]) if self._sharded else global_grad_norm(grads)  # type: ignore[misc]
        device = norm.device
        use_elements = self.theta is not None and track.armed and not self._in_reset_warmup(track, step)
        # Fast path: the largest g^2 - theta v over all elements (three foreach passes). Only where it
        # is positive can an element spike; then the exact count follows (see _count_spikes).
        element_checks = use_elements and moment_family(opt) is not None
        excesses: list[Tensor] = []
        checked = 0
        if element_checks:
            for chunk in chunk_by_numel(grads, CHUNK_NUMEL):
                moments = self._moments(opt, [params[i] for i in chunk])
                excesses.append(max_spike_excess([grads[i] for i in chunk], moments, self.theta))  # type: ignore[arg-type]
                checked += sum(grads[i].numel() for i, v in zip(chunk, moments) if v is not None)
        excess = excesses[0] if len(excesses) == 1 else torch.stack(excesses).max() if excesses else None
        riders, flags = self._rider_flags(trainer, device) if trainer.world_size > 1 else ([], [])
        if self._sharded:
            # Sharded gradients: one all-reduce of four sums per step, the same numbers on every
            # rank. Each rank holds different rows, so the norm is the root of the summed squares
            # (not a maximum of per-rank norms) and the ranks cannot disagree on it; a NaN on any rank
            # makes the sum NaN. Only the sign of the element excess matters (it gates the count).
            zero = torch.zeros((), device=device)
            sums = torch.stack([
                norm,
                (excess.to(device) > 0).float() if excess is not None else zero,
                loss.to(device) if loss is not None else zero,
                zero + (1.0 if loss is not None else 0.0),
                *flags,  # the riders' 0/1 flags: a sum above zero is a flag set on some rank
            ])
            sum_sq, max_excess, loss_sum, loss_count, *agreed = all_reduce_sum_(sums).tolist()
            self._deliver(trainer, riders, agreed)
            grad_norm = min_norm = math.sqrt(sum_sq) if sum_sq >= 0 else math.nan
        elif trainer.world_size > 1:
            # The guard's only collective: one all-gather of four numbers, so every rank computes the
            # same statistics from the same inputs and takes the same decision. After DDP's all-reduce
            # the gradients agree; the loss does not, and a NaN loss on any one rank must make every
            # rank skip. A gradient norm that differs between ranks means a rank's gradients were
            # corrupted after the reduction: then only skipping keeps replicas equal.
            zero = torch.zeros((), device=device)
            local = torch.stack([
                norm,
                excess.to(device) if excess is not None else zero - math.inf,
                loss.to(device) if loss is not None else zero,
                zero + (1.0 if loss is not None else 0.0),
                *flags,  # the riders' 0/1 flags, set where set on any rank
            ])
            gathered = trainer.strategy.all_gather(local).reshape(-1, local.numel())
            grad_norm, max_excess, loss_sum, loss_count, min_norm, *agreed = torch.cat([
                torch.stack([
                    gathered[:, 0].max(),  # max propagates NaN
                    gathered[:, 1].max(),
                    gathered[:, 2].sum(),
                    gathered[:, 3].sum(),
                    gathered[:, 0].min(),
                ]),
                gathered[:, 4:].amax(dim=0),
            ]).tolist()
            self._deliver(trainer, riders, agreed)
        else:
            # One device-to-host transfer per step: the decision needs these scalars on the host.
            # (A placeholder fills the slots that are absent; the host knows which they are.)
            values = torch.stack([norm, norm if excess is None else excess, norm if loss is None else loss]).tolist()
            grad_norm = min_norm = values[0]
            max_excess = values[1] if excess is not None else -math.inf
            loss_sum, loss_count = (values[2], 1.0) if loss is not None else (0.0, 0.0)
        ranks_disagree = grad_norm != min_norm and math.isfinite(grad_norm)
        spike_count = self._count_spikes(trainer, opt, params, grads) if max_excess > 0 else 0.0
        loss_value = loss_sum / loss_count if loss_count > 0 else None
        if loss_value is not None:
            loss_value /= loss_scale(trainer)

        return grad_norm, spike_count, checked, loss_value, ranks_disagree

    def _rider_flags(self, trainer: pl.Trainer, device: torch.device) -> tuple[list[tuple[StabilityCallback, int]], list[Tensor]]:
        """The riders with flags to agree on now (each with how many), and the flags as 0/1 floats."""
        riders: list[tuple[StabilityCallback, int]] = []
        flags: list[Tensor] = []
        for rider in self._riders:
            mine = rider.agreement_flags(trainer)
            if mine is not None:
                riders.append((rider, len(mine)))
                flags += [torch.as_tensor(f, dtype=torch.float32, device=device).reshape(()) for f in mine]
        return riders, flags

    def _deliver(self, trainer: pl.Trainer, riders: list[tuple[StabilityCallback, int]], agreed: Sequence[float]) -> None:
        """Hand each rider its flags back, agreed between the ranks."""
        start = 0
        for rider, n in riders:
            rider.on_agreement(trainer, [v > 0 for v in agreed[start:start + n]])
            start += n

    def _count_spikes(
        self, trainer: pl.Trainer, opt: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor]
    ) -> float:
        """Exact SPAM spike count (elements with no history excluded), on steps that may have spikes."""
        count = torch.zeros((), device=grads[0].device)
        for chunk in chunk_by_numel(grads, CHUNK_NUMEL):
            n, _ = count_element_spikes(
                [grads[i] for i in chunk], self._moments(opt, [params[i] for i in chunk]), self.theta  # type: ignore[arg-type]
            )
            count = count + n
        if self._sharded:
            count = all_reduce_sum_(count.float())  # each rank counted its own rows
        elif trainer.world_size > 1:
            # a second small collective, only on such steps: every rank must use the same count
            count = trainer.strategy.all_gather(count.float().reshape(1)).max()
        return float(count)

    def _detect(
        self, track: _OptimizerTrack, stats: dict[str, float], loss: float | None
    ) -> str | None:
        """The detection that decides the step: of all that fired, the one needing the strongest rung.

        A corrupted batch shows as a loss spike *and* a gradient spike; the loss spike asks for a skip,
        which beats clipping the batch's gradient and applying it anyway.
        """
        if not math.isfinite(stats["grad_norm"]) or (loss is not None and not math.isfinite(loss)):
            return "nonfinite"
        if not track.armed:
            # Before the baselines are trustworthy only a wild outlier is called a spike, so even the
            # first steps never apply a gradient hundreds of times larger than any seen so far.
            wild = len(track.grad_window) >= PRE_ARM_MIN_SAMPLES and stats["grad_ratio"] >= PRE_ARM_RATIO
            if wild:
                stats["grad_spike"] = 1.0
            return "grad_spike" if wild else None
        fired = []
        if stats["grad_zscore"] >= self.grad_zscore and stats["grad_ratio"] >= self.grad_ratio:
            fired.append("grad_spike")
        if loss is not None and stats["loss_zscore"] >= self.loss_zscore:
            ratio = stats["loss_ratio"]
            if math.isnan(ratio) or ratio >= self.loss_ratio:
                fired.append("loss_spike")
        if stats["spike_count"] > 0:
            fired.append("element_spike")
        if not fired:
            return None
        for kind in fired:
            stats[kind] = 1.0
        return max(fired, key=lambda kind: (track.ladder.start_rung(kind), -fired.index(kind)))

    def _apply(
        self,
        trainer: pl.Trainer,
        opt: torch.optim.Optimizer,
        index: int,
        track: _OptimizerTrack,
        action: str,
        detection: str,
        stats: dict[str, float],
        params: list[Tensor],
        grads: list[Tensor],
        gb: Baseline,
    ) -> None:
        step = trainer.global_step
        if action == "clip":
            if stats["spike_count"] > 0 and self.theta is not None:
                for p, g in zip(params, grads):  # a rare path: decode the moments again, one at a time
                    clip_element_spikes_([g], self._moments(opt, [p]), self.theta)  # type: ignore[list-item]
            if detection == "grad_spike" and math.isfinite(gb.median) and gb.median > 0:
                # rescale the global norm to the baseline (after the element clip, if any); sharded,
                # one more all-reduce, on this step only, and every rank scales by the same factor
                norm = (
                    all_reduce_sum_(local_sum_of_squares([p.grad for p in params])).sqrt()  # type: ignore[misc]
                    if self._sharded else global_grad_norm(grads)
                )
                factor = torch.clamp(gb.median / norm.clamp_min(1e-12), max=1.0)
                scale_grads_(grads, factor.to(grads[0].device))
            return
        for p in params:  # every rung above clip skips the step
            p.grad = None
        if action == "reset_moments":
            reset_moments_(opt, params)
            track.warmup_from = step + 1
            ids = {id(p) for p in params}
            track.warmup_groups = [i for i, g in enumerate(opt.param_groups) if any(id(p) in ids for p in g["params"])]
        elif action == "lr_backoff":
            track.backoff_until = step + 1 + self.lr_backoff_steps
        elif action == "halt" and self._halt_report is None:
            self._halt_report = self._describe_halt(step, index, detection, stats, track)

    def _describe_halt(
        self, step: int, index: int, detection: str, stats: dict[str, float], track: _OptimizerTrack
    ) -> str:
        if detection in ("loss_spike",):
            statistic = f"loss {stats.get('loss', math.nan):.6g} against a baseline median of {stats.get('loss_baseline', math.nan):.6g}"
        else:
            statistic = (
                f"gradient norm {stats['grad_norm']:.6g} against a baseline median of {stats['grad_baseline']:.6g}"
                f" (robust z-score {stats['grad_zscore']:.3g}), {int(stats['spike_count'])} spiking elements"
            )
        tried = ", ".join(f"{a} x{n}" for a, n in track.actions.items()) or "nothing yet"
        return (
            f"{type(self).__name__} halted training at optimizer step {step} (optimizer {index}): {detection} with "
            f"{statistic}. Interventions tried in this run: {tried}. The halted step was skipped."
        )

    def _moments(self, opt: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor | None]:
        """The second moments of ``params``; sharded, their local shards (the rows of the gradients)."""
        moments = second_moments(opt, params)
        return [None if v is None else local(v) for v in moments] if self._sharded else moments

    def _in_reset_warmup(self, track: _OptimizerTrack, step: int) -> bool:
        # SPAM: after a reset the second moment is not meaningful yet; do not test elements against it.
        return track.warmup_from >= 0 and step < track.warmup_from + self.reset_warmup

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

    def _log_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, stats: dict[str, float], detection: bool
    ) -> None:
        if not (detection or is_logging_step(trainer)):
            return
        suffix = f"/opt{index}" if index > 0 else ""
        metrics = {
            f"stability/grad/norm{suffix}": stats["grad_norm"],
            f"stability/grad/spike_fraction{suffix}": stats["spike_fraction"],
        }
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
    """Has the AMP loss scaler found an inf for this optimizer, so that it will skip the step itself?

    It decides in ``unscale_``, before ``on_before_optimizer_step``: a NaN that appears later, or a
    finite gradient whose norm overflows float32, is not seen by it and must be handled here.
    """
    scaler = grad_scaler(trainer)
    if scaler is None:
        return False
    # torch keeps what unscale_ found in a private table; if it moves, say so, and assume the scaler
    # saw the overflow (it sees every gradient; the loss is finite): never read an ordinary fp16
    # overflow as a non-finite detection that climbs the ladder.
    states = getattr(scaler, SCALER_STATES, None)
    if not isinstance(states, dict):
        _warn_scaler_moved(scaler)
        return True
    found = states.get(id(opt), {}).get(SCALER_FOUND_INF)
    if not isinstance(found, dict):
        _warn_scaler_moved(scaler)
        return True
    return any(float(t.sum()) > 0 for t in found.values())


# torch.amp.GradScaler's private per-optimizer table, as unscale_ fills it (pinned by a test)
SCALER_STATES = "_per_optimizer_states"
SCALER_FOUND_INF = "found_inf_per_device"
_warned_scaler: list[bool] = []


def _warn_scaler_moved(scaler: Any) -> None:
    if not _warned_scaler:
        _warned_scaler.append(True)
        rank_zero_warn(
            f"GradientSpikeGuard: {type(scaler).__name__}.{SCALER_STATES}[id(optimizer)][{SCALER_FOUND_INF!r}] "
            f"is not where torch {torch.__version__} used to keep it; non-finite gradients with a finite loss are "
            "taken for fp16 overflows the loss scaler skips (an amp_overflow event). Please report this."
        )


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
