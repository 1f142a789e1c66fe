"""Step-time overhead of the stability callbacks on the tiny GPT of ``lightning_stability.demos``, on CPU.

Every setup trains the same seeded ``TinyGPT`` in one process. The runs are interleaved: each repeat
runs every model size with every callback setup once (the setup order rotated from repeat to repeat),
so a machine that drifts or gets busy slows all setups alike instead of one of them.

A step is the wall time between two consecutive ``on_train_batch_start`` calls of a timer placed first
in ``callbacks``: the forward, the backward, the optimizer step, every callback hook and the fetch of
the next batch, i.e. what a training loop pays per step. Each fit runs ``warmup_steps`` untimed steps
(longer than the guard's ``warmup``, so all its detectors are armed), then ``timed_steps`` timed ones.
A run's figures are its median step time and its mean time per step inside the callbacks' hooks; a
setup's figures are the medians over repeats of its runs' figures.
"""

from __future__ import annotations

import gc
import itertools
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks.spike import SpikeDetection
from typing_extensions import override

from lightning_stability import GradientSpikeGuard, get_event_log
from lightning_stability.callbacks._base import StabilityCallback
from lightning_stability.demos import TinyGPT, make_dataloader

# The project's goal: GradientSpikeGuard with every detector on costs at most 3% of step time.
GOAL_RATIO = 1.03
BLOCK_SIZE = 64
BATCH_SIZE = 16


@dataclass(frozen=True)
class ModelSize:
    name: str
    d_model: int
    n_layer: int
    n_head: int = 4


@dataclass(frozen=True)
class Setup:
    """A callback configuration under test: ``make(root_dir)`` returns fresh callbacks for one fit."""

    name: str
    description: str
    make: Callable[[str], list[Callback]]


def _no_callbacks(root: str) -> list[Callback]:
    return []


def _guard(root: str) -> list[Callback]:
    return [GradientSpikeGuard()]


def _spike_detection(root: str) -> list[Callback]:
    # rtol=1e9: the loss would have to move a billion times its running mean to count as a spike, so a
    # clean run never raises. The check itself still runs every step, and a NaN loss would still raise.
    return [SpikeDetection(rtol=1e9, exclude_batches_path=root)]


MODEL_SIZES = (ModelSize("d64-L2", d_model=64, n_layer=2), ModelSize("d128-L4", d_model=128, n_layer=4))
SETUPS = (
    Setup("no callbacks", "the baseline: no callback besides the timer", _no_callbacks),
    Setup("GradientSpikeGuard", "`GradientSpikeGuard()` at its defaults: all four detectors on", _guard),
    Setup(
        "SpikeDetection",
        "Lightning's `SpikeDetection(rtol=1e9)`: loss spikes only; the huge tolerance keeps a clean run "
        "from raising, the per-step check still runs",
        _spike_detection,
    ),
)
BASELINE = SETUPS[0].name


def _overridden_hooks(callback: Callback) -> list[str]:
    return [
        name
        for name in dir(Callback)
        if name.startswith("on_") and getattr(type(callback), name) is not getattr(Callback, name)
    ]


class StepTimer(Callback):
    """Times each of ``timed_steps`` loop iterations after ``warmup_steps``, and the time in ``watched`` hooks.

    Place it first in ``callbacks``: its ``on_train_batch_start`` then takes its mark before any other
    callback runs, so each interval between two marks holds exactly one step of everything.
    """

    def __init__(self, warmup_steps: int, timed_steps: int, watched: Sequence[Callback]) -> None:
        self.start_at = warmup_steps
        self.stop_at = warmup_steps + timed_steps
        self.hook_seconds = 0.0
        self._marks: list[tuple[float, float]] = []  # (wall clock, hook_seconds) at each timed step's start
        for callback in watched:
            for name in _overridden_hooks(callback):
                # Lightning looks hooks up with getattr, so an instance attribute wraps the method.
                setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.hook_seconds += time.perf_counter() - start

        return timed

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.start_at <= batch_idx <= self.stop_at:
            self._marks.append((time.perf_counter(), self.hook_seconds))

    def step_times(self) -> tuple[list[float], list[float]]:
        """Seconds of each timed step, and seconds of each timed step spent inside the watched hooks."""
        if len(self._marks) != self.stop_at - self.start_at + 1:
            raise RuntimeError(
                f"StepTimer: the fit ended before step {self.stop_at}; the timed window is incomplete"
            )
        pairs = list(itertools.pairwise(self._marks))
        return [t1 - t0 for (t0, _), (t1, _) in pairs], [h1 - h0 for (_, h0), (_, h1) in pairs]


