"""SpectralMonitor: per-layer singular spectra during training, and spectral interventions.

The hooks read top to bottom as measure (:mod:`~lightning_stability.ops.spectral_tracker`, and the
full spectra of :mod:`._spectral_full`) -> decide (:mod:`._spectral_policy`) -> act
(:mod:`._spectral_act`) -> emit (events, :func:`~lightning_stability.core.lightning.log_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_stability.callbacks._base import (
    StabilityCallback,
    check_fraction,
    check_int,
    check_on_halt,
    check_positive,
)
from lightning_stability.callbacks._spectral_act import (
    ADVICE,
    IntervalLoss,
    SpectralActions,
    intervention_failed,
)
from lightning_stability.callbacks._spectral_forensics import LayerForensics
from lightning_stability.callbacks._spectral_full import FullSpectra
from lightning_stability.callbacks._spectral_policy import (
    DEFAULT_LADDER,
    SPECTRAL_ACTIONS,
    LayerPolicy,
    Rules,
    agreed_inputs,
)
from lightning_stability.core.escalation import validate_ladder
from lightning_stability.core.lightning import halt_checkpoint_path, is_logging_step, log_metrics, rank_gather
from lightning_stability.core.schedule import Schedule
from lightning_stability.events import StabilityEvent
from lightning_stability.ops.optim_state import unwrap_optimizer
from lightning_stability.ops.spectral_tracker import SpectralTracker, check_layout
from lightning_stability.ops.spectral_weights import check_patterns, find_weight_matrices

_FULL_PRECISION = ("32-true", "64-true", "32", "64")
CHECK_EVERY_N_STEPS = 50  # the checks' default cadence: Lightning's default log_every_n_steps
LOGGED = ("sigma_max", "stable_rank", "update_ratio", "alignment")


class SpectralMonitor(StabilityCallback):
    r"""Tracks the singular spectrum of every weight matrix during training; intervenes only if asked.

    **Which defaults change training: none.** At its defaults the monitor observes: ``ladder=("warn",)``
    emits each detection as an event and edits nothing (docs/benchmarks.md: capping and PSS after a
    detection rescued 0 of 6 learning-rate blow-ups). Its first detection also emits one
    ``spectral_advice`` event (``info``) and a warning naming the remedies to opt into (``ADVICE``):
    ``ladder=("clip_updates", "rollback")``, or ``SpectralUpdateClip(optimizer, c=3.0)`` from the first
    step. The one request it makes whatever the ladder: a rollback, from an attached
    ``InMemoryRollback``, for a non-finite weight.

    **Which weights**: those :func:`~lightning_stability.ops.spectral.find_weight_matrices` finds
    (Linear-like, Embedding, Conv, transformers' ``Conv1D``, MultiheadAttention, RNN layers), filtered
    by ``include``/``exclude``; tied weights count once. Every other parameter of two or more
    dimensions is listed with its reason in one ``spectral_skipped`` event and in ``skipped``.

    **Measure** every ``every_n_steps``, on the weights' device with no host sync
    (:class:`~lightning_stability.ops.spectral_tracker.SpectralTracker`): ``sigma_max`` by
    warm-started (block) power iteration, weights of one shape in one stack (on a small model, several
    shapes in one zero-padded stack); the update's spectral norm relative to the weight's
    (``update_ratio``), by a power iteration on the update that needs no copy of the old weights; the
    gradient's alignment ``(u^T G v)^2 / ||G||_F^2`` with the top pair (PSS's dominant-direction energy).

    **Decide** every ``check_every_n_steps`` (50 by default, whatever ``log_every_n_steps`` says: how
    often metrics are written never changes what is detected): the statistics and the stable rank
    ``||W||_F^2 / sigma_max^2`` come to the host in one copy; an unconverged estimate (residual above
    ``tol``) gets up to ``max_power_iters`` more iterations. Against each layer's robust history:

    =========================  ========================================================================
    detection                  rule
    =========================  ========================================================================
    ``sigma_growth``           per-step log-growth of sigma_max since the last check with a robust
                               z-score >= ``growth_zscore`` and at least ``min_growth``
    ``rank_collapse``          stable rank below ``rank_collapse`` times its median
    ``alignment``              the largest alignment since the last check >= ``alignment_threshold``
                               while sigma_max grows (the gradient feeds the top direction)
    ``embedding_rank_rise``    (embeddings, low precision) stable rank above ``embedding_rank_rise``
                               times its median: a warning only
    ``intervention_failed``    the mean loss per optimizer step (unscaled, over accumulated
                               micro-batches) after a cap, PSS or update clip is worse than before it
                               by more than ``loss_tolerance``: asks for a rollback
    ``nonfinite_weight``       a non-finite sigma_max (a NaN or Inf in the weight): asks for a
                               rollback, whatever the ladder
    =========================  ========================================================================

    **Act**, as opted into through ``ladder``: per layer, one rung per detection, climbing every
    ``patience`` detections until ``cooldown`` healthy checks pass, each an event:

    ================  =========================================================================
    ``warn``          an event only (the default ladder: ``("warn",)``)
    ``cap``           ``W <- W + (min(sigma, cap) - sigma) u v^T`` with the converged pair, ``cap``
                      the last healthy check's sigma_max times ``cap_factor``
    ``pss``           parametric singularity smoothing of the top ``k`` singular values (``k`` the
                      stable rank, at most ``pss_max_k``) towards the next one by ``pss_fn``
    ``clip_updates``  soft spectral clipping of the layer's updates (:class:`SpectralUpdateClip`,
                      level ``update_clip``) until the incident ends
    ``rollback``      asks ``InMemoryRollback`` (if attached) to restore a snapshot
    ``halt``          saves a checkpoint and stops the fit with a report
    ================  =========================================================================

    A cap, PSS or update clip that did not work by the next check (the loss or its statistic worse:
    docs/spectral.md) is undone (``intervention_reverted``) and not used again in the incident.

    **Full spectra** every ``full_every_n_steps``, each layer once a period, spread over its steps:
    the power-law alpha and the other ESD metrics below; the tracking re-seeded with the exact top pair.

    ===============================================  =========================================
    metric (``<layer>``: the module's name)          logged
    ===============================================  =========================================
    ``stability/spectral/<layer>/sigma_max``         logging steps, and checks with a detection
    ``stability/spectral/<layer>/stable_rank``       the same
    ``stability/spectral/<layer>/update_ratio``      the same
    ``stability/spectral/<layer>/alignment``         the same (the step's value)
    ``stability/spectral/<layer>/alpha``             the layer's full-spectrum step (also
                                                     ``alpha_weighted``, ``log_norm``, ``decay``,
                                                     ``mp_spikes``, ``ks``, ``stable_rank_exact``)
    ``stability/spectral/<layer>/singular_values``   histogram, full-spectrum step (TensorBoard)
    ``stability/events/<kind>``                      logging steps, and checks with a detection
    ===============================================  =========================================

    Every value also lands in ``trainer.callback_metrics`` (for ``EarlyStopping``, ``ModelCheckpoint``).
    Example::

        from lightning_stability import InMemoryRollback, SpectralMonitor
        trainer = pl.Trainer(callbacks=[SpectralMonitor(exclude=["lm_head"])])  # observes only
        # opting in: clip a flagged layer's updates, then roll back if it persists
        trainer = pl.Trainer(callbacks=[SpectralMonitor(ladder=("clip_updates", "rollback")), InMemoryRollback()])

    Under DDP measured steps need no collective, and each check agrees the worst rank's statistics and
    the rank mean of the loss in one all-gather; on FSDP2 row shards, 4 all-reduces a measured step.

    Args:
        include, exclude: shell-style patterns on module names.
        every_n_steps: measure every n optimizer steps (>= 1).
        power_iters: power iterations per measured step (>= 1).
        block: vectors tracked per weight (>= 1): a block follows top singular values that cross.
        init_iters: iterations for fresh vectors (>= 1); torch's ``spectral_norm`` uses 15.
        max_power_iters: the most extra iterations a check adds to an unconverged estimate.
        tol: residual under which an estimate counts as converged.
        check_every_n_steps: steps between checks (the checks follow steps ``n - 1``, ``2n - 1``, ...);
            ``None`` is 50, Lightning's default logging cadence, whatever the trainer's.
        window: checks kept in each layer's history (>= 2); detections arm at ``min(3, window)``.
        warmup: optimizer steps before detections are armed (>= 0).
        growth_zscore, min_growth: both must be reached for ``sigma_growth``.
        rank_collapse: fraction of the median stable rank under which it has collapsed, in (0, 1).
        alignment_threshold: in (0, 1]; PSS uses 0.8.
        embedding_rank_rise: ratio (> 1) for the embedding warning; ``"auto"``: 1.5 below 32-bit, else off.
        ladder: ordered actions from ``SPECTRAL_ACTIONS``; ``("warn",)`` (observe) by default.
        patience, cooldown: detections per rung; healthy checks that end an incident.
        cap_factor: the cap as a multiple of the layer's last healthy sigma_max (> 0).
        pss_fn, pss_max_k: ``"log"`` or ``"clip"``; the most singular values PSS smooths.
        update_clip: SPECTRA's level ``c`` for ``clip_updates``.
        loss_tolerance: relative loss increase after an intervention that asks for a rollback.
        full_every_n_steps: period of the full-spectrum analysis; ``None`` turns it off.
        seed: seeds the starting vectors and PSS's random projections (identical on every rank).
        on_halt: ``"stop"`` or ``"raise"``.
        name: distinguishes several monitors in one trainer.
    """

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        every_n_steps: int = 1,
        power_iters: int = 1,
        block: int = 1,
        init_iters: int = 15,
        max_power_iters: int = 20,
        tol: float = 1e-2,
        check_every_n_steps: int | None = None,
        window: int = 64,
        warmup: int = 200,
        growth_zscore: float = 6.0,
        min_growth: float = 5e-3,
        rank_collapse: float = 0.5,
        alignment_threshold: float = 0.8,
        embedding_rank_rise: float | Literal["auto"] | None = "auto",
        ladder: Sequence[str] = DEFAULT_LADDER,
        patience: int = 2,
        cooldown: int = 5,
        cap_factor: float = 1.0,
        pss_fn: Literal["log", "clip"] = "log",
        pss_max_k: int = 8,
        update_clip: float = 10.0,
        loss_tolerance: float = 0.1,
        full_every_n_steps: int | None = 500,
        seed: int = 0,
        on_halt: Literal["stop", "raise"] = "stop",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        cls = type(self).__name__
        self.include = check_patterns(cls, "include", include) if include is not None else None
        self.exclude = check_patterns(cls, "exclude", exclude)
        self.every_n_steps = check_int(cls, "every_n_steps", every_n_steps, 1)
        self.power_iters = check_int(cls, "power_iters", power_iters, 1)
        self.block = check_int(cls, "block", block, 1)
        self.init_iters = check_int(cls, "init_iters", init_iters, 1)
        self.max_power_iters = check_int(cls, "max_power_iters", max_power_iters, 0)
        self.tol = check_positive(cls, "tol", tol)
        self.check_every_n_steps = (
            None if check_every_n_steps is None else check_int(cls, "check_every_n_steps", check_every_n_steps, 1)
        )
        self.window = check_int(cls, "window", window, 2)
        self.warmup = check_int(cls, "warmup", warmup, 0)
        self.growth_zscore = check_positive(cls, "growth_zscore", growth_zscore)
        self.min_growth = check_positive(cls, "min_growth", min_growth)
        self.rank_collapse = check_fraction(cls, "rank_collapse", rank_collapse)
        self.alignment_threshold = check_fraction(cls, "alignment_threshold", alignment_threshold, closed=True)
        if embedding_rank_rise not in (None, "auto"):
            check_positive(cls, "embedding_rank_rise", embedding_rank_rise, above=1.0)
        self.embedding_rank_rise = embedding_rank_rise
        self.ladder = validate_ladder(ladder, f"{cls}(ladder)", actions=SPECTRAL_ACTIONS)
        self.patience = check_int(cls, "patience", patience, 1)
        self.cooldown = check_int(cls, "cooldown", cooldown, 1)
        self.cap_factor = check_positive(cls, "cap_factor", cap_factor)
        if pss_fn not in ("log", "clip"):
            raise ValueError(f"{cls}(pss_fn={pss_fn!r}): expected 'log' or 'clip'")
        self.pss_fn: Literal["log", "clip"] = pss_fn
        self.pss_max_k = check_int(cls, "pss_max_k", pss_max_k, 1)
        self.update_clip = check_positive(cls, "update_clip", update_clip)
        self.loss_tolerance = check_positive(cls, "loss_tolerance", loss_tolerance)
        self.full_every_n_steps = (
            None if full_every_n_steps is None else check_int(cls, "full_every_n_steps", full_every_n_steps, 1)
        )
        self.seed = check_int(cls, "seed", seed, 0)
        self.on_halt = check_on_halt(cls, on_halt)
        self._rules = Rules(self.window, self.warmup, self.growth_zscore, self.min_growth, self.rank_collapse,
                            self.alignment_threshold, self.ladder, self.patience, self.cooldown)
        self._measure_at = Schedule(self.every_n_steps)
        checks = CHECK_EVERY_N_STEPS if self.check_every_n_steps is None else self.check_every_n_steps
        self._check_at = Schedule(checks, offset=checks - 1)  # after steps n - 1, 2n - 1, ...
        self._fresh()

    def _fresh(self) -> None:
        """The state of one fit: nothing measured, decided or done yet."""
        self._tracker = SpectralTracker(self.block, self.power_iters, self.tol, self.max_power_iters, self.seed)
        self._policy: dict[str, LayerPolicy] = {}
        self._act = SpectralActions(type(self).__name__, self.ladder, self.cap_factor, self.pss_fn, self.pss_max_k,
                                    self.update_clip, self.loss_tolerance, self.seed)
        self._full = FullSpectra(self.full_every_n_steps)
        self.skipped: dict[str, str] = {}  # matrix-shaped parameters not tracked, with the reason
        self._pending: dict[str, Any] = {}  # per-layer state loaded before the layers exist
        self._rise: float | None = None
        self._loss = IntervalLoss()
        self._weights_moved = False  # restored by someone else: the update estimate restarts
        self._last_check_step = -1
        self._seen_step = -1
        self._forensics = LayerForensics(self.source)

    # -- state -----------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return list(self._tracker.layers)

    def estimates(self) -> dict[str, dict[str, float]]:
        """The latest per-layer statistics on the host, in one copy: ``sigma_max``, ``stable_rank``,
        ``update_ratio``, ``alignment`` (the last step's), ``alignment_max`` (the largest since the
        last check) and ``residual`` (of the power iteration)."""
        return self._tracker.estimates()

    def _layer_state(self, name: str) -> dict[str, Any]:
        return {**self._policy[name].state_dict(), "clip_updates": name in self._act.clip_on,
                "full": dict(self._full.results.get(name, {})), **self._tracker.layer_state(name)}

    @override
    def state_dict(self) -> dict[str, Any]:
        layers = {name: self._layer_state(name) for name in self._tracker.layers}
        for name, state in self._pending.items():
            layers.setdefault(name, state)
        return {
            "layers": layers,
            "counts": dict(self._counts),
            "halt_report": self.halt_report,
            **self._act.state_dict(),
            **self._loss.state_dict(),
            "last_check_step": self._last_check_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = {str(k): v for k, v in dict(state_dict.get("layers", {})).items()}
        self._counts = {str(k): int(v) for k, v in dict(state_dict.get("counts", {})).items()}
        self.halt_report = state_dict.get("halt_report")
        self._act.load_state_dict(state_dict)
        self._loss.load_state_dict(state_dict)
        self._last_check_step = int(state_dict.get("last_check_step", -1))
        if self._tracker.layers:
            self._apply_pending()

    def _apply_pending(self) -> None:
        for name, state in list(self._pending.items()):
            if name in self._tracker.layers:
                self._policy[name].load_state_dict(state)
                self._full.results[name] = {str(k): float(v) for k, v in dict(state.get("full", {})).items()}
                (self._act.clip_on.add if state.get("clip_updates", False) else self._act.clip_on.discard)(name)
                self._tracker.load_layer_state(name, state)
                del self._pending[name]
        self._tracker.restore_probes()
        for name, layer in self._tracker.layers.items():
            self._act.set_update_clip(layer, name in self._act.clip_on)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(state, dict) and self._tracker.sharded:  # rank zero's state, with every row of every rank
            self._tracker.whole_left_vectors(state.get("layers", {}), trainer.strategy.root_device)

    @override
    def restore_snapshot_state(self, state: dict[str, Any]) -> None:
        counts, report = self._counts, self.halt_report
        super().restore_snapshot_state(state)
        self._counts, self.halt_report = counts, report
        self._weights_moved = True

    # -- hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        check_layout(type(self).__name__, type(trainer.strategy).__name__, self.block)
        self._act.detach_clips()
        self._fresh()
        self._counts, self.halt_report = {}, None
        self.listen(trainer, self._on_event)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # the event log's subscription ends there
        self._act.detach_clips()  # the optimizer goes back as it was; the state keeps the flag

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._halted = False
        self._act.halt_report = None
        self._seen_step = -1
        self._act.optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if self.embedding_rank_rise == "auto":
            self._rise = None if str(trainer.precision) in _FULL_PRECISION else 1.5
        else:
            self._rise = self.embedding_rank_rise
        if not self._tracker.layers:
            self._build(trainer, pl_module)
        self._apply_pending()

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights, self.skipped = find_weight_matrices(pl_module, self.include, self.exclude)
        if not weights:
            rank_zero_warn(f"{type(self).__name__}: no weight matrix matches; nothing to monitor.")
        if self.skipped:
            # one event lists every matrix-shaped parameter left untracked, each with its reason
            self.emit(trainer, "spectral_skipped", "info",
                      {"tracked": float(len(weights)), "skipped": float(len(self.skipped))}, None,
                      "; ".join(f"{name}: {why}" for name, why in self.skipped.items()))
        self._tracker.build(weights, self.init_iters, type(self).__name__)
        self._policy = {w.name: LayerPolicy(w.embedding, self._rules) for w in weights}
        self._forensics.build(pl_module, weights)

    def _on_event(self, event: StabilityEvent) -> None:
        if event.kind == "rollback" and event.source != self.source:
            self._weights_moved = True
        self._forensics.see(event)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._loss.read(trainer)  # the step's loss, as the shared StepLoss accumulated it
        if self._measure_at.due(trainer.global_step):
            owned = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
            self._tracker.observe_gradients(owned)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1  # the optimizer step that just ran
        self._loss.end_step()
        if step < 0 or step == self._seen_step or not self._tracker.groups:
            return  # accumulating gradients: no optimizer step yet
        self._seen_step = step
        if self._forensics.incident_step == step and (found := self._forensics.update_ratios(trainer, self._tracker)):
            metrics, details = found  # the step before's ratios, as measured then
            self.emit(trainer, "update_ratio", "info", metrics, None, None, details, step=step)
        if self._measure_at.due(step):  # measure
            moved, self._weights_moved = self._weights_moved, False
            self._tracker.measure(moved)
            self._forensics.last_measured = step
        self._full.run(trainer, self._tracker, step)
        if self._check_at.due(step) and not self._halted:  # decide, act, emit
            self._last_check_step = step
            self._check(trainer, step)
        elif is_logging_step(trainer):
            self._log(trainer, self._tracker.estimates(), detected=False)
        if self._act.halt_report is not None:
            report, self._act.halt_report = self._act.halt_report, None
            path = halt_checkpoint_path(trainer, "spectral")
            self.halt(trainer, report + f" A checkpoint is at {path}.", path, "spectral_halt", {})

    # -- a check -----------------------------------------------------------------------------------
    def _check(self, trainer: pl.Trainer, step: int) -> None:
        stats = self._tracker.estimates()  # the check's host copy
        if self._tracker.converge(stats):
            stats = self._tracker.estimates()
        # every input of a decision the same on every rank: the worst statistics, the rank mean of the loss
        device = trainer.strategy.root_device
        stats, loss = agreed_inputs(stats, self._loss.take(device), rank_gather(trainer), device, self._tracker.sharded)
        self._tracker.reset_alignment()
        can_rollback = self.event_log(trainer).has_responder("rollback")
        for e in self._act.judge(loss, stats, step, self._tracker.layers, self._policy, can_rollback):
            self.emit(trainer, *e, details=self._forensics.named(e.target))  # the last interventions that did not work, undone
        acted = detected = False
        for name, policy in self._policy.items():
            verdict = policy.verdict(name, stats[name], step, self._rise, can_rollback)
            detected = detected or policy.detection is not None
            if verdict is None:
                continue
            emissions, changed = self._act.apply(verdict, self._tracker.layers[name], policy, stats[name], step,
                                                 can_rollback)
            acted = acted or changed
            for e in emissions:
                self.emit(trainer, *e, details=self._forensics.named(e.target))
        if acted:
            self._act.acted()
        self._log(trainer, stats, detected)  # a detection's statistics reach the logger at its step

    def _log(self, trainer: pl.Trainer, stats: dict[str, dict[str, float]], detected: bool) -> None:
        metrics = {f"stability/spectral/{name}/{key}": s[key] for name, s in stats.items() for key in LOGGED}
        metrics.update(self.event_count_metrics())
        log_metrics(trainer, metrics, detected)


__all__ = ["ADVICE", "DEFAULT_LADDER", "SPECTRAL_ACTIONS", "SpectralMonitor", "intervention_failed"]
