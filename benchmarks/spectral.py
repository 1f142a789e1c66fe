"""What ``SpectralMonitor`` costs and what it does, on the tiny GPT of ``lightning_stability.demos``.

Three measurements, each side by side in one process:

1. **Step-time overhead** of ``SpectralMonitor()`` at its defaults, next to no callback, next to the
   naive alternative (every singular value of every weight by ``torch.linalg.svdvals``, every step),
   and next to every callback of the package at once; the method of ``overhead.py``. The monitor's
   full-spectrum analysis goes round-robin, one layer at a time, through ``full_every_n_steps``
   (500) steps, so a short timed window holds only a layer or two of it: its amortised cost is also
   measured apart, as the time to analyse every layer once divided by the period.
2. **Full-spectrum analysis**: ``lightning_stability.analyze_model`` next to WeightWatcher's
   ``analyze()`` on the same weights (WeightWatcher is a benchmark extra, ``pip install -e
   ".[bench]"``; without it the comparison is skipped): seconds, the speed-up, and how far the
   metrics both compute (alpha, stable rank, spectral norm) agree per layer.
3. **Efficacy**: the tiny GPT at a learning rate that makes it blow up, trained with no callback,
   with ``SpectralMonitor(ladder=("cap",))``, with ``SpectralMonitor(ladder=("pss",))`` and with
   ``SpectralUpdateClip(c=3)`` on from the start, from the same seeds: loss curves, final loss,
   whether it diverged, and the number of interventions.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from benchmarks.overhead import (
    BATCH_SIZE,
    BLOCK_SIZE,
    MODEL_SIZES,
    Measurement,
    ModelSize,
    Setup,
    Summary,
    goal_verdict,
    run_benchmark,
)
from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    SpectralMonitor,
    SpectralUpdateClip,
    analyze_model,
    get_event_log,
)
from lightning_stability.demos import TinyGPT, make_dataloader
from lightning_stability.ops.spectral import analyze_spectrum, as_matrix, full_spectrum, spectral_weights

GOAL_RATIO = 1.02  # the goal: per-step tracking of every weight costs at most 2% of step time
GOAL_SPEEDUP = 10.0  # the goal: the full analysis at least 10x faster than WeightWatcher's
FULL_EVERY = SpectralMonitor().full_every_n_steps  # the default period of the full-spectrum analysis


# -- 1. step-time overhead ---------------------------------------------------------------------------
class FullSvdvals(Callback):
    """The naive alternative: every singular value of every weight after every optimizer step, from
    which sigma_max and the stable rank follow exactly (kept on the device, as the monitor keeps its
    own estimates)."""

    def __init__(self) -> None:
        self.weights: list[nn.Parameter] = []
        self.stats: torch.Tensor | None = None  # (layers, 2): sigma_max, stable rank

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = [w for _, w in spectral_weights(pl_module)]

    @override
    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rows = []
        for w in self.weights:
            s = torch.linalg.svdvals(as_matrix(w.detach()).float())  # descending
            rows.append(torch.stack([s[0], s.pow(2).sum() / s[0].pow(2).clamp_min(1e-12)]))
        self.stats = torch.stack(rows)


def _nothing(root: str) -> list[Callback]:
    return []


def _monitor(root: str) -> list[Callback]:
    return [SpectralMonitor()]


def _svdvals(root: str) -> list[Callback]:
    return [FullSvdvals()]


def _all_callbacks(root: str) -> list[Callback]:
    return [GradientSpikeGuard(), SpectralMonitor(), InMemoryRollback()]


SETUPS = (
    Setup("no callbacks", "the baseline", _nothing),
    Setup(
        "SpectralMonitor",
        "`SpectralMonitor()` at its defaults: a warm-started power iteration, the stable rank, the "
        "update's spectral norm and the gradient's alignment for every weight every step, a check every "
        "50 steps, the full-spectrum analysis round-robin",
        _monitor,
    ),
    Setup(
        "full svdvals",
        "the naive alternative: `torch.linalg.svdvals` of every weight after every step, for the exact "
        "sigma_max and stable rank",
        _svdvals,
    ),
    Setup(
        "all callbacks",
        "`GradientSpikeGuard()`, `SpectralMonitor()` and `InMemoryRollback()` together, at their defaults",
        _all_callbacks,
    ),
)
MONITOR = SETUPS[1].name


def overhead(
    warmup_steps: int, timed_steps: int, repeats: int, progress: Callable[[str], None] | None = None
) -> list[Measurement]:
    return run_benchmark(warmup_steps, timed_steps, repeats, MODEL_SIZES, SETUPS, progress)


def _gpt(size: ModelSize, seed: int = 0) -> TinyGPT:
    """An untrained, seeded ``TinyGPT`` of ``size`` over the demo corpus's characters."""
    _, dataset = make_dataloader(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, n_samples=1)
    torch.manual_seed(seed)
    return TinyGPT(
        len(dataset.vocab), block_size=BLOCK_SIZE, d_model=size.d_model, n_layer=size.n_layer, n_head=size.n_head
    )


