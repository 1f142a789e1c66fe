"""Escalation, written once: which intervention a detection gets, how long a state lasts, how much
may be spent. Every count here is in optimizer steps, whichever callback uses it.

- :class:`EscalationLadder`: the rung a detection gets, climbing with repetition (the spectral
  monitor);
- :class:`EvidenceLadder`: the rung a detection gets, climbing only when the rung below failed, and
  the destructive rungs only for a run that is lost (the guard);
- :class:`Hysteresis`: a per-key condition that sets after ``patience`` bad observations in a row
  and clears ``cooldown`` steps after the last bad one (the softmax monitor's detections, FP8's
  per-layer fallback);
- :class:`Budget`: at most ``limit`` uses within ``window`` steps (the rollback's budget).

Pure Python, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

ACTIONS = ("clip", "skip", "reset_moments", "lr_backoff", "rollback", "halt")
DETECTIONS = ("nonfinite", "grad_spike", "loss_spike", "element_spike", "lr_spike")
# Clipping repairs a gradient with a few huge elements or a too-large norm; it cannot repair a
# non-finite gradient, and a loss spike with a normal gradient norm leaves nothing to clip.
_CLIP_REPAIRS = frozenset({"grad_spike", "element_spike"})


def validate_ladder(
    ladder: Sequence[str], owner: str = "ladder", actions: Sequence[str] = ACTIONS
) -> tuple[str, ...]:
    if isinstance(ladder, str) or not isinstance(ladder, Sequence):
        raise TypeError(f"{owner}={ladder!r}: expected a sequence of actions from {list(actions)}")
    rungs = tuple(ladder)
    if not rungs:
        raise ValueError(f"{owner}={ladder!r}: expected at least one action from {list(actions)}")
    for action in rungs:
        if action not in actions:
            raise ValueError(f"{owner}: unknown action {action!r}; expected one of {list(actions)}")
    if len(set(rungs)) != len(rungs):
        raise ValueError(f"{owner}={ladder!r}: each action may appear once")
    return rungs


def cosine_ramp(k: int, length: int, start: float = 0.01) -> float:
    """Update warm-up factor ``k`` steps after a moment reset: ``start`` at 0, 1 from ``length`` on."""
    if k >= length:
        return 1.0
    if k <= 0:
        return start
    return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * k / length))


class EscalationLadder:
    """Picks a rung for each detection and climbs with repetition.

    A detection starts at the first rung that can repair it (by default the guard's rules: ``clip``
    repairs only gradient and element spikes; ``repairs`` maps an action to the detections it can
    repair, and an action it does not list repairs any). Every ``patience`` detections without
    ``cooldown`` healthy steps in between climb one rung; ``cooldown`` steps without a detection bring
    it back to the bottom. Pass ``step`` to :meth:`decide` and :meth:`healthy` and the cooldown is
    counted in steps, however often the caller looks (a monitor that checks every 10 steps); without
    it, in calls to :meth:`healthy`.
    ``rollback`` is used only where a responder is available; otherwise the next rung is taken.

    A rung the caller found not to work (:meth:`fail`: its intervention was reverted) is not used
    again in the same incident: the ladder takes the next one, and the incident's end forgets it.
    """

    def __init__(
        self,
        rungs: Sequence[str] = ACTIONS,
        patience: int = 3,
        cooldown: int = 50,
        actions: Sequence[str] = ACTIONS,
        detections: Collection[str] = DETECTIONS,
        repairs: Mapping[str, Collection[str]] | None = None,
        fallback: str = "skip",
    ) -> None:
        self.rungs = validate_ladder(rungs, actions=actions)
        self.detections = frozenset(detections)
        self.repairs = {"clip": _CLIP_REPAIRS} if repairs is None else dict(repairs)
        self.fallback = fallback  # the action when every rung is unavailable
        self.patience = patience
        self.cooldown = cooldown
        self.strikes = 0
        self.calm = 0
        self.last_strike = -1  # the step of the last detection, where steps are given
        self.failed: set[str] = set()  # rungs reverted in this incident: not used again until it ends

    def start_rung(self, detection: str) -> int:
        if detection not in self.detections:
            raise ValueError(
                f"EscalationLadder: unknown detection {detection!r}; expected one of {sorted(self.detections)}"
            )
        for i, action in enumerate(self.rungs):
            if action not in self.repairs or detection in self.repairs[action]:
                return i
        return len(self.rungs) - 1

    def fail(self, action: str) -> None:
        """``action`` did not work in this incident (it was reverted): the next detections of the
        incident take the rungs above it."""
        self.failed.add(action)

    def decide(self, detection: str, unavailable: Collection[str] = (), step: int | None = None) -> str:
        """Record a detection and return the action for it."""
        unavailable = set(unavailable) | self.failed
        rung = min(self.start_rung(detection) + self.strikes // self.patience, len(self.rungs) - 1)
        self.strikes += 1
        self.calm = 0
        if step is not None:
            self.last_strike = step
        while rung < len(self.rungs) - 1 and self.rungs[rung] in unavailable:
            rung += 1
        action = self.rungs[rung]
        if action in unavailable:
            # nothing above it: fall back to the strongest rung that is available
            available = [a for a in self.rungs if a not in unavailable]
            action = available[-1] if available else self.fallback
        return action

    def healthy(self, step: int | None = None) -> bool:
        """Record a healthy step; ``True`` when this step ends an incident (the ladder resets)."""
        if self.strikes == 0:
            return False
        self.calm = step - self.last_strike if step is not None and self.last_strike >= 0 else self.calm + 1
        if self.calm >= self.cooldown:
            self.strikes = 0
            self.calm = 0
            self.failed = set()
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"strikes": self.strikes, "calm": self.calm, "last_strike": self.last_strike,
                "failed": sorted(self.failed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strikes = int(state.get("strikes", 0))
        self.calm = int(state.get("calm", 0))
        self.last_strike = int(state.get("last_strike", -1))
        self.failed = {str(a) for a in state.get("failed", ())}


class EvidenceLadder(EscalationLadder):
    """Climbs on evidence that the rung below failed, not on the count of detections.

    A rung is applied to a detection; a detection that comes within ``recovery`` steps of the last
    one is the *same incident* (unless it is another kind of fault and the loss came back to its band:
    a NaN repaired by a skip does not make the next gradient spike a failure), and the rung applied
    to it failed when the fault recurred at the same or a larger ``size``, or when the loss has
    stayed out of its band since it was applied. A loss spike the step after one that was skipped is the
    batches' fault (the weights did not change), not the skip's, for up to ``recovery`` steps. A
    recurrence that ``clip`` absorbed (the loss stayed in its band) is not a failure: natural spikes
    that clipping repairs stay at ``clip`` however often they come. ``patience`` failures climb one
    rung; a detection after ``recovery`` quiet steps starts again at the bottom rung that can repair
    it (the previous one was repaired).

    The destructive rungs (``rollback``, ``halt``) are for a run that is lost: a non-finite loss or
    gradient that came back after the rungs below, or a loss that has not been back in its band since
    the incident began, through every rung below.
    Short of that the ladder stays at the highest rung below them and says so once per incident
    (:attr:`persistent`: the caller warns). ``cooldown`` healthy steps end an incident as before.
    """

    DESTRUCTIVE = frozenset({"rollback", "halt"})

    def __init__(self, rungs: Sequence[str] = ACTIONS, patience: int = 3, cooldown: int = 50,
                 recovery: int = 10, **kwargs: Any) -> None:
        super().__init__(rungs, patience, cooldown, **kwargs)
        if recovery < 1:
            raise ValueError(f"EvidenceLadder(recovery={recovery!r}): expected an int >= 1")
        self.recovery = recovery
        self.rung = -1  # the rung applied last in this incident (-1: none)
        self.failures = 0  # failures of that rung
        self.last_size = 0.0
        self.out_since = -1  # first step of the loss's current stay out of its band (-1: in band)
        self.began = -1  # the step of the incident's first detection
        self.kind = ""  # the detection the rung was applied to last
        self.persistent = False  # the incident wanted a destructive rung and the run is not lost

    def observe(self, step: int, in_band: bool) -> None:
        """Record where this step's loss is against its band (every step, detections included)."""
        if in_band:
            self.out_since = -1
        elif self.out_since < 0:
            self.out_since = step

    def decide(self, detection: str, unavailable: Collection[str] = (), step: int | None = None,
               size: float = math.inf, in_band: bool = True) -> str:
        """Record a detection of ``size`` at ``step`` (its loss ``in_band`` or not) and return its action."""
        assert step is not None, "EvidenceLadder.decide counts in steps: pass step"
        unavailable = set(unavailable) | self.failed
        start = self.start_rung(detection)
        stayed_out = self.out_since >= 0 and self.out_since <= self.last_strike
        same_incident = (self.rung >= 0 and self.last_strike >= 0 and step - self.last_strike <= self.recovery
                         and (detection == self.kind or stayed_out))
        if not same_incident:
            self.rung, self.failures, self.persistent, self.began = start, 0, False, step
        else:
            absorbed = self.rungs[self.rung] == "clip" and in_band
            # a loss spike the step after a skipped one: the weights are those that gave a healthy loss
            # before, so the batches are at fault, not the skip (a burst of bad data is skipped through);
            # for ``recovery`` steps, after which a loss still out of its band counts as before
            batch_fault = (detection == self.kind == "loss_spike" and self.rungs[self.rung] == "skip"
                           and step - self.last_strike == 1 and step - self.began < self.recovery)
            if ((size >= self.last_size and not absorbed) or stayed_out) and not batch_fault:
                self.failures += 1
            if self.failures >= self.patience and self.rung < len(self.rungs) - 1:
                self.rung, self.failures = self.rung + 1, 0
            self.rung = max(self.rung, start)
        self.strikes += 1
        self.calm = 0
        self.last_strike = step
        self.last_size = size
        self.kind = detection
        rung = self.rung
        while rung < len(self.rungs) - 1 and self.rungs[rung] in unavailable:
            rung += 1
        if self.rungs[rung] in self.DESTRUCTIVE and not self._lost(detection, same_incident):
            below = [i for i in range(start, rung) if self.rungs[i] not in self.DESTRUCTIVE | set(unavailable)]
            if below:  # stay at the strongest rung that is not destructive
                self.persistent = True
                self.rung = rung = below[-1]
        action = self.rungs[rung]
        if action in unavailable:
            available = [a for a in self.rungs if a not in unavailable]
            action = available[-1] if available else self.fallback
        return action

    def _lost(self, detection: str, same_incident: bool) -> bool:
        if detection == "nonfinite":
            return same_incident  # a NaN that came back after the rungs below
        return self.out_since >= 0 and self.out_since <= self.began

    def healthy(self, step: int | None = None) -> bool:
        ended = super().healthy(step)
        if ended:
            self.rung, self.failures, self.persistent = -1, 0, False
        return ended

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rung": self.rung, "failures": self.failures, "last_size": self.last_size,
                "out_since": self.out_since, "began": self.began, "persistent": self.persistent,
                "kind": self.kind}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rung = int(state.get("rung", -1))
        self.failures = int(state.get("failures", 0))
        self.last_size = float(state.get("last_size", 0.0))
        self.out_since = int(state.get("out_since", -1))
        self.began = int(state.get("began", -1))
        self.persistent = bool(state.get("persistent", False))
        self.kind = str(state.get("kind", ""))


