"""What the spectral monitor does about a verdict: the cap, PSS smoothing, the clip of a layer's
updates, a rollback request, a halt (the actions are tabled in
:class:`~lightning_stability.SpectralMonitor`'s docstring); and whether an intervention worked, judged
at the next check (:meth:`SpectralActions.judge`) from the layer's sigma_max and the mean loss of the
check interval (:class:`IntervalLoss`): one that did not is undone and not used again in the incident.

Each verdict becomes the events to emit (:class:`Emission`); the callback emits them in order.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_stability.callbacks._spectral_policy import RECOVERED, LayerPolicy, Verdict
from lightning_stability.core.lightning import grad_scaler, loss_scale, step_loss
from lightning_stability.ops.sharded import full, local
from lightning_stability.ops.spectral import (
    SpectralUpdateClip,
    pss_factors,
    spectral_cap_delta,
    subspace_iteration,
)
from lightning_stability.ops.spectral_stack import TrackedLayer, layer_generator

CAP_ITERS = 100  # block iterations that converge the top pair before a cap
# What the advice event points to (docs/benchmarks.md: spectral clipping of every update from the
# first step rescued 3 of 3 of those blow-ups; the monitor's own weight edits none).
ADVICE = (
    "SpectralMonitor observes only at its defaults (ladder=('warn',): no weight is edited). To act on a "
    "detection, opt in: SpectralMonitor(ladder=('clip_updates', 'rollback')) clips the flagged layer's update "
    "spectra and asks an attached InMemoryRollback for a rollback if the detection persists; "
    "SpectralUpdateClip(optimizer, c=3.0) clipping every update from the first step rescued 3 of 3 learning-rate "
    "blow-ups in docs/benchmarks.md, where ladder=('cap', 'pss'), which edit the weights, rescued 0 of 6."
)


class Emission(NamedTuple):
    """An event for the callback to emit: ``(kind, severity, metrics, action, target)``."""

    kind: str
    severity: str
    metrics: dict[str, float]
    action: str | None
    target: str | None


class Trial(NamedTuple):
    """An intervention on one layer, judged at the next check: ``action``, the optimizer step and the
    layer's agreed sigma_max when it was taken, and for a weight edit (cap, PSS) the change it made,
    whole, as ``(U (m, k), c (k,), V (n, k))``: ``W`` gained ``U diag(c) V^T``."""

    action: str
    step: int
    sigma: float
    edit: tuple[Tensor, Tensor, Tensor] | None


class SpectralActions:
    """The interventions of one monitor, and the loss check that judges them (see the module docstring)."""

    def __init__(self, owner: str, ladder: tuple[str, ...], cap_factor: float, pss_fn: Literal["log", "clip"],
                 pss_max_k: int, update_clip: float, loss_tolerance: float, seed: int) -> None:
        self.owner, self.ladder = owner, ladder
        self.cap_factor, self.pss_fn, self.pss_max_k = cap_factor, pss_fn, pss_max_k
        self.update_clip, self.loss_tolerance, self.seed = update_clip, loss_tolerance, seed
        self.optimizers: list[torch.optim.Optimizer] = []
        self.clip_on: set[str] = set()  # layers whose updates are clipped (kept in the checkpoint)
        self.clippers: dict[str, SpectralUpdateClip] = {}
        self.advised = False  # the observe-only advice was given in this fit
        self.halt_report: str | None = None
        self.last_loss = math.nan  # mean loss of the last check interval
        self.loss_before: float | None = None  # the loss before an intervention whose effect is due
        self.trials: dict[str, Trial] = {}  # this check interval's interventions, judged at the next check

    # -- verdicts -----------------------------------------------------------------------------------
    def apply(self, v: Verdict, layer: TrackedLayer, policy: LayerPolicy, s: dict[str, float], step: int,
              can_rollback: bool) -> tuple[list[Emission], bool]:
        """Carry out one verdict: the events to emit, and whether the weights were changed."""
        if v.kind == RECOVERED:
            self.set_update_clip(layer, False)
            return [Emission(v.kind, "info", v.metrics, None, v.layer)], False
        if v.kind == "nonfinite_weight":
            # nothing spectral repairs a NaN in the weights: ask for a rollback (the guard stops such
            # a step from being applied; the weights themselves need an older copy)
            return [Emission(v.kind, "critical", v.metrics, "rollback" if can_rollback else None, v.layer)], False
        if v.action is None:  # a warning-only detection
            return [Emission(v.kind, "warning", v.metrics, None, v.layer)], False
        action, metrics, changed = v.action, dict(v.metrics), False
        if action in ("cap", "pss"):
            before = float(_sigma(layer))
            if action == "cap":
                after, edit = self.cap(layer, policy)
            else:
                after, k, edit = self.pss(layer, s["stable_rank"], step)
                metrics["k"] = float(k)
            metrics.update(sigma_before=before, sigma_after=after)
            policy.last_sigma = after
            self.trials[layer.name] = Trial(action, step, s["sigma_max"], edit)
            changed = True
        elif action == "clip_updates":
            self.set_update_clip(layer, True)
            metrics["update_clip"] = self.update_clip
            self.trials[layer.name] = Trial(action, step, s["sigma_max"], None)
            changed = True
        elif action == "halt" and self.halt_report is None:
            self.halt_report = (
                f"{self.owner} halted training at optimizer step {step}: {v.kind} in layer "
                f"{layer.name} (sigma_max {s['sigma_max']:.4g}, stable rank {s['stable_rank']:.4g}, "
                f"alignment {s['alignment_max']:.3g})."
            )
        severity = "critical" if action in ("rollback", "halt") else "warning"
        out = [Emission(v.kind, severity, metrics, action if action != "warn" else None, layer.name)]
        if action == "warn" and not self.advised and set(self.ladder) <= {"warn"}:
            # observing only: say once per fit which remedy to opt into
            self.advised = True
            out.append(Emission("spectral_advice", "info", metrics, None, layer.name))
            rank_zero_warn(f"{self.owner}: {v.kind} in layer {layer.name} at step {step}. {ADVICE}")
        return out, changed

    # -- judging the last interventions ---------------------------------------------------------------
    def judge(self, loss: float, stats: dict[str, dict[str, float]], step: int, layers: dict[str, TrackedLayer],
              policies: dict[str, LayerPolicy], can_rollback: bool) -> list[Emission]:
        """At a check, with the agreed statistics and the interval's mean loss (the same on every rank,
        so every rank judges alike): each intervention of the last interval that did not work is undone
        (an ``intervention_reverted`` event) and its rung not used again in the layer's incident; then
        the ``intervention_failed`` event (a rollback request) if the loss got worse.

        An intervention did not work when the loss got worse by more than ``loss_tolerance``, or when
        its own statistic did not move the right way: after a cap or PSS the layer's sigma_max is back
        at or above where it was when it was edited; under the clip of its updates it went on growing
        at the rate of a detection (``min_growth`` per step)."""
        before, self.loss_before = self.loss_before, None
        if math.isfinite(loss):
            self.last_loss = loss
        worse = intervention_failed(before, loss, self.loss_tolerance)
        out: list[Emission] = []
        trials, self.trials = self.trials, {}
        for name, trial in trials.items():
            if name not in layers:
                continue
            sigma = stats.get(name, {}).get("sigma_max", math.nan)
            if trial.edit is not None:
                moved = sigma < trial.sigma
            else:
                steps = max(1, step - trial.step)
                moved = sigma > 0 and trial.sigma > 0 and math.log(sigma / trial.sigma) / steps < policies[name].rules.min_growth
            if worse is None and moved:
                continue
            self.revert(layers[name], trial)
            policies[name].ladder.fail(trial.action)
            out.append(Emission("intervention_reverted", "warning",
                                {"sigma_then": trial.sigma, "sigma_now": sigma, **(worse or {})}, f"revert_{trial.action}", name))
        if worse is not None:
            out.append(Emission("intervention_failed", "critical" if can_rollback else "warning", worse,
                                "rollback" if can_rollback else None, None))
        return out

    @torch.no_grad()
    def revert(self, layer: TrackedLayer, trial: Trial) -> None:
        """Undo ``trial``: a weight edit is subtracted again (the training since is kept), the clip of
        the layer's updates stops."""
        if trial.edit is None:
            self.set_update_clip(layer, False)
            return
        g = layer.group
        assert g is not None
        u, c, v = (t.to(layer.param.device) for t in trial.edit)
        shard = layer.matrix(local(layer.param.data))
        shard.sub_(g.own_rows((u * c) @ v.T).to(layer.param.dtype))
        g.drop_probes(layer.slot)

    def state_dict(self) -> dict[str, Any]:
        trials = {name: {"action": t.action, "step": t.step, "sigma": t.sigma,
                         "edit": None if t.edit is None else [x.detach().cpu() for x in t.edit]}
                  for name, t in self.trials.items()}
        return {"last_loss": self.last_loss, "loss_before": self.loss_before, "trials": trials}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_loss = float(state.get("last_loss", math.nan))
        before = state.get("loss_before")
        self.loss_before = None if before is None else float(before)
        self.trials = {}
        for name, t in dict(state.get("trials", {})).items():
            edit = t.get("edit")
            self.trials[str(name)] = Trial(str(t["action"]), int(t["step"]), float(t["sigma"]),
                                           None if edit is None else (edit[0], edit[1], edit[2]))

    def acted(self) -> None:
        """The weights were changed at this check: the next check judges the loss against this one's."""
        if math.isfinite(self.last_loss):
            self.loss_before = self.last_loss

    # -- interventions -------------------------------------------------------------------------------
    @torch.no_grad()
    def cap(self, layer: TrackedLayer, policy: LayerPolicy) -> tuple[float, tuple[Tensor, Tensor, Tensor]]:
        g = layer.group
        assert g is not None
        b = layer.slot
        # sharded: the weight is gathered whole on this rare path; each rank writes its rows of the change
        w = layer.matrix(full(layer.param.detach())).float().unsqueeze(0)
        # the cap is exact only with the true top pair: a block of up to 4 vectors, led by the tracked
        # one, converges on it even where the next singular value is close (a rare path)
        m, n = g.sizes[b]
        block = torch.randn(1, n, min(4, m, n), generator=layer_generator(self.seed, layer.name)).to(w)
        block[..., 0] = g.vector("v", b)
        u, v, sigma, _, _ = subspace_iteration(w, torch.linalg.qr(block).Q, CAP_ITERS)
        # the reference is the last healthy check's sigma_max: where the layer was before the anomaly
        history = policy.sigmas.values()
        cap = self.cap_factor * float(history[-1]) if len(history) else float(sigma[0])
        delta = spectral_cap_delta(u, v, sigma, cap)[0]
        layer.matrix(local(layer.param.data)).add_(g.own_rows(delta).to(layer.param.dtype))
        g.vector("u", b).copy_(g.own_rows(u[0]))
        g.reseed(b, v[0])
        g.sigma[b] = torch.minimum(sigma[0], torch.tensor(cap, device=sigma.device))
        g.drop_probes(b)
        return float(g.sigma[b]), (u[0][:, None], (g.sigma[b] - sigma[0]).reshape(1), v[0][:, None])

    @torch.no_grad()
    def pss(self, layer: TrackedLayer, rank: float, step: int) -> tuple[float, int, tuple[Tensor, Tensor, Tensor]]:
        g = layer.group
        assert g is not None
        b = layer.slot
        k = max(1, min(self.pss_max_k, int(round(rank)) if math.isfinite(rank) else 1))
        gen = layer_generator(self.seed + step, layer.name)
        # sharded: gathered whole on this rare path (the same seeded projections on every rank)
        edit, new = pss_factors(layer.matrix(full(layer.param.detach())), k, self.pss_fn, generator=gen)
        u, c, v = edit
        layer.matrix(local(layer.param.data)).add_(g.own_rows((u * c) @ v.T).to(layer.param.dtype))
        g.vector("u", b).copy_(g.own_rows(u[:, 0]))
        g.reseed(b, v[:, 0])
        g.sigma[b] = new[0]
        g.drop_probes(b)
        return float(new[0]), len(c), edit

    def set_update_clip(self, layer: TrackedLayer, on: bool) -> None:
        """Clip the layer's updates (SPECTRA) from the next step on, or stop."""
        (self.clip_on.add if on else self.clip_on.discard)(layer.name)
        clipper = self.clippers.get(layer.name)
        if not on and clipper is not None:
            clipper.remove()
            del self.clippers[layer.name]
        if on and clipper is None:
            for opt in self.optimizers:
                if any(p is layer.param for group in opt.param_groups for p in group["params"]):
                    self.clippers[layer.name] = SpectralUpdateClip(opt, self.update_clip, params=[layer.param])
                    break

    def detach_clips(self) -> None:
        """The optimizers go back as they were; :attr:`clip_on` keeps which layers were clipped."""
        for clipper in self.clippers.values():
            clipper.remove()
        self.clippers = {}