@dataclass(frozen=True)
class Amortised:
    size: str
    layers: int
    seconds: float  # median time to analyse every layer once, as the monitor does (one at a time)


def full_analysis_cost(size: ModelSize, repeats: int) -> Amortised:
    """The monitor's full-spectrum work for every layer of ``size`` once: the exact spectrum and top
    pair of each weight (``full_spectrum``) and its metrics (``analyze_spectrum``), as its
    round-robin does over ``full_every_n_steps``; TensorBoard's histograms are left out."""
    weights = [w.detach() for _, w in spectral_weights(_gpt(size))]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            sv, _, _ = full_spectrum(w)
            analyze_spectrum(w, sv)
        times.append(time.perf_counter() - start)
    return Amortised(size.name, len(weights), statistics.median(times))


def overhead_lines(
    summaries: Sequence[Summary], amortised: Sequence[Amortised], timed_steps: int
) -> list[str]:
    """Whether the monitor met the 2% goal per model size, and the amortised full analysis; reports,
    never raises."""
    lines = []
    base = {s.size: s.step_ms for s in summaries if s.setup == SETUPS[0].name}
    naive = {s.size: s for s in summaries if s.setup == SETUPS[2].name}
    for s in summaries:
        if s.setup != MONITOR:
            continue
        verdict = goal_verdict(s, GOAL_RATIO)
        note = ""
        if s.interventions:
            note = f" (it intervened {s.interventions} times: this was not a clean run)"
        n = naive.get(s.size)
        versus = (
            f"; the naive full `svdvals` every step takes {n.ratio:.2f}x "
            f"(its hooks: {n.hook_share:.0%} of a step)"
            if n is not None
            else ""
        )
        lines.append(
            f"{s.size}: SpectralMonitor takes {s.ratio:.3f}x the step time of no callbacks (its hooks alone: "
            f"{s.hook_share:.1%} of a baseline step); goal <= {GOAL_RATIO:.2f}x: {verdict}{note}{versus}."
        )
    period = FULL_EVERY
    if period is None:  # the full-spectrum analysis is off by default
        return lines
    for a in amortised:
        step_ms = base.get(a.size, math.nan)
        per_step_ms = a.seconds * 1e3 / period
        in_window = timed_steps * a.layers / period
        lines.append(
            f"{a.size}: the full-spectrum analysis of all {a.layers} weights takes {a.seconds * 1e3:.1f} ms; "
            f"spread over {period} steps that is {per_step_ms:.3f} ms a step, {per_step_ms / step_ms:.2%} "
            f"of a baseline step (a {timed_steps}-step window holds about {in_window:.1f} of these layer "
            "analyses)."
        )
    return lines


# -- 2. full-spectrum analysis against WeightWatcher ---------------------------------------------------
def import_weightwatcher() -> Any | None:
    """``weightwatcher``, or ``None`` if it is not installed. Its import calls ``logging.basicConfig``
    (INFO on the root logger), logs that CUDA is missing and sets ``warnings.simplefilter("ignore")``;
    a handler that drops records keeps basicConfig from configuring anything, and the rest is put back."""
    root = logging.getLogger()
    level, quiet = root.level, logging.NullHandler()
    root.addHandler(quiet)
    try:
        with warnings.catch_warnings():
            import weightwatcher
    except ImportError:
        return None
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return weightwatcher