@dataclass(frozen=True)
class Measurement:
    size: str
    setup: str
    repeat: int
    step_ms: float  # the run's median step
    hook_ms: float
    armed: bool | None  # stability callbacks only: were the spike detectors armed before the timed steps?
    interventions: int  # events with an action: a clean run should have none
    step_mean_ms: float = math.nan  # the run's mean step: counts in full work done on some steps only


def run_once(
    size: ModelSize, setup: Setup, warmup_steps: int, timed_steps: int, repeat: int = 0, batch_size: int = BATCH_SIZE
) -> Measurement:
    """One fit of ``size`` with ``setup``'s callbacks, ``batch_size`` sequences of ``BLOCK_SIZE`` a step;
    the timed window is ``timed_steps`` after ``warmup_steps``."""
    total = warmup_steps + timed_steps + 1  # the start of one more step closes the timed window
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning's pytree shim on newer torch
        pl.seed_everything(0, verbose=False)
        loader, dataset = make_dataloader(
            block_size=BLOCK_SIZE, batch_size=batch_size, n_samples=batch_size * total
        )
        model = TinyGPT(
            vocab_size=len(dataset.vocab),
            block_size=BLOCK_SIZE,
            d_model=size.d_model,
            n_layer=size.n_layer,
            n_head=size.n_head,
            max_steps=total,
        )
        watched = setup.make(root)
        timer = StepTimer(warmup_steps, timed_steps, watched)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=total,
            callbacks=[timer, *watched],
            default_root_dir=root,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in watched),
        )
        gc.collect()
        trainer.fit(model, loader)
        # Step time: the run's median step, so a burst of work from another process on a shared machine
        # does not move it. Hook time: the mean, so work a callback does only on some steps (the guard
        # logs on logging steps only) is spread over all of them; a burst barely touches it.
        steps, hooks = timer.step_times()
        step_s, hook_s = statistics.median(steps), statistics.fmean(hooks)
        armed, interventions = None, 0
        if any(isinstance(cb, StabilityCallback) for cb in watched):
            events = list(get_event_log(trainer))
            armed_step = next((e.step for e in events if e.kind == "armed"), None)
            armed = armed_step is not None and armed_step < warmup_steps
            interventions = sum(1 for e in events if e.action is not None)
    return Measurement(
        size.name, setup.name, repeat, step_s * 1e3, hook_s * 1e3, armed, interventions, statistics.fmean(steps) * 1e3
    )


def run_benchmark(
    warmup_steps: int,
    timed_steps: int,
    repeats: int,
    sizes: Sequence[ModelSize] = MODEL_SIZES,
    setups: Sequence[Setup] = SETUPS,
    progress: Callable[[str], None] | None = None,
    batch_size: int = BATCH_SIZE,
) -> list[Measurement]:
    """Every (size, setup) ``repeats`` times, interleaved: ``for repeat: for size: for setup (rotated)``."""
    results = []
    for repeat in range(repeats):
        shift = repeat % len(setups)
        order = list(setups[shift:]) + list(setups[:shift])
        for size in sizes:
            for setup in order:
                m = run_once(size, setup, warmup_steps, timed_steps, repeat, batch_size)
                if progress is not None:
                    progress(
                        f"repeat {repeat + 1}/{repeats}  {size.name:8s} {setup.name:20s} {m.step_ms:8.2f} ms/step"
                    )
                results.append(m)
    return results


@dataclass(frozen=True)
class Summary:
    size: str
    setup: str
    step_ms: float  # median over repeats
    ratio: float  # median step time / the baseline's median step time
    ratio_low: float  # lowest and highest per-repeat ratio against the same repeat's baseline
    ratio_high: float
    hook_ms: float  # median over repeats of the mean time per step inside the callback's hooks
    hook_share: float  # hook_ms / the baseline's median step time: a direct, less noisy overhead estimate
    armed: bool | None  # stability callbacks only: armed before the timed steps in every repeat
    interventions: int


