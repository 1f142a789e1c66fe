"""Efficacy on injected faults: does a guard see each fault, act on it, leave clean runs alone, and end
where a clean run ends? Our callbacks at their defaults against no guard, Lightning's ``SpikeDetection``
and an OLMo-style rule, on the tiny GPT, every run seeded and repeated over seeds.

    python -m benchmarks.efficacy            # rewrites the Efficacy section of docs/benchmarks.md
    python -m benchmarks.efficacy --quick    # the CI smoke test: a few steps, prints, writes nothing
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.spike import SpikeDetection

from benchmarks.spectral import LossRecorder
from lightning_stability import GradientSpikeGuard, InMemoryRollback, get_event_log
from lightning_stability.demos import FaultInjector, TinyGPT, make_dataloader

ARMS = ("no guard", "SpikeDetection", "OLMo-style rule", "ours")
# fault name -> FaultInjector faults relative to the fault step (a burst spans several steps), or an LR spike
FAULTS: dict[str, dict[int, tuple[str, float | None]]] = {
    "gradient x10": {0: ("grad_scale", 10.0)},
    "gradient x100": {0: ("grad_scale", 100.0)},
    "gradient x1000": {0: ("grad_scale", 1000.0)},
    "1% of gradient x1000": {0: ("grad_sparse", 1000.0)},
    "NaN gradient": {0: ("grad_nan", None)},
    "NaN loss": {0: ("loss_nan", None)},
    "shuffled labels, 5 steps": {i: ("labels_shuffle", None) for i in range(5)},
    "learning rate x100": {},
}
LR_SPIKE = 100.0


@dataclass(frozen=True)
class Settings:
    steps: int
    fault_step: int
    clean_steps: int
    seeds: tuple[int, ...]


FULL = Settings(steps=260, fault_step=160, clean_steps=600, seeds=(0, 1, 2))
QUICK = Settings(steps=45, fault_step=40, clean_steps=45, seeds=(0,))


POISONED_BATCHES = ("loss_nan", "labels_shuffle")  # faults that corrupt the batch itself, not the model


class OLMoRule(Callback):
    """The baseline OLMo-style rule: skip the update when the loss or the gradient norm exceeds the mean
    plus 6 standard deviations of the last 128 accepted steps (after 32 of them)."""

    def __init__(self, window: int = 128, sigmas: float = 6.0, warmup: int = 32) -> None:
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.sigmas, self.warmup = sigmas, warmup
        self.detections: list[int] = []
        self._loss = math.nan

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss = float(loss.detach())

    def _outlier(self, value: float, history: deque[float]) -> bool:
        if not math.isfinite(value):
            return True
        if len(history) < self.warmup:
            return False
        return value > statistics.fmean(history) + self.sigmas * statistics.pstdev(history)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if self._outlier(self._loss, self.losses) or self._outlier(norm, self.norms):
            self.detections.append(trainer.global_step)
            for p in pl_module.parameters():
                p.grad = None  # skip the update
            return
        self.losses.append(self._loss)
        self.norms.append(norm)


class LRSpike(Callback):
    """Multiplies every learning rate by ``factor`` for the optimizer step at ``step`` only."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor
        self._saved: list[float] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            self._saved = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] *= self.factor

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._saved is not None:
            for g, lr in zip(trainer.optimizers[0].param_groups, self._saved):
                g["lr"] = lr
            self._saved = None


class SkipSteps(pl.Callback):
    """A control: the optimizer steps in ``steps`` are left out (their gradients dropped), nothing else."""

    def __init__(self, steps: range) -> None:
        self.steps = steps

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step in self.steps:
            for p in pl_module.parameters():
                p.grad = None


class UpdateRatio(Callback):
    """A probe: each step's largest update-to-weight ratio over the 2-D weights, ``||W_after - W_before||_F /
    ||W_before||_F`` (it copies the weights before every step: a benchmark's measurement, not a monitor)."""

    def __init__(self) -> None:
        self.ratios: list[float] = []
        self._before: list[torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters() if p.dim() >= 2]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._before is not None:
            after = [p.detach() for p in pl_module.parameters() if p.dim() >= 2]
            self.ratios.append(max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(after, self._before)))
            self._before = None


def first_outlier(values: Sequence[float], start: int, factor: float, history: int = 20) -> int | None:
    """The first step from ``start`` on whose value is at least ``factor`` times the median of the
    ``history`` steps before ``start``."""
    base = statistics.median(values[start - history:start])
    return next((i for i in range(start, len(values)) if not values[i] < factor * base), None)


@dataclass
class Run:
    arm: str
    fault: str
    seed: int
    detections: list[int]
    final: float  # mean of the last 20 losses of unpoisoned batches: inf if any is not finite (diverged), nan if halted
    halted: int | None  # the step SpikeDetection stopped training at
    losses: list[float] = field(default_factory=list)