# Everything optional off, so WeightWatcher does no more than what analyze_model does: the ESD of
# each weight by a full SVD, the power-law fit (its own "ww" fit), the norm metrics. These are the
# defaults of analyze() in 0.7; passed explicitly so a later default cannot slow it down unseen.
# "fast" falls back to SciPy's SVD without CUDA.
WW_OPTIONS: dict[str, Any] = dict(
    plot=False, savefig=False, randomize=False, mp_fit=False, vectors=False, detX=False, intra=False,
    deltas=False, fix_fingers=False, fit="PL", pl_package="ww", svd_method="fast",
)
ANALYSIS_SIZES = (ModelSize("d1024-L2", d_model=1024, n_layer=2), MODEL_SIZES[1])


@dataclass(frozen=True)
class AnalysisResult:
    size: str
    layers: int  # weights both analysed
    ours_s: float  # median seconds of analyze_model
    ww_s: float  # median seconds of WeightWatcher(model).analyze(**WW_OPTIONS)
    svdvals_s: float  # median seconds of torch.linalg.svdvals of every weight (no metrics)
    alpha_median_diff: float  # median over layers of |alpha_ours - alpha_ww|
    alpha_max_diff: float
    alpha_close: int  # layers whose alphas differ by at most 0.1
    alpha_worst: str  # the layer with the largest difference, "name (ours vs WW's)"
    srank_max_rel: float  # largest relative difference of the stable rank
    norm_max_rel: float  # largest relative difference of lambda_max = sigma_max^2 (WW's "spectral_norm")


def compare_analysis(
    ww: Any, size: ModelSize, repeats: int, progress: Callable[[str], None] | None = None
) -> AnalysisResult:
    """``analyze_model`` against WeightWatcher on the same seeded, untrained GPT, interleaved, the order
    alternating from repeat to repeat; then the metrics both compute, layer by layer."""
    model = _gpt(size)
    weights = [w.detach() for _, w in spectral_weights(model)]

    def ours() -> Any:
        return analyze_model(model)

    def theirs() -> Any:
        return ww.WeightWatcher(model=model).analyze(**WW_OPTIONS)

    def svdvals() -> Any:
        return [torch.linalg.svdvals(as_matrix(w).float()) for w in weights]

    runs: dict[str, list[float]] = {"ours": [], "ww": [], "svdvals": []}
    funcs = {"ours": ours, "ww": theirs, "svdvals": svdvals}
    results: dict[str, Any] = {}
    for repeat in range(repeats):
        order = list(funcs) if repeat % 2 == 0 else list(reversed(funcs))
        for key in order:
            start = time.perf_counter()
            results[key] = funcs[key]()
            runs[key].append(time.perf_counter() - start)
    mine, details = results["ours"], results["ww"]
    rows = {str(r["longname"]): r for _, r in details.iterrows()}
    alpha_diffs, srank_rel, norm_rel = [], [], []
    worst = ""
    for name, stats in mine.items():
        row = rows.get(name)
        if row is None:
            continue
        alpha_diffs.append(abs(stats.alpha - float(row["alpha"])))
        if alpha_diffs[-1] == max(alpha_diffs):
            worst = f"{name} ({stats.alpha:.2f} vs {float(row['alpha']):.2f}, {stats.n} eigenvalues)"
        srank_rel.append(abs(stats.stable_rank / float(row["stable_rank"]) - 1.0))
        norm_rel.append(abs(stats.sigma_max**2 / float(row["spectral_norm"]) - 1.0))
    if not alpha_diffs:
        raise RuntimeError(f"compare_analysis({size.name}): no layer names in common with WeightWatcher's")
    result = AnalysisResult(
        size=size.name,
        layers=len(alpha_diffs),
        ours_s=statistics.median(runs["ours"]),
        ww_s=statistics.median(runs["ww"]),
        svdvals_s=statistics.median(runs["svdvals"]),
        alpha_median_diff=statistics.median(alpha_diffs),
        alpha_max_diff=max(alpha_diffs),
        alpha_close=sum(d <= 0.1 for d in alpha_diffs),
        alpha_worst=worst,
        srank_max_rel=max(srank_rel),
        norm_max_rel=max(norm_rel),
    )
    if progress is not None:
        progress(
            f"analysis {size.name:8s} analyze_model {result.ours_s:.2f} s, "
            f"WeightWatcher {result.ww_s:.2f} s, svdvals {result.svdvals_s:.2f} s"
        )
    return result