def summarize(results: Sequence[Measurement]) -> list[Summary]:
    by_key: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        by_key.setdefault((m.size, m.setup), []).append(m)
    summaries = []
    for (size, setup), runs in by_key.items():
        base = {m.repeat: m.step_ms for m in by_key[(size, BASELINE)]}
        base_median = statistics.median(base.values())
        paired = [m.step_ms / base[m.repeat] for m in runs]
        step_ms = statistics.median(m.step_ms for m in runs)
        armed = None if all(m.armed is None for m in runs) else all(m.armed for m in runs)
        summaries.append(
            Summary(
                size=size,
                setup=setup,
                step_ms=step_ms,
                ratio=step_ms / base_median,
                ratio_low=min(paired),
                ratio_high=max(paired),
                hook_ms=statistics.median(m.hook_ms for m in runs),
                hook_share=statistics.median(m.hook_ms for m in runs) / base_median,
                armed=armed,
                interventions=sum(m.interventions for m in runs),
            )
        )
    return summaries


def parameter_count(size: ModelSize, vocab_size: int) -> int:
    model = TinyGPT(
        vocab_size, block_size=BLOCK_SIZE, d_model=size.d_model, n_layer=size.n_layer, n_head=size.n_head
    )
    return sum(p.numel() for p in model.parameters())


def format_table(summaries: Sequence[Summary], sizes: Sequence[ModelSize] = MODEL_SIZES) -> str:
    """A markdown table: one row per (model size, setup)."""
    _, dataset = make_dataloader(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, n_samples=1)
    labels = {
        s.name: f"{s.name} ({parameter_count(s, len(dataset.vocab)) / 1e6:.2f} M params)" for s in sizes
    }
    lines = [
        "| model | callbacks | ms/step | vs. no callbacks | per-repeat ratios | in-callback ms/step | in-callback share |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    last = None
    for s in summaries:
        model = labels.get(s.size, s.size) if s.size != last else ""
        last = s.size
        if s.setup == BASELINE:
            lines.append(f"| {model} | {s.setup} | {s.step_ms:.2f} | 1.000x | | | |")
        else:
            lines.append(
                f"| {model} | {s.setup} | {s.step_ms:.2f} | {s.ratio:.3f}x | "
                f"{s.ratio_low:.3f}x to {s.ratio_high:.3f}x | {s.hook_ms:.2f} | {s.hook_share:.1%} |"
            )
    return "\n".join(lines)


def goal_verdict(s: Summary, goal_ratio: float) -> str:
    """Whether a setup's cost is within ``goal_ratio`` of a step without callbacks.

    Two estimates: the step-time ratio (sees everything, but noisy on a busy machine) and the time
    inside the callbacks' hooks (steady, but blind to effects outside them). When the per-repeat
    ratios spread over more than twice the margin under test, the step times cannot resolve it and
    the hook time decides alone; otherwise call it only when the two agree.
    """
    by_hooks = 1.0 + s.hook_share <= goal_ratio
    if s.ratio_high - s.ratio_low > 2 * (goal_ratio - 1.0):
        return (
            f"{'met' if by_hooks else 'NOT met'} by the hook time (step times too noisy to confirm: "
            f"per-repeat ratios {s.ratio_low:.3f}x to {s.ratio_high:.3f}x)"
        )
    if by_hooks == (s.ratio <= goal_ratio):
        return "met" if by_hooks else "NOT met"
    return "unclear (the two estimates disagree)"


def goal_lines(summaries: Sequence[Summary]) -> list[str]:
    """Whether the guard met the 3% goal, per model size; reports, never raises."""
    lines = []
    for s in summaries:
        if s.setup != "GradientSpikeGuard":
            continue
        verdict = goal_verdict(s, GOAL_RATIO)
        note = ""
        if not s.armed:
            note = " (the guard was not armed during the timed steps: per-element detection did not run)"
        elif s.interventions:
            note = f" (the guard intervened {s.interventions} times: this was not a clean run)"
        lines.append(
            f"{s.size}: GradientSpikeGuard takes {s.ratio:.3f}x the step time of no callbacks (its hooks alone: "
            f"{s.hook_share:.1%} of a baseline step); goal <= {GOAL_RATIO:.2f}x: {verdict}{note}."
        )
    return lines
