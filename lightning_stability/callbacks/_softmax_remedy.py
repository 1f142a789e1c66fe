"""What every softmax remedy is to the monitor: a piece it switches on and off, that says what it does
at each point of a step while on and keeps its state in a checkpoint. A new remedy is a subclass in a
file of its own plus one line in ``_softmax_remedies.REMEDIES``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_stability.callbacks._softmax_measure import StepGradients
    from lightning_stability.callbacks.softmax_monitor import SoftmaxSaturationMonitor


class Emission(NamedTuple):
    """An event a remedy asks the monitor to emit."""

    kind: str
    severity: str
    metrics: dict[str, float]
    action: str | None
    target: str | None = None


class SoftmaxRemedy:
    """One remedy of :class:`SoftmaxSaturationMonitor`, reading its settings from the monitor.

    ``since`` is the step it was switched on (``None``: off). :meth:`engage` and :meth:`release` put
    what it needs on the model and take it off again (idempotent); the step hooks run while it is on.
    """

    name: ClassVar[str] = ""
    needs_head: ClassVar[bool] = False  # acts through the output head: cannot be on without one

    def __init__(self, monitor: SoftmaxSaturationMonitor) -> None:
        self.monitor = monitor
        self.since: int | None = None

    @classmethod
    def unavailable(cls, strategy: str | None) -> str | None:
        """Why it cannot run under ``strategy`` (a sharding strategy's class name), or ``None``."""
        return None

    @property
    def on(self) -> bool:
        return self.since is not None

    # -- switching ------------------------------------------------------------------------------
    def switch_on(self, step: int) -> dict[str, float]:
        """On from ``step`` (kept if it is on already); the metrics the event that turns it on carries."""
        if self.since is None:
            self.since = step
        self.engage()
        return self.event_metrics()

    def switch_off(self) -> None:
        self.since = None
        self.release()

    def setup_fit(self) -> None:
        """A fit starts and the model's modules are found."""
        if self.on:
            self.engage()

    def engage(self) -> None:
        """Put what it needs on the model (it is on)."""

    def release(self) -> None:
        """Take everything it put on the model off again."""

    def event_metrics(self) -> dict[str, float]:
        return {}

    # -- each step, while on ---------------------------------------------------------------------
    def batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, training: bool) -> None:
        """A batch of any stage starts (its forward is next)."""

    def batch_end(self) -> None:
        """The batch ended (called whether on or not)."""

    def on_logits(self, logits: Tensor) -> None:
        """The output head's result in a training forward."""

    def before_optimizer_step(self, grads: StepGradients) -> None:
        """The gradients, accumulated and unscaled, before the optimizer uses them."""

    def after_step(self, stats: Mapping[str, float]) -> list[Emission]:
        """A sampled step was decided, after its optimizer step, with the agreed statistics."""
        return []

    def sample_metrics(self) -> dict[str, float]:
        """Logged with every sample, on or off."""
        return {}

    # -- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"since": self.since}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        since = state.get("since")
        self.since = None if since is None else int(since)
        if self.on:
            self.engage()
        else:
            self.release()