def analysis_table(results: Sequence[AnalysisResult]) -> tuple[str, list[str]]:
    lines = [
        "| model | weights | `analyze_model` | WeightWatcher `analyze()` | speed-up | `svdvals` alone "
        "| alpha: median difference | alphas within 0.1 | stable rank: largest rel. difference "
        "| lambda_max: largest rel. difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in results:
        speedup = r.ww_s / r.ours_s
        lines.append(
            f"| {r.size} | {r.layers} | {r.ours_s:.3f} s | {r.ww_s:.3f} s | {speedup:.1f}x | "
            f"{r.svdvals_s:.3f} s | {r.alpha_median_diff:.3f} | {r.alpha_close} of {r.layers} | "
            f"{r.srank_max_rel:.1e} | {r.norm_max_rel:.1e} |"
        )
        notes.append(
            f"{r.size}: `analyze_model` is {speedup:.1f}x faster than WeightWatcher's `analyze()`; goal >= "
            f"{GOAL_SPEEDUP:.0f}x: {'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}. The largest alpha "
            f"difference is {r.alpha_max_diff:.2f}, in {r.alpha_worst}."
        )
    return "\n".join(lines), notes


# -- 3. efficacy ------------------------------------------------------------------------------------
# The blow-up, found by a sweep on 2 CPU cores (d64-L2 and d128-L2; AdamW and SGD; peak LR 0.01 to 1;
# warm-up 1 to 150 steps; seeds 0-2): AdamW (betas 0.9/0.95, weight decay 0.1) to a peak LR of 0.3,
# 100x the demo's 3e-3, warmed up linearly over 150 steps. Every seed trains normally to a loss near
# 1.9, then blows up between steps 50 and 80, while the LR passes 0.1 to 0.16: the loss jumps to 3-4
# and the model settles near the unigram entropy (~2.5-2.9) for the rest of the run, where a healthy
# LR (0.03) reaches ~0.3. With a shorter warm-up it blows up within 30 steps, before a monitor has
# any history; with SGD the loss turns NaN within 30 steps.
EFFICACY_SIZE = MODEL_SIZES[0]
EFFICACY_LR = 0.3
EFFICACY_WARMUP = 150
REFERENCE_LR = 0.03  # a healthy LR, for the plot and the table's scale
SPIKE_RISE = 1.3  # a spike: a loss this much above the lowest loss before it (healthy runs: up to ~1.25)
DIVERGED_RISE = 1.2  # diverged: the final loss this much above the lowest loss before it (healthy: ~1.1)
TAIL = 20  # the final loss is the mean of the last TAIL losses
UPDATE_CLIP_C = 3.0  # SpectralUpdateClip's c in the preventive arm (c=10, the monitor's default, does not save it)
ARMS = ("no callbacks", "cap", "pss", "update_clip")


class PreventiveUpdateClip(Callback):
    """``SpectralUpdateClip(optimizer, c)`` on every weight matrix from the first step to the last: the
    soft spectral clipping of updates, used as a preventive rather than as a monitor's rung."""

    def __init__(self, c: float) -> None:
        self.c = c
        self.clip: SpectralUpdateClip | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clip = SpectralUpdateClip(trainer.optimizers[0], self.c)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.clip is not None:
            self.clip.remove()
            self.clip = None


def arm_name(arm: str) -> str:
    if arm == "no callbacks":
        return arm
    if arm == "update_clip":
        return f"`SpectralUpdateClip(c={UPDATE_CLIP_C:g})` on from the start"
    return f'`SpectralMonitor(ladder=("{arm}",))`'


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))  # a host sync each step: these fits are not timed


