"""``StabilityPanels``: the stability metrics laid out as TensorBoard panels, and the event timeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_stability.events import StabilityEvent, get_event_log

# Which monitor's metrics each chart shows: (category, chart title, tag regexes), by the source that
# logs them. The names are those of ARCHITECTURE's metric table; a category appears only when a
# callback that logs it is attached.
_CHARTS: dict[str, list[tuple[str, str, list[str]]]] = {
    "GradientSpikeGuard": [
        ("Spikes", "gradient norm, baseline and spike threshold",
         [r"stability/grad/norm(_baseline|_threshold)?(/opt\d+)?$"]),
        ("Spikes", "gradient-norm z-score", [r"stability/grad/norm_zscore.*"]),
        ("Spikes", "spike fraction (per-element)", [r"stability/grad/spike_fraction.*"]),
        ("Spikes", "loss z-score", [r"stability/loss/zscore.*"]),
    ],
    "SpectralMonitor": [
        ("Spectra", "sigma_max, all layers", [r"stability/spectral/.*/sigma_max$"]),
        ("Spectra", "stable rank, all layers", [r"stability/spectral/.*/stable_rank$"]),
        ("Spectra", "update ratio, all layers", [r"stability/spectral/.*/update_ratio$"]),
        ("Spectra", "power-law alpha, all layers", [r"stability/spectral/.*/alpha$"]),
    ],
    "SoftmaxSaturationMonitor": [
        ("Softmax", "output log Z", [r"stability/softmax/out_logz_.*"]),
        ("Softmax", "softmax-collapse headroom (nats) and fraction",
         [r"stability/softmax/sc_headroom_p01$", r"stability/softmax/sc_frac$", r"stability/softmax/zero_loss_frac$"]),
        ("Softmax", "attention entropy (min), per layer", [r"stability/attention/.*/entropy_min$"]),
        ("Softmax", "attention max logit, per layer", [r"stability/attention/.*/max_logit$"]),
    ],
    "FP8Precision": [
        ("Precision", "FP8 overflow fraction, per layer", [r"stability/fp8/[^/]+/overflow_frac$"]),
        ("Precision", "FP8 underflow fraction, per layer", [r"stability/fp8/[^/]+/underflow_frac$"]),
        ("Precision", "FP8 headroom (bits), per layer and role", [r"stability/fp8/.*/headroom$"]),
        ("Precision", "layers fallen back to bf16", [r"stability/fp8/fallback_layers$"]),
    ],
    "InMemoryRollback": [
        ("Rollback", "rollbacks and lost steps", [r"stability/rollback/count$", r"stability/rollback/lost_steps$"]),
        ("Rollback", "Training Overhead Ratio", [r"stability/rollback/tor$"]),
    ],
}
_INTERVENTIONS = ("Interventions", "events by kind (cumulative)", [r"stability/events/.*"])
TIMELINE_TAG = "stability/timeline"
# The detections GradientSpikeGuard reports (of any guard, named or not): the progress bar's spikes.
SPIKE_KINDS = frozenset({"nonfinite", "grad_spike", "loss_spike", "element_spike"})


def stability_layout(sources: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout for the attached stability callbacks (``sources``: their class names),
    as ``SummaryWriter.add_custom_scalars`` takes it: ``{category: {chart: ["Multiline", [regex, ...]]}}``.
    Categories for callbacks that are not attached are left out; Interventions is always there."""
    layout: dict[str, dict[str, list[Any]]] = {}
    for source in sources:
        for category, title, tags in _CHARTS.get(source, ()):
            layout.setdefault(category, {})[title] = ["Multiline", list(tags)]
    category, title, tags = _INTERVENTIONS
    layout[category] = {title: ["Multiline", list(tags)]}
    return layout