def run(arm: str, fault: str | None, seed: int, settings: Settings, steps: int | None = None,
        skip: range | None = None, probe: Callback | None = None) -> Run:
    steps = steps or settings.steps
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        loader, dataset = make_dataloader(block_size=64, batch_size=16, n_samples=16 * steps)
        pl.seed_everything(seed, verbose=False)
        model = TinyGPT(len(dataset.vocab), block_size=64, d_model=64, n_layer=2, n_head=4, max_steps=steps)
        callbacks: list[Callback] = [SkipSteps(skip)] if skip is not None else []
        callbacks += [probe] if probe is not None else []
        injector = None
        if fault is not None:
            spec = FAULTS[fault]
            injector = FaultInjector({settings.fault_step + d: f for d, f in spec.items()}, seed=seed)
            callbacks.append(injector)
            if not spec:
                callbacks.append(LRSpike(settings.fault_step, LR_SPIKE))
        guard: Any = None
        if arm == "SpikeDetection":
            guard = SpikeDetection(exclude_batches_path=root)
        elif arm == "OLMo-style rule":
            guard = OLMoRule()
        elif arm == "ours":
            callbacks += [GradientSpikeGuard(), InMemoryRollback(every_n_steps=50, commit_after=10)]
        if guard is not None:
            callbacks.append(guard)
        losses = LossRecorder()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, default_root_dir=root,
                             callbacks=[*callbacks, losses], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        halted = None
        try:
            trainer.fit(model, loader)
        except RuntimeError as err:  # SpikeDetection stops training by raising
            if "Training spike detected" not in str(err):
                raise
            halted = trainer.global_step
        if arm == "ours":
            detections = [e.step for e in get_event_log(trainer) if e.source == "GradientSpikeGuard" and e.severity != "info"]
        elif arm == "OLMo-style rule":
            detections = list(guard.detections)
        elif arm == "SpikeDetection":
            detections = [halted] if halted is not None else []
        else:
            detections = []
    poisoned = {step for step, kind in injector.injected if kind in POISONED_BATCHES} if injector is not None else set()
    final = final_loss(losses.losses, poisoned) if halted is None else math.nan
    return Run(arm, fault or "clean", seed, detections, final, halted, list(losses.losses))


def final_loss(losses: Sequence[float], poisoned: set[int], last: int = 20) -> float:
    """The mean of the last ``last`` losses (one a step), leaving out the steps whose batch the injector
    poisoned: their loss is the fault's, not the model's. ``inf`` if any is not finite (the run
    diverged), ``nan`` with none."""
    tail = [x for step, x in enumerate(losses) if step not in poisoned][-last:]
    if not tail:
        return math.nan
    return statistics.fmean(tail) if all(math.isfinite(x) for x in tail) else math.inf