class IntervalLoss:
    """This rank's mean loss per optimizer step since the last check, kept on the device.

    Each step's loss is the shared :class:`~lightning_stability.core.step_loss.StepLoss`'s (every
    micro-batch once, each divided by ``accumulate_grad_batches``: their sum is the step's loss), read
    in ``on_before_optimizer_step`` while the AMP scale is still the one it was scaled with, and added
    to the interval when the step ends (so that a rollback restoring this state at the step's end
    leaves the sum as it was)."""

    def __init__(self) -> None:
        self.step_value: Tensor | None = None  # this optimizer step's loss, unscaled
        self.sum: Tensor | None = None
        self.count = 0  # optimizer steps in the sum

    def read(self, trainer: pl.Trainer) -> None:
        self.step_value = _unscaled(trainer, step_loss(trainer).value(trainer.global_step))

    def end_step(self) -> None:
        value, self.step_value = self.step_value, None
        if value is not None:
            self.sum = value if self.sum is None else self.sum.to(value.device) + value
            self.count += 1

    def take(self, device: torch.device) -> Tensor:
        """The interval's mean (NaN without a step), 0-d; the next interval starts."""
        total, count = self.sum, self.count
        self.sum, self.count = None, 0
        if total is None or count == 0:
            return torch.tensor(math.nan, device=device)
        return (total / count).reshape(())

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": float(self.sum) if self.sum is not None else 0.0, "loss_count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("loss_count", 0))
        self.sum = torch.tensor(float(state.get("loss_sum", 0.0))) if self.count else None