def timeline_markdown(events: Sequence[StabilityEvent]) -> str:
    """Events as a Markdown table for TensorBoard's text panel: step, source, kind, severity, action,
    target and the numbers behind the decision."""
    rows = ["| step | source | kind | severity | action | target | numbers |", "|---:|---|---|---|---|---|---|"]
    for e in events:
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in e.metrics.items())
        rows.append(f"| {e.step} | {e.source} | {e.kind} | {e.severity} | {e.action or '-'} | {e.target or '-'} | {numbers} |")
    return "\n".join(rows)


class StabilityPanels(Callback):
    r"""Lays the stability metrics out as TensorBoard panels and writes the event timeline.

    At fit start it writes a custom-scalars layout (TensorBoard's *Custom Scalars* tab) to the writer of
    the first ``TensorBoardLogger`` in ``trainer.loggers``, with one category per attached monitor:

    ============== ====================================================================================
    Spikes         gradient norm, its z-score, the per-element spike fraction, the loss z-score
                   (``GradientSpikeGuard``)
    Spectra        sigma_max, stable rank, update ratio and power-law alpha of every layer, each on one
                   chart (``SpectralMonitor``)
    Softmax        output log Z, collapse headroom and fractions, attention entropy and max logit per
                   layer (``SoftmaxSaturationMonitor``)
    Precision      FP8 overflow and underflow fractions per layer, headroom, layers in fallback
                   (``FP8Precision``)
    Rollback       rollbacks, lost steps, the Training Overhead Ratio (``InMemoryRollback``)
    Interventions  every ``stability/events/<kind>`` count, over time
    ============== ====================================================================================

    Every new event is written to TensorBoard's *Text* tab under ``stability/timeline`` at the step
    it happened (a table: step, source, kind, severity, action, target, numbers), at most once per
    batch. With ``prog_bar`` the progress bar shows ``spikes`` (the warning and critical detections of
    every ``GradientSpikeGuard``, named or not) and ``interventions`` (the events that acted) so far.

    Without a ``TensorBoardLogger`` it warns once and only the progress bar counts remain; it never
    stops a fit.

    Example::

        trainer = pl.Trainer(logger=TensorBoardLogger("runs"),
                             callbacks=[GradientSpikeGuard(), SoftmaxSaturationMonitor(), StabilityPanels()])
    """

    def __init__(self, prog_bar: bool = True) -> None:
        self.prog_bar = bool(prog_bar)
        self._writer: Any = None
        self._pending: list[StabilityEvent] = []
        self._counts = {"spikes": 0, "interventions": 0}
        self._unsubscribe: Callable[[], None] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = []
        log = get_event_log(trainer)
        self._counts = {"spikes": 0, "interventions": 0}
        for event in log:  # what a resumed run had already seen
            self._count(event)
        self._unsubscribe = log.subscribe(self._on_event)
        self._writer = None
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            rank_zero_warn(
                "StabilityPanels: no TensorBoardLogger among the trainer's loggers, so no panels are written; "
                "pass logger=TensorBoardLogger(save_dir) to the Trainer."
            )
            return
        if not trainer.is_global_zero:
            return
        self._writer = logger.experiment
        plugins = [trainer.precision_plugin, *trainer.callbacks]  # type: ignore[attr-defined]
        sources = [type(p).__name__ for p in plugins]
        self._writer.add_custom_scalars(stability_layout(sources))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.prog_bar:
            pl_module.log_dict(
                {k: float(v) for k, v in self._counts.items()},
                prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1,
            )
        self._write_timeline()

    def _on_event(self, event: StabilityEvent) -> None:
        self._pending.append(event)
        self._count(event)

    def _count(self, event: StabilityEvent) -> None:
        if event.kind in SPIKE_KINDS and event.severity != "info":
            self._counts["spikes"] += 1
        if event.action and event.action not in ("advise", "warn"):  # advice is not an intervention
            self._counts["interventions"] += 1

    def _write_timeline(self) -> None:
        if not self._pending:
            return
        events, self._pending[:] = list(self._pending), []
        if self._writer is not None:
            self._writer.add_text(TIMELINE_TAG, timeline_markdown(events), global_step=events[-1].step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_timeline()
        if self._writer is not None:
            self._writer.flush()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