def evaluate(settings: Settings, progress: Callable[[str], None]) -> tuple[str, list[str]]:
    clean = {(arm, seed): run(arm, None, seed, settings) for arm in ARMS for seed in settings.seeds}
    long_clean = {(arm, seed): run(arm, None, seed, settings, settings.clean_steps) for arm in ARMS if arm != "no guard"
                  for seed in settings.seeds}
    rows = ["| fault | guard | detected (seeds) | steps to detection | final loss vs. clean (per seed) |",
            "|---|---|---:|---:|---|"]
    ours_by_fault: dict[str, list[float]] = {}
    per_arm: dict[str, dict[str, Any]] = {a: {"hits": 0, "faults": 0, "late": [], "ratios": [], "fault_alerts": 0,
                                              "all_alerts": 0, "diverged": 0, "halted": 0} for a in ARMS}
    for fault in FAULTS:
        for arm in ARMS:
            runs = [run(arm, fault, seed, settings) for seed in settings.seeds]
            window = range(settings.fault_step, settings.fault_step + 5 + max(FAULTS[fault] or {0: 0}))
            hits = [r for r in runs if any(d in window for d in r.detections)]
            delays = [min(d for d in r.detections if d in window) - settings.fault_step for r in hits]
            ratios = [r.final / clean[("no guard", r.seed)].final for r in runs]
            if arm == "ours":
                ours_by_fault[fault] = ratios
            stats = per_arm[arm]
            stats["hits"] += len(hits)
            stats["faults"] += len(runs)
            stats["ratios"] += [x for x in ratios if not math.isnan(x)]
            stats["diverged"] += sum(math.isinf(x) for x in ratios)
            stats["halted"] += sum(r.halted is not None for r in runs)
            stats["all_alerts"] += sum(len(r.detections) for r in runs)
            stats["fault_alerts"] += sum(sum(d in window for d in r.detections) for r in runs)
            detected = "-" if arm == "no guard" else f"{len(hits)}/{len(runs)}"
            delay = "-" if not delays else f"{statistics.fmean(delays):.1f}"
            shown = ", ".join("halted" if r.halted is not None else "diverged (NaN)" if math.isinf(x) else f"{x:.3f}x"
                              for r, x in zip(runs, ratios))
            rows.append(f"| {fault} | {arm} | {detected} | {delay} | {shown} |")
            progress(f"{fault} / {arm}: detected {detected}, final {shown}")
    # the floor of a guard that leaves the burst out: a clean run with the burst's steps skipped, no fault
    burst = range(settings.fault_step, settings.fault_step + 1 + max(FAULTS["shuffled labels, 5 steps"]))
    floor = [run("no guard", None, seed, settings, skip=burst).final / clean[("no guard", seed)].final
             for seed in settings.seeds]
    lines = []
    unguarded = per_arm["no guard"]
    finite = [x for x in unguarded["ratios"] if math.isfinite(x)]
    lines.append(f"no guard: final loss up to {max(finite, default=math.nan):.3f}x the clean run's where it stayed finite; "
                 f"{unguarded['diverged']} of {unguarded['faults']} fault runs diverged to NaN")
    for arm in ARMS[1:]:
        stats = per_arm[arm]
        clean_runs = [long_clean[(arm, s)] for s in settings.seeds]
        false_alerts = sum(len(r.detections) for r in clean_runs)
        clean_steps = settings.clean_steps * len(clean_runs)
        precision = stats["fault_alerts"] / max(1, stats["all_alerts"] + false_alerts)
        finished = [x for x in stats["ratios"] if math.isfinite(x)]
        worst = max((abs(x - 1) for x in finished), default=math.nan)
        diverged = stats["diverged"]
        lines.append(
            f"{arm}: recall {stats['hits']}/{stats['faults']} fault runs; precision {precision:.2f}; "
            f"{1000 * false_alerts / clean_steps:.2f} false alerts per 1000 clean steps ({false_alerts} in "
            f"{clean_steps}); final loss within {worst:.1%} of the clean run where the run finished and stayed "
            f"finite; {diverged} runs diverged, {stats['halted']} halted"
        )
    # the early signal: does the update-to-weight ratio move before the loss does (unguarded runs)?
    leads = {}
    for fault in ("learning rate x100", "shuffled labels, 5 steps"):
        leads[fault] = []
        for seed in settings.seeds:
            probe = UpdateRatio()
            r = run("no guard", fault, seed, settings, probe=probe)
            update_at = first_outlier(probe.ratios, settings.fault_step, 5.0)
            loss_at = first_outlier(r.losses, settings.fault_step, 1.25)
            leads[fault].append("no jump" if update_at is None else "-" if loss_at is None else f"{loss_at - update_at:+d}")
    lines.append("the update-to-weight ratio's lead over the loss (steps from its first x5 outlier to the loss's "
                 "first x1.25, unguarded, per seed): " + "; ".join(f"{f} {', '.join(v)}" for f, v in leads.items()))
    lines.append(f"floor of the label burst: a clean run with its {len(burst)} steps skipped (no fault) ends at "
                 + ", ".join(f"{x:.3f}x" for x in floor) + ": what a guard that leaves the burst out costs")
    missed = {f: max(r) for f, r in ours_by_fault.items() if not max(r) <= 1.01}  # NaN or inf: missed too
    beyond_floor = {f: max(r[i] - floor[i] for i in range(len(floor))) for f, r in ours_by_fault.items() if f in missed}
    lines.append("goal (ours within 1% of the clean run for all eight faults, every seed): "
                 + ("met" if not missed else "not met: " + "; ".join(
                     f"{f} up to {x:.3f}x ({beyond_floor[f]:+.4f} against the burst's floor)" if f.startswith("shuffled")
                     else f"{f} up to {x:.3f}x" for f, x in missed.items())))
    return "\n".join(rows), lines


SECTION = "## Efficacy on injected faults"


def render_section(settings: Settings, result: tuple[str, list[str]], seconds: float, machine: str) -> str:
    table, lines = result
    faults = ", ".join(FAULTS)
    summary = "\n".join(f"- {line}." for line in lines)
    return f"""
{SECTION}

```bash
python -m benchmarks.efficacy   # rewrites this section only ({seconds / 60:.1f} minutes for the run below)
```

{machine}

The tiny GPT (d64-L2) trains {settings.steps} steps; at step {settings.fault_step} one fault is injected
({faults}; the label burst spans 5 steps, the learning-rate spike multiplies every rate by
{LR_SPIKE:g} for one step). Guards: none; Lightning's `SpikeDetection()` at its defaults (it stops
training when it sees a loss spike); an OLMo-style rule implemented here (skip the update when the loss
or the gradient norm exceeds mean + 6 std of the last 128 accepted steps); ours: `GradientSpikeGuard()`
and `InMemoryRollback(every_n_steps=50)` at their defaults. Seeds {", ".join(map(str, settings.seeds))}
draw the initial weights. A detection counts when it falls within 5 steps of the fault (of its last
step for the burst); false alerts are detections in clean runs of {settings.clean_steps} steps per seed.
The final loss (mean of the last 20 steps, leaving out the batches the injector poisoned: their loss
is the fault's, not the model's) is relative to the unguarded clean run of the same seed.

{table}

{summary}
"""


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_section

    return run_section(argv, "python -m benchmarks.efficacy", __doc__.splitlines()[0], SECTION, QUICK, FULL, evaluate,
                       render_section)


if __name__ == "__main__":
    sys.exit(main())
