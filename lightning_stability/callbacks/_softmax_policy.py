"""The softmax monitor's decisions, no Trainer: which detections a sample's agreed statistics make,
when each is open (``core.escalation.Hysteresis``) and which rung of its ladder it gets."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from lightning_stability.core.escalation import EscalationLadder, Hysteresis

if TYPE_CHECKING:
    from lightning_stability.callbacks.softmax_monitor import SoftmaxSaturationMonitor

# What each detection gets by default, in order; ``advise`` is an event naming the structural fix. A
# remedy is in a default ladder only where a benchmark in docs/ shows it helps once the detection has
# fired: QK-clip does (docs/benchmarks.md, attention logit growth). No benchmark shows z-loss or the
# output soft-cap helping, and the perpendicular gradient is shown helping only when on from the first
# step (the grokking runs), not switched on at a detection: those three are opt-in (OPT_IN).
DEFAULT_REMEDIES: dict[str, tuple[str, ...]] = {
    "logit_drift": ("advise",),
    "softmax_collapse": ("advise",),
    "attention_collapse": ("advise",),
    # attn_softcap is a rung to opt into: on examples/attention_logit_growth.py climbing to it after QK-clip
    # ended worse than QK-clip alone (docs/softmax.md)
    "attention_logit_growth": ("qk_clip", "advise"),
}
# The ladders to opt into, named by the advice event of a detection that fires on its default ladder.
OPT_IN: dict[str, tuple[str, ...]] = {
    "logit_drift": ("z_loss", "softcap", "advise"),
    "softmax_collapse": ("perp_grad", "advise"),
}
ADVICE = {
    "logit_drift": "add z-loss to the loss (lightning_stability.z_loss) or compute the loss in float32",
    "softmax_collapse": (
        "switch the loss to lightning_stability.stablemax_cross_entropy, keep the perpendicular gradient, "
        "or compute the loss in float64"
    ),
    "attention_collapse": "add qk-norm (LayerNorm/RMSNorm on q and k) or sigmaReparam to the attention",
    "attention_logit_growth": (
        "add qk-norm, build the attention soft-cap into the model (as Gemma 2 does), or lower the learning rate"
    ),
}


class Incident:
    """An open detection: its rungs (``None`` for an empty ladder), the rung on now and its
    detection's statistic when that rung came on (``then``)."""

    def __init__(self, ladder: EscalationLadder | None, then: float | None, on: str | None = None) -> None:
        self.ladder, self.then, self.on = ladder, then, on

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(sorted(self.ladder.failed)) if self.ladder is not None else ()

    def climbs(self, patience: int) -> bool:
        """The next detection is the one that climbs a rung (the one on now has had its samples)."""
        return self.ladder is not None and self.ladder.strikes % patience == 0

    def decide(self, detection: str) -> str | None:
        return self.ladder.decide(detection) if self.ladder is not None else None

    def state_dict(self) -> dict[str, Any]:
        ladder = self.ladder.state_dict() if self.ladder is not None else {}
        return {"strikes": ladder.get("strikes", 0), "failed": ladder.get("failed", []), "on": self.on,
                "then": self.then}

    @classmethod
    def load(cls, ladder: EscalationLadder | None, entry: Mapping[str, Any]) -> Incident:
        then = entry.get("then")
        incident = cls(ladder, None if then is None else float(then))
        if ladder is None:
            return incident
        if "strikes" in entry:
            ladder.load_state_dict({"strikes": entry["strikes"], "failed": entry.get("failed", ())})
            on = entry.get("on")
            incident.on = None if on is None else str(on)
        else:  # a checkpoint from before the shared ladder: {rung, repeats} (the first detection is repeat 0)
            ladder.strikes = int(entry.get("repeats", 0)) + 1
            incident.on = ladder.rungs[min(int(entry.get("rung", 0)), len(ladder.rungs) - 1)]
        return incident


def statistic(detection: str, metrics: Mapping[str, float]) -> float:
    """The value a detection is judged by, from its event's metrics."""
    if detection == "logit_drift":
        return abs(metrics["logz_mean"])
    if detection == "softmax_collapse":
        return max(metrics["sc_frac"], metrics["zero_loss_frac"])
    return metrics["entropy_min" if detection == "attention_collapse" else "max_logit"]


def went_wrong_way(detection: str, then: float | None, now: float, release: float) -> bool:
    """Did the detection's statistic get worse, while a remedy was on, than when it was switched on,
    beyond the hysteresis band (``release``)? For the entropy floor lower is worse, for the others
    higher. A remedy that holds its statistic (QK-clip holding the logits near ``tau`` while training
    pushes them up) is working; a non-finite statistic is worse. ``then`` is ``None`` for a remedy
    switched on before this judgement existed (an older checkpoint): not judged."""
    if then is None:
        return False
    if not math.isfinite(now):
        return True
    if not math.isfinite(then):
        return False
    if detection == "attention_collapse":
        return now < then * release
    return now > then / release


