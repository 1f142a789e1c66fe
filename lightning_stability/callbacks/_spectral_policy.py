"""What the spectral monitor decides at a check: each layer's detection against its own robust
history (the rules are tabled in :class:`~lightning_stability.SpectralMonitor`'s docstring), and the
rung of its escalation ladder. No Trainer: it takes the check's statistics on the host, agreed
between ranks by :func:`agreed_inputs`, and answers a :class:`Verdict` per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_stability.core.agreement import Combine, Gather, agree, gather_by_all_reduce
from lightning_stability.core.escalation import EscalationLadder
from lightning_stability.ops.robust import RollingWindow

SPECTRAL_ACTIONS = ("warn", "cap", "pss", "clip_updates", "rollback", "halt")
SPECTRAL_DETECTIONS = (
    "sigma_growth", "rank_collapse", "alignment", "embedding_rank_rise", "intervention_failed", "nonfinite_weight"
)
# Observe by default: in docs/benchmarks.md ("Does it stop a blow-up?") the weight-editing rungs, cap
# and PSS, rescued 0 of 6 learning-rate blow-ups, so nothing edits weights unless the user opts in.
DEFAULT_LADDER = ("warn",)
# Detections that call for a warning only, whatever the ladder (a flattening embedding spectrum under
# low precision is a symptom to look at, not something smoothing repairs).
WARN_ONLY = frozenset({"embedding_rank_rise"})
MIN_HISTORY = 3  # checks in a layer's history before its detections are armed
RECOVERED = "spectral_recovered"


@dataclass(frozen=True)
class Rules:
    """The detection thresholds and the ladder, as :class:`SpectralMonitor` validated them."""

    window: int
    warmup: int
    growth_zscore: float
    min_growth: float
    rank_collapse: float
    alignment_threshold: float
    ladder: tuple[str, ...]
    patience: int
    cooldown: int


class Verdict(NamedTuple):
    """One layer's outcome of a check: ``kind`` is the event's (a detection, or ``spectral_recovered``),
    ``action`` the ladder's rung (``None`` where the ladder is not asked), ``metrics`` the event's."""

    layer: str
    kind: str
    action: str | None
    metrics: dict[str, float]


class LayerPolicy:
    """One layer's robust histories (per-step growth and stable rank at checks, sigma_max at healthy
    checks: the cap's reference) and its escalation ladder."""

    def __init__(self, embedding: bool, rules: Rules) -> None:
        self.embedding = embedding
        self.rules = rules
        self.growth = RollingWindow(rules.window)  # per-step log-growth of sigma_max between checks
        self.rank = RollingWindow(rules.window)  # stable rank at checks
        self.sigmas = RollingWindow(rules.window)  # sigma_max at healthy checks (the cap's reference)
        self.ladder = EscalationLadder(
            rules.ladder, rules.patience, rules.cooldown, actions=SPECTRAL_ACTIONS,
            detections=SPECTRAL_DETECTIONS, repairs={}, fallback="warn",
        )
        self.last_sigma = math.nan
        self.last_check = -1
        self.warned = False  # a warning-only detection is active
        self.detection: str | None = None  # at the last check

    def detect(self, s: dict[str, float], step: int, rise: float | None) -> str | None:
        """The layer's detection at this check (adding ``growth`` and ``growth_zscore`` to ``s``), its
        histories updated."""
        r = self.rules
        sigma, rank = s["sigma_max"], s["stable_rank"]
        if not (math.isfinite(sigma) and math.isfinite(rank)):
            self.detection = "nonfinite_weight"  # armed or not; nothing of it enters the history
            return self.detection
        detection: str | None = None
        growth = math.nan
        if math.isfinite(self.last_sigma) and self.last_sigma > 0 and sigma > 0 and step > self.last_check:
            growth = math.log(sigma / self.last_sigma) / (step - self.last_check)
            s["growth"] = growth
        # (a window shorter than MIN_HISTORY arms once it is full)
        armed = step >= r.warmup and len(self.rank) >= min(MIN_HISTORY, r.window)
        if armed:
            rb = self.rank.baseline()
            gz = self.growth.baseline().zscore(growth, rel_floor=0.0) if math.isfinite(growth) else math.nan
            s["growth_zscore"] = gz
            if math.isfinite(gz) and gz >= r.growth_zscore and growth >= r.min_growth:
                detection = "sigma_growth"
            elif s["alignment_max"] >= r.alignment_threshold and growth > 0:
                detection = "alignment"
            elif math.isfinite(rb.median) and rank < r.rank_collapse * rb.median:
                detection = "rank_collapse"
            elif self.embedding and rise is not None and math.isfinite(rb.median) and rank > rise * rb.median:
                detection = "embedding_rank_rise"
        # Growth and stable rank drift legitimately over training: every finite value enters their
        # (robust, median-based) history, which a few anomalies cannot move. The cap's reference is
        # the last healthy sigma_max, so only healthy checks enter that one.
        self.growth.push(growth)
        self.rank.push(rank)
        if detection is None:
            self.sigmas.push(sigma)
        self.last_sigma, self.last_check = sigma, step
        self.detection = detection
        return detection

    def verdict(self, name: str, s: dict[str, float], step: int, rise: float | None,
                can_rollback: bool) -> Verdict | None:
        """The layer's verdict at this check, or ``None`` when there is nothing to act on or emit."""
        detection = self.detect(s, step, rise)
        if detection is None:
            self.warned = False
            if self.ladder.healthy():  # cooldown counted in healthy checks
                return Verdict(name, RECOVERED, None, {"healthy_checks": float(self.rules.cooldown)})
            return None
        if detection == "nonfinite_weight":
            return Verdict(name, detection, None, {})
        if detection in WARN_ONLY:
            warned, self.warned = self.warned, True
            return None if warned else Verdict(name, detection, None, event_metrics(s))  # once until healthy
        action = self.ladder.decide(detection, () if can_rollback else {"rollback"})
        return Verdict(name, detection, action, event_metrics(s))

    def state_dict(self) -> dict[str, Any]:
        return {
            "growth": self.growth.state_dict(),
            "rank": self.rank.state_dict(),
            "sigmas": self.sigmas.state_dict(),
            "ladder": self.ladder.state_dict(),
            "last_sigma": self.last_sigma,
            "last_check": self.last_check,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.growth.load_state_dict(state.get("growth", {}))
        self.rank.load_state_dict(state.get("rank", {}))
        self.sigmas.load_state_dict(state.get("sigmas", {}))
        self.ladder.load_state_dict(state.get("ladder", {}))
        self.last_sigma = float(state.get("last_sigma", math.nan))
        self.last_check = int(state.get("last_check", -1))


def event_metrics(s: dict[str, float]) -> dict[str, float]:
    keys = ("sigma_max", "stable_rank", "alignment_max", "growth", "growth_zscore", "update_ratio")
    return {key: s[key] for key in keys if key in s}


def agreed_inputs(
    stats: dict[str, dict[str, float]], loss: Tensor, gather: Gather | None, device: torch.device,
    sharded: bool = False,
) -> tuple[dict[str, dict[str, float]], float]:
    """Every input of a check's decisions, the same on every rank, in one collective: each statistic
    the worst rank's (the smallest stable rank, the largest of the others; NaN on any rank stays NaN),
    and the loss the mean of the ranks' (NaN if any rank's is).

    Under DDP each rank measures its own replica of the weights; the replicas agree unless one rank's
    copy was corrupted (a NaN written on one rank only), and then its numbers must decide for every
    rank, or that rank alone would ask for a rollback. Row shards (FSDP2, ``sharded``) measure global
    statistics already: only the loss is agreed, in an all-reduce like every other collective of their
    step. Each rank's loss is its own data's: judged alone, an intervention could fail on one rank and
    pass on another. float64 holds the float32 statistics exactly: agreeing replicas keep their values
    bit for bit."""
    values: dict[str, Tensor | float] = {"loss": loss}
    if sharded and gather is not None:
        gather = gather_by_all_reduce
    elif gather is not None:
        values.update({f"{name}/{key}": v for name, s in stats.items() for key, v in s.items()})
    agreed = agree(values, _worst, gather, device, torch.float64)
    out = {name: {key: agreed.get(f"{name}/{key}", v) for key, v in s.items()} for name, s in stats.items()}
    return out, agreed["loss"]


def _worst(key: str) -> Combine:
    if key == "loss":
        return "mean"
    return "min" if key.rsplit("/", 1)[-1] == "stable_rank" else "max"