def _unscaled(trainer: pl.Trainer, loss: Tensor | None) -> Tensor | None:
    """``loss`` (as ``on_before_backward`` saw it) without the AMP loss scale, with no host read: the
    scaler's scale tensor where it has one (``loss_scale`` reads the scale to the host)."""
    scaler = grad_scaler(trainer)
    if loss is None or scaler is None:
        return loss
    scale = getattr(scaler, "_scale", None)
    return loss / scale.to(loss) if isinstance(scale, Tensor) else loss / loss_scale(trainer)


def intervention_failed(before: float | None, after: float, tolerance: float) -> dict[str, float] | None:
    """The metrics of an ``intervention_failed`` detection, or ``None``: the mean loss ``after`` an
    intervention is non-finite or worse than ``before`` it by more than ``tolerance`` (relative).
    ``before`` is ``None`` when no intervention is being judged. Under DDP both must be the same on
    every rank (the rank mean), or one rank would ask for a rollback alone."""
    if before is None:
        return None
    worse = not math.isfinite(after) or (before > 0 and after > before * (1.0 + tolerance))
    return {"loss_before": before, "loss_after": after} if worse else None


def _sigma(layer: TrackedLayer) -> torch.Tensor:
    assert layer.group is not None
    return layer.group.sigma[layer.slot]