class Hysteresis:
    """A condition per key (a layer, a detection) that sets after ``patience`` bad observations in a
    row and clears once ``cooldown`` steps have passed since the last bad one.

    :meth:`observe` answers ``"set"`` on the observation that sets it, ``"clear"`` on the healthy
    observation that clears it, else ``None``. A key nobody observes while it is set (a layer in
    fallback is not measured) clears through :meth:`expire`.
    """

    def __init__(self, patience: int = 1, cooldown: int = 1) -> None:
        if patience < 1 or cooldown < 1:
            raise ValueError(f"Hysteresis(patience={patience!r}, cooldown={cooldown!r}): expected ints >= 1")
        self.patience = patience
        self.cooldown = cooldown
        self.bad: dict[str, int] = {}  # key -> bad observations in a row
        self.since: dict[str, int] = {}  # set keys -> the step of their last bad observation

    def is_set(self, key: str) -> bool:
        return key in self.since

    @property
    def any_set(self) -> bool:
        return bool(self.since)

    def observe(self, key: str, bad: bool, step: int) -> str | None:
        if bad:
            self.bad[key] = self.bad.get(key, 0) + 1
            was = key in self.since
            if was or self.bad[key] >= self.patience:
                self.since[key] = step
            return "set" if not was and key in self.since else None
        self.bad[key] = 0
        if key in self.since and step - self.since[key] >= self.cooldown:
            del self.since[key]
            return "clear"
        return None

    def trip(self, key: str, step: int) -> bool:
        """Set ``key`` now, whatever its count (a non-finite value needs no patience); ``True`` when it
        was not set before."""
        was = key in self.since
        self.since[key] = step
        return not was

    def expire(self, step: int) -> list[str]:
        """Clear (and return) the set keys whose cooldown has run out, observed or not."""
        done = [k for k, s in self.since.items() if step - s >= self.cooldown]
        for key in done:
            del self.since[key]
            self.bad[key] = 0
        return done

    def state_dict(self) -> dict[str, Any]:
        return {"bad": dict(self.bad), "since": dict(self.since)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bad = {str(k): int(v) for k, v in dict(state.get("bad", {})).items()}
        self.since = {str(k): int(v) for k, v in dict(state.get("since", {})).items()}


class Budget:
    """At most ``limit`` uses within any ``window`` steps: :meth:`spend` records a use at ``step`` and
    answers whether it is still within the budget (the use that exceeds it is recorded too)."""

    def __init__(self, limit: int, window: int) -> None:
        if limit < 1 or window < 1:
            raise ValueError(f"Budget(limit={limit!r}, window={window!r}): expected ints >= 1")
        self.limit = limit
        self.window = window
        self.uses: list[int] = []

    def used(self, step: int) -> int:
        """Uses in the window that ends at ``step``."""
        return sum(1 for s in self.uses if step - s < self.window)

    def spend(self, step: int) -> bool:
        self.uses = [s for s in self.uses if step - s < self.window] + [step]
        return len(self.uses) <= self.limit

    def state_dict(self) -> dict[str, Any]:
        return {"uses": list(self.uses)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.uses = [int(s) for s in state.get("uses", [])]
