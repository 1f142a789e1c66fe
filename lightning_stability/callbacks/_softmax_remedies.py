"""The softmax monitor's remedies by name, in the order they are documented: a new remedy is a
:class:`SoftmaxRemedy` in a file of its own and one line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_stability.callbacks._softmax_attn_softcap import AttentionSoftcap
from lightning_stability.callbacks._softmax_perp_grad import PerpendicularGradient
from lightning_stability.callbacks._softmax_qk_clip import QKClip
from lightning_stability.callbacks._softmax_remedy import SoftmaxRemedy
from lightning_stability.callbacks._softmax_softcap import OutputSoftcap
from lightning_stability.callbacks._softmax_z_loss import ZLoss

REMEDIES: dict[str, type[SoftmaxRemedy]] = {
    r.name: r for r in (ZLoss, OutputSoftcap, PerpendicularGradient, QKClip, AttentionSoftcap)
}
# the rungs a ladder may hold: the remedies, and ``advise`` (an event naming the structural fix)
RUNGS = (*REMEDIES, "advise")


class RemedySet:
    """The monitor's remedies, one of each, switched by name; saved as ``{name: since}``."""

    def __init__(self, monitor: Any) -> None:
        self.by_name: dict[str, SoftmaxRemedy] = {n: cls(monitor) for n, cls in REMEDIES.items()}

    def __getitem__(self, name: str) -> SoftmaxRemedy:
        return self.by_name[name]

    def on(self) -> list[SoftmaxRemedy]:
        return [r for r in self.by_name.values() if r.on]

    def all(self) -> list[SoftmaxRemedy]:
        return list(self.by_name.values())

    def names_on(self) -> list[str]:
        return sorted(n for n, r in self.by_name.items() if r.on)

    @staticmethod
    def runnable(owner: str, ladders: dict[str, tuple[str, ...]], strategy: str | None) -> dict[str, tuple[str, ...]]:
        """The ladders without the remedies that cannot run under ``strategy``, each left out with a warning."""
        for name, remedy in REMEDIES.items():
            reason = remedy.unavailable(strategy)
            if reason and any(name in ladder for ladder in ladders.values()):
                ladders = {d: tuple(r for r in ladder if r != name) for d, ladder in ladders.items()}
                rank_zero_warn(f"{owner}: the {name} remedy is off under {strategy} ({reason}); the measurements "
                               "and the other remedies stay on.")
        return ladders

    def state_dict(self) -> dict[str, Any]:
        states = {n: r.state_dict() for n, r in self.by_name.items() if r.on}
        return {n: (s["since"] if set(s) == {"since"} else s) for n, s in states.items()}

    def load_state_dict(self, on: Mapping[str, Any]) -> None:
        for name, remedy in self.by_name.items():
            value = on.get(name)
            remedy.load_state_dict(value if isinstance(value, Mapping) else {"since": value})