@dataclass(frozen=True)
class EfficacyRun:
    arm: str
    seed: int
    lr: float
    losses: tuple[float, ...]
    interventions: int  # caps or PSS smoothings (one per layer and check)
    failed: int  # checks that found the loss worse after an intervention (a rollback request)
    first_intervention: int | None
    seconds: float

    @property
    def _tail(self) -> int:
        return max(1, min(TAIL, len(self.losses) // 4))

    @property
    def final(self) -> float:
        tail = self.losses[-self._tail :]
        return sum(tail) / len(tail) if tail else math.nan

    @property
    def best(self) -> float:
        """The lowest loss before the final ones."""
        finite = [x for x in self.losses[: -self._tail] if math.isfinite(x)]
        return min(finite) if finite else math.nan

    @property
    def spike(self) -> int | None:
        """The first step whose loss is non-finite or ``SPIKE_RISE`` times the lowest loss before it."""
        low = math.inf
        for step, x in enumerate(self.losses):
            if not math.isfinite(x) or x > SPIKE_RISE * low:
                return step
            low = min(low, x)
        return None

    @property
    def peak(self) -> float | None:
        """The highest loss from the first spike on (``None`` without a spike)."""
        if self.spike is None:
            return None
        after = self.losses[self.spike :]
        return math.inf if not all(math.isfinite(x) for x in after) else max(after)

    @property
    def largest_rise(self) -> float:
        """The largest ratio of a loss to the lowest loss before it (the noise of a healthy run)."""
        rise, low = 0.0, math.inf
        for x in self.losses:
            if not math.isfinite(x):
                return math.inf
            rise, low = max(rise, x / low if low < math.inf else 0.0), min(low, x)
        return rise

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(x) for x in self.losses) or self.final > DIVERGED_RISE * self.best


def monitor_for(arm: str, check_every: int, warmup: int) -> Callback | None:
    if arm == "no callbacks":
        return None
    if arm == "update_clip":
        return PreventiveUpdateClip(UPDATE_CLIP_C)
    # Detections armed after `warmup` steps, well before the blow-up, and checks every `check_every`
    # steps instead of every 50, so that the monitor can act in time.
    return SpectralMonitor(ladder=(arm,), check_every_n_steps=check_every, warmup=warmup)


def efficacy_run(
    arm: str, seed: int, steps: int, check_every: int, monitor_warmup: int, lr: float = EFFICACY_LR
) -> EfficacyRun:
    """One fit of the tiny GPT at ``lr``: the same data for every seed, ``seed`` draws the initial weights."""
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        loader, dataset = make_dataloader(
            block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, n_samples=BATCH_SIZE * steps
        )
        pl.seed_everything(seed, verbose=False)
        size = EFFICACY_SIZE
        model = TinyGPT(
            len(dataset.vocab), block_size=BLOCK_SIZE, d_model=size.d_model, n_layer=size.n_layer,
            n_head=size.n_head, lr=lr, warmup_steps=EFFICACY_WARMUP, max_steps=steps,
        )
        recorder = LossRecorder()
        monitor = monitor_for(arm, check_every, monitor_warmup)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, default_root_dir=root,
            callbacks=[recorder] + ([monitor] if monitor is not None else []),
            enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        )
        start = time.perf_counter()
        trainer.fit(model, loader)
        seconds = time.perf_counter() - start
        events = [
            e for e in get_event_log(trainer) if isinstance(monitor, SpectralMonitor) and e.source == monitor.source
        ]
    acted = [e for e in events if e.action in ("cap", "pss")]
    return EfficacyRun(
        arm=arm,
        seed=seed,
        lr=lr,
        losses=tuple(recorder.losses),
        interventions=len(acted),
        failed=sum(1 for e in events if e.kind == "intervention_failed"),
        first_intervention=min((e.step for e in acted), default=None),
        seconds=seconds,
    )


def efficacy(
    seeds: Sequence[int],
    steps: int,
    check_every: int,
    monitor_warmup: int,
    reference: bool,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[EfficacyRun], EfficacyRun | None]:
    """Every arm from every seed; and, if ``reference``, one fit at a healthy LR from the first seed."""
    runs = []
    for seed in seeds:
        for arm in ARMS:
            run = efficacy_run(arm, seed, steps, check_every, monitor_warmup)
            runs.append(run)
            if progress is not None:
                progress(
                    f"efficacy seed {seed} {arm:12s} final loss {_loss(run.final)}, {run.interventions} "
                    f"interventions, {run.seconds:.1f} s"
                )
    ref = None
    if reference:
        ref = efficacy_run("no callbacks", seeds[0], steps, check_every, monitor_warmup, lr=REFERENCE_LR)
    return runs, ref