def check_remedies(
    owner: str, remedies: Mapping[str, Sequence[str]] | None, known: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """The ladders: the defaults, with those passed (each rung one of ``known``) in their place."""
    out = dict(DEFAULT_REMEDIES)
    if remedies is None:
        return out
    if not isinstance(remedies, Mapping):
        raise TypeError(f"{owner}(remedies={remedies!r}): expected a mapping detection -> sequence of remedies")
    for detection, ladder in remedies.items():
        if detection not in DEFAULT_REMEDIES:
            raise ValueError(f"{owner}(remedies=...): unknown detection {detection!r}; expected one of {list(DEFAULT_REMEDIES)}")
        if isinstance(ladder, str):
            raise TypeError(f"{owner}(remedies[{detection!r}]={ladder!r}): expected a sequence of remedies, not a str")
        rungs = tuple(ladder)
        bad = [r for r in rungs if r not in known]
        if bad:
            raise ValueError(f"{owner}(remedies[{detection!r}]): unknown remedy {bad[0]!r}; expected one of {list(known)}")
        out[detection] = rungs
    return out


def opt_in_argument(detection: str) -> str:
    return f"remedies={{{detection!r}: {OPT_IN[detection]!r}}}"


def advice(owner: str, detection: str, step: int, opt_in: bool) -> str:
    """The warning of an ``advise`` rung: the structural fix, and the argument that lets the monitor act."""
    extra = ""
    if opt_in:
        extra = (f"; to let the monitor act ({', '.join(r for r in OPT_IN[detection] if r != 'advise')}; off by "
                 f"default, as no benchmark shows it helping once the detection fires), pass {opt_in_argument(detection)}")
    return f"{owner}: {detection} at step {step}: {ADVICE[detection]}{extra}."


class Decision(NamedTuple):
    """What a sample decided: ``detected`` (apply ``rung``), ``recovered`` (the remedies in ``off`` no
    other open detection needs), ``reverted`` (the remedy ``rung`` did not work: those of it in ``off``
    are switched off), or ``headroom`` (the collapse headroom is low)."""

    kind: str
    detection: str
    rung: str | None
    metrics: dict[str, float]
    target: str | None
    off: tuple[str, ...] = ()


class SoftmaxPolicy:
    """The detections and their ladders. A detection opens at its threshold and is held above
    ``release`` times it (below it divided by ``release``, for the entropy floor): ``Hysteresis`` with
    a patience of one observation, cleared ``cooldown`` steps after the last one above the release
    level (the monitor samples every step while one is open). Each open detection's rungs are the
    shared ``core.escalation.EscalationLadder``'s: every ``patience`` repeated detections climb one,
    the remedy on now judged first (:func:`went_wrong_way`): one under which the detection's statistic
    got worse than when it was switched on is switched off and failed on the ladder (not used again in
    the incident). Thresholds are read from the monitor at each decision."""

    def __init__(self, monitor: SoftmaxSaturationMonitor) -> None:
        self.monitor = monitor
        self.open = Hysteresis(patience=1, cooldown=monitor.cooldown)
        self.ladders: dict[str, Incident] = {}  # the open detections
        self.headroom_warned = False
        self._healthy: dict[str, int] = {}  # from an older checkpoint: healthy samples, not a step

    @property
    def watching(self) -> bool:
        """A detection is open or the headroom is low: sample every step."""
        return bool(self.ladders) or self.headroom_warned

    def findings(self, stats: Mapping[str, float]) -> dict[str, tuple[bool, bool, dict[str, float], str | None]]:
        """Each detection the statistics allow: (at its threshold, above its release level, metrics, layer)."""
        m = self.monitor
        head = stats.get("sc_headroom_p01", math.inf)
        found: dict[str, tuple[bool, bool, dict[str, float], str | None]] = {}
        logz = abs(stats.get("out_logz_mean", 0.0))
        found["logit_drift"] = (
            logz > m.logz_limit, logz > m.release * m.logz_limit, {"logz_mean": stats.get("out_logz_mean", 0.0)}, None
        )
        frac = max(stats.get("sc_frac", 0.0), stats.get("zero_loss_frac", 0.0))
        found["softmax_collapse"] = (
            frac >= m.collapse_frac and frac > 0, frac >= m.release * m.collapse_frac and frac > 0,
            {"sc_frac": stats.get("sc_frac", 0.0), "zero_loss_frac": stats.get("zero_loss_frac", 0.0),
             "sc_headroom_p01": head}, None,
        )
        ent = {k[: -len("/entropy_min")]: v for k, v in stats.items() if k.endswith("/entropy_min")}
        if ent:
            layer, low = min(ent.items(), key=lambda kv: kv[1])
            found["attention_collapse"] = (
                low < m.entropy_floor, low < m.entropy_floor / m.release, {"entropy_min": low}, layer
            )
        logit = {k[: -len("/max_logit")]: v for k, v in stats.items() if k.endswith("/max_logit") and "/" in k}
        if logit:
            layer, top = max(logit.items(), key=lambda kv: kv[1])
            found["attention_logit_growth"] = (
                top > m.max_logit_limit, top > m.release * m.max_logit_limit, {"max_logit": top}, layer
            )
        return found

    def decide(self, stats: Mapping[str, float], step: int) -> list[Decision]:
        m = self.monitor
        if step < m.warmup:
            return []
        out: list[Decision] = []
        head = stats.get("sc_headroom_p01", math.inf)
        if head < m.headroom_warn and not self.headroom_warned:
            self.headroom_warned = True
            out.append(Decision("headroom", "collapse_headroom_low", None,
                                {"sc_headroom_p01": head, "sc_frac": stats.get("sc_frac", 0.0)}, None))
        elif head >= m.headroom_warn and self.headroom_warned:
            self.headroom_warned = False
        for detection, (fires, holds, metrics, target) in self.findings(stats).items():
            out.extend(self._observe(detection, fires, holds, metrics, target, step))
        return out

    def _observe(self, detection: str, fires: bool, holds: bool, metrics: dict[str, float], target: str | None,
                 step: int) -> list[Decision]:
        ladder = self.monitor.remedies.get(detection, ())
        if detection in self._healthy:  # the last bad sample was that many samples, one a step, ago
            self.open.since[detection] = step - 1 - self._healthy.pop(detection)
        was_open = self.open.is_set(detection)
        change = self.open.observe(detection, holds if was_open else fires, step)
        value = statistic(detection, metrics)
        if change == "set":
            incident = self.ladders[detection] = Incident(self._ladder(ladder), value)
            incident.on = incident.decide(detection)
            return [Decision("detected", detection, incident.on, metrics, target)]
        if change == "clear":
            del self.ladders[detection]
            return [Decision("recovered", detection, None, {"healthy_samples": float(self.open.cooldown)}, target,
                             self._unneeded(ladder))]
        if not (was_open and fires):
            return []
        incident, out = self.ladders[detection], []
        if incident.climbs(self.monitor.patience) and incident.on not in (None, "advise", *incident.failed) \
                and went_wrong_way(detection, incident.then, value, self.monitor.release):
            assert incident.on is not None and incident.ladder is not None and incident.then is not None
            incident.ladder.fail(incident.on)
            out.append(Decision("reverted", detection, incident.on, {**metrics, "then": incident.then, "now": value},
                                target, self._unneeded((incident.on,))))
        action = incident.decide(detection)  # the remedy on now gets ``patience`` samples to work
        if action != incident.on:
            incident.on, incident.then = action, value
            out.append(Decision("detected", detection, action, metrics, target))
        return out

    def _ladder(self, rungs: Sequence[str]) -> EscalationLadder | None:
        if not rungs:
            return None
        unique = tuple(dict.fromkeys(rungs))
        return EscalationLadder(unique, self.monitor.patience, cooldown=1, actions=unique,
                                detections=DEFAULT_REMEDIES, repairs={}, fallback="advise")

    def _unneeded(self, remedies: Sequence[str]) -> tuple[str, ...]:
        """Those of ``remedies`` that no open detection has on (reached on its ladder and not failed)."""
        def needed(r: str) -> bool:
            for d, incident in self.ladders.items():
                ladder = tuple(dict.fromkeys(self.monitor.remedies.get(d, ())))
                reached = ladder[: ladder.index(incident.on) + 1] if incident.on in ladder else ()
                if r in reached and r not in incident.failed:
                    return True
            return False
        return tuple(r for r in remedies if not needed(r))

    def state_dict(self) -> dict[str, Any]:
        active = {d: {**i.state_dict(), "since": self.open.since[d]} for d, i in self.ladders.items()
                  if d not in self._healthy}
        active.update({d: {**self.ladders[d].state_dict(), "healthy": h} for d, h in self._healthy.items()})
        return {"active": active, "headroom_warned": self.headroom_warned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.open = Hysteresis(patience=1, cooldown=self.monitor.cooldown)
        self.ladders, self._healthy = {}, {}
        for detection, entry in dict(state.get("active", {})).items():
            d = str(detection)
            self.ladders[d] = Incident.load(self._ladder(self.monitor.remedies.get(d, ())), entry)
            if "since" in entry:
                self.open.since[d] = int(entry["since"])
            else:  # a checkpoint from before the shared Hysteresis: open, its healthy samples counted
                self.open.since[d] = -1
                self._healthy[d] = int(entry.get("healthy", 0))
        self.headroom_warned = bool(state.get("headroom_warned", False))