def _loss(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}" if math.isfinite(x) else "NaN" if math.isnan(x) else "inf"


def _optional(x: int | None) -> str:
    return "" if x is None else str(x)


def efficacy_table(runs: Sequence[EfficacyRun], reference: EfficacyRun | None) -> tuple[str, list[str]]:
    lines = [
        "| seed | run | lowest loss | first spike at step | highest loss from there | final loss | diverged "
        "| interventions | first at step | loss worse after one |",
        "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    rows = list(runs) + ([reference] if reference is not None else [])
    for r in rows:
        name = f"no callbacks, LR {r.lr:g} (reference)" if r is reference else arm_name(r.arm)
        monitored = r.arm in ("cap", "pss")
        lines.append(
            f"| {r.seed} | {name} | {_loss(r.best)} | {_optional(r.spike)} | {_loss(r.peak)} | "
            f"{_loss(r.final)} | {'yes' if r.diverged else 'no'} | {r.interventions if monitored else ''} | "
            f"{_optional(r.first_intervention)} | {r.failed if monitored else ''} |"
        )
    verdicts = []
    for arm in ARMS:
        mine = [r for r in runs if r.arm == arm]
        diverged = sum(r.diverged for r in mine)
        finals = ", ".join(_loss(r.final) for r in mine)
        if arm == "no callbacks":
            what, extra = f"no callbacks at LR {EFFICACY_LR:g}", ""
        elif arm == "update_clip":
            what, extra = arm_name(arm), ""
        else:
            what = arm_name(arm)
            extra = f"; {sum(r.interventions for r in mine)} interventions in all"
        verdicts.append(
            f"{what}: diverged in {diverged} of {len(mine)} seeds (final losses {finals}{extra})."
        )
    for arms, what in ((("cap", "pss"), "runs with the monitor's cap or PSS"), (("update_clip",), "preventive update-clipping runs")):
        saved, guarded = rescued([r for r in runs if r.arm in arms or r.arm == "no callbacks"])
        verdicts.append(
            f"Rescued (the unguarded run from the same seed diverged, the guarded one did not): {saved} of "
            f"{guarded} {what}."
        )
    return "\n".join(lines), verdicts


def rescued(runs: Sequence[EfficacyRun]) -> tuple[int, int]:
    """Guarded runs that did not diverge where the unguarded run from the same seed did, and guarded
    runs whose unguarded run diverged."""
    base = {r.seed: r for r in runs if r.arm == "no callbacks"}
    guarded = [r for r in runs if r.arm != "no callbacks" and base[r.seed].diverged]
    return sum(not r.diverged for r in guarded), len(guarded)


def plot_efficacy(runs: Sequence[EfficacyRun], reference: EfficacyRun | None, path: str) -> bool:
    """The loss curves, one panel per seed, as a PNG at ``path``; ``False`` (and nothing written)
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seeds = sorted({r.seed for r in runs})
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.4), sharey=True, squeeze=False)
    colors = {"no callbacks": "tab:red", "cap": "tab:blue", "pss": "tab:green", "update_clip": "tab:purple"}
    labels = {arm: f'ladder=("{arm}",)' for arm in ARMS}
    labels["update_clip"] = f"SpectralUpdateClip(c={UPDATE_CLIP_C:g})"
    labels["no callbacks"] = f"no callbacks, LR {EFFICACY_LR:g}"
    for ax, seed in zip(axes[0], seeds):
        if reference is not None:
            ax.plot(reference.losses, color="0.6", lw=1, ls="--",
                    label=f"no callbacks, LR {reference.lr:g} (seed {reference.seed})")
        for r in runs:
            if r.seed == seed:
                ax.plot(r.losses, color=colors[r.arm], lw=1, label=labels[r.arm])
        ax.set_yscale("log")
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
