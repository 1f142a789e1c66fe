"""Run the benchmarks: ``python -m benchmarks [--quick] [--out docs/benchmarks.md]``.

The full run (``make bench``, a few minutes on a 2-core CPU) prints the tables and rewrites
``docs/benchmarks.md`` and the plot it shows (``docs/img/``). ``--quick`` is the CI smoke test: a few
steps per fit, the tables printed, nothing written. It fails only if something crashes, never on
timing. The comparison with WeightWatcher needs the ``bench`` extra (``pip install -e ".[bench]"``);
without it that part is skipped.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import inspect
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning
import torch

from benchmarks import ddp, floor, instabilities, noisy, precision, rollback, scaling, softmax, spectral
from benchmarks import efficacy as fault_efficacy
from benchmarks.overhead import (
    BATCH_SIZE,
    BLOCK_SIZE,
    GOAL_RATIO,
    MODEL_SIZES,
    SETUPS,
    ModelSize,
    format_table,
    goal_lines,
    run_benchmark,
    summarize,
)
from lightning_stability import SpectralMonitor
from lightning_stability.demos import TinyGPT
from lightning_stability.ops.spectral import analyze_spectrum, fit_power_law


@dataclass(frozen=True)
class Settings:
    warmup_steps: int
    timed_steps: int
    repeats: int
    rollback_timed_steps: int  # two snapshots (every 100 steps) in the window
    rollback_repeats: int
    rollbacks: int  # rollbacks timed per model size
    spectral_repeats: int
    analysis_sizes: tuple[ModelSize, ...]  # models for analyze_model against WeightWatcher
    analysis_repeats: int
    efficacy_seeds: tuple[int, ...]
    efficacy_steps: int
    efficacy_check_every: int  # SpectralMonitor(check_every_n_steps=...) in the efficacy runs
    efficacy_monitor_warmup: int  # SpectralMonitor(warmup=...): steps before its detections arm


# warmup_steps > GradientSpikeGuard's default warmup (32): its spike detectors are armed when timing starts.
# timed_steps = Trainer's default log_every_n_steps (50): the window holds exactly one logging step.
# The efficacy runs: 300 steps hold the blow-up (steps 50 to 80) and 200 steps after it; the monitor
# is armed from step 20 and checks every 2 steps, so it has a history before the blow-up and reacts
# within 2 steps.
FULL = Settings(
    warmup_steps=40, timed_steps=50, repeats=8, rollback_timed_steps=200, rollback_repeats=3, rollbacks=5,
    spectral_repeats=3, analysis_sizes=spectral.ANALYSIS_SIZES, analysis_repeats=3, efficacy_seeds=(0, 1, 2),
    efficacy_steps=300, efficacy_check_every=2, efficacy_monitor_warmup=20,
)
QUICK = Settings(
    warmup_steps=2, timed_steps=3, repeats=1, rollback_timed_steps=3, rollback_repeats=1, rollbacks=1,
    spectral_repeats=1, analysis_sizes=(MODEL_SIZES[0],), analysis_repeats=1, efficacy_seeds=(0,),
    efficacy_steps=12, efficacy_check_every=2, efficacy_monitor_warmup=2,
)


IMAGE = "img/spectral_efficacy.png"  # the efficacy plot, relative to the markdown file


def _weightwatcher_version() -> str | None:
    try:
        return importlib.metadata.version("weightwatcher")
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def source_version() -> str:
    """The commit measured (``-dirty`` when tracked files differ from it), or ``unknown`` outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def section_machine(threads: int) -> str:
    """The machine line of a section that can be rewritten on its own."""
    return (f"CPU: {cpu_model()}, {threads} cores; torch {torch.__version__}; lightning_stability at commit "
            f"`{source_version()}`; run on {datetime.date.today().isoformat()}.")


def replace_section(path: str, section: str, heading: str) -> None:
    """Put ``section`` in place of the file's section under ``heading`` (or at its end)."""
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    start = text.find("\n" + heading)
    if start == -1:
        text = text.rstrip("\n") + "\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end != -1 else "")
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")


def run_section(argv: list[str] | None, prog: str, description: str, heading: str, quick: Any, full: Any,
                compute: Callable[[Any, Callable[[str], None]], Any], render: Callable[..., str],
                figure: Callable[[Any, str], str | None] | None = None) -> int:
    """``python -m benchmarks.<section> [--quick] [--out FILE]``: compute one section, print it, and (not
    with ``--quick``) rewrite that section of the benchmarks page.

    ``figure(result, folder)``, where a section has one, draws it into the page's folder and returns its
    path relative to the page (or ``None``); ``render`` then takes that path as a fifth argument."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="a few steps, print only (the CI smoke test)")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    settings = quick if args.quick else full
    threads = available_cores()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = compute(settings, lambda line: print(line, flush=True))
    seconds, machine = time.perf_counter() - start, section_machine(threads)
    if figure is None:
        section = render(settings, result, seconds, machine)
    else:
        image = None if args.quick else figure(result, os.path.dirname(os.path.abspath(args.out)))
        section = render(settings, result, seconds, machine, image)
    print(section)
    if not args.quick:
        replace_section(args.out, section, heading)
        print(f"wrote the section {heading[3:]!r} of {args.out}")
    return 0


RUN_TIME = "## Run time"
_QUICK_PREFIX = "- `python -m benchmarks --quick`"


def _quick_line(path: str) -> str | None:
    """The recorded ``--quick`` run time in ``path``'s run-time section, if any."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return next((line.rstrip("\n") for line in f if line.startswith(_QUICK_PREFIX)), None)


def render_run_time(minutes: float, parts: dict[str, float], quick_line: str | None) -> str:
    rows = "\n".join(f"| {name} | {seconds / 60:.1f} |" for name, seconds in parts.items())
    quick = quick_line or f"{_QUICK_PREFIX}: not recorded yet (`python -m benchmarks --quick --record-time`)."
    return f"""
{RUN_TIME}

- `python -m benchmarks`: {minutes:.1f} minutes for the run on this page, by part:

| part | minutes |
|---|---:|
{rows}

{quick}
"""


def record_quick_time(path: str, minutes: float, machine: str) -> None:
    """Put this ``--quick`` run's time in place of the recorded one in ``path``'s run-time section."""
    line = f"{_QUICK_PREFIX}: {minutes:.1f} minutes (the CI smoke test, its goal under 5). {machine}"
    with open(path) as f:
        text = f.read()
    old = _quick_line(path)
    if old is not None:
        text = text.replace(old, line)
    elif RUN_TIME in text:  # the run-time section is the page's last
        text = text.rstrip("\n") + f"\n\n{line}\n"
    else:
        text = text.rstrip("\n") + f"\n\n{RUN_TIME}\n\n{line}\n"
    with open(path, "w") as f:
        f.write(text)


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def render_doc(
    settings: Settings,
    machine: list[str],
    table: str,
    goals: list[str],
    minutes: float,
    rollback_section: str,
    spectral_section: str,
) -> str:
    setups = "\n".join(f"- **{s.name}**: {s.description}." for s in SETUPS)
    machine_lines = "\n".join(f"- {line}" for line in machine)
    goal_text = "\n".join(f"- {line}" for line in goals)
    return f"""# Benchmarks

What the stability callbacks cost per training step, next to what users would reach for instead,
and whether they save a run: overhead per callback (guard, rollback, spectra, softmax) and how it
grows with the model; efficacy on injected faults and on reproduced instabilities; the precision
plugins. The project's goal for the guard: with all its detectors on it costs at most
{round((GOAL_RATIO - 1) * 100)}% of step time; every other goal is in its section. The full benchmark
run writes this file; do not edit it by hand.

```bash
python -m benchmarks           # or: make bench. Rewrites this file ({minutes:.1f} minutes for the run below; by part at the end)
python -m benchmarks --quick   # or: make bench-quick. The CI smoke test: a few steps, prints, writes nothing
python -m benchmarks.<section> # scaling, floor, precision, efficacy, instabilities, ddp: rewrites that section only
```

## Machine

{machine_lines}

A load average near the core count means other processes competed for the CPU during the run: then
`vs. no callbacks` below is noisy, and `in-callback share` is the better estimate of the overhead.

## Step-time overhead on CPU

The tiny GPT of `lightning_stability.demos` (`TinyGPT`, AdamW, batch {BATCH_SIZE} x {BLOCK_SIZE}
characters) at two sizes, trained with each of these callback setups:

{setups}

Each fit trains {settings.warmup_steps} untimed steps, then {settings.timed_steps} timed ones; every
(model, setup) pair is fitted {settings.repeats} times.

{table}

{goal_text}

## How to read the table

`ms/step` is the median over repeats of each run's median step time; `vs. no callbacks` divides it by
the baseline's, so `1.021x` means the callback added 2.1% to each step. `per-repeat ratios` is the
lowest and highest ratio of a run to the baseline run of the same repeat: the wider it is, the more of
a difference is noise from the machine. `in-callback ms/step` is the mean time per step spent inside
the callback's own hooks, measured directly, so it does not depend on subtracting two noisy step times;
it leaves out the guard's optimizer-step pre/post hooks (an early return in a clean run) and the work
Lightning does later with the metrics the guard logs. `in-callback share` divides it by the baseline's
`ms/step`: a second estimate of the overhead, less noisy than `vs. no callbacks` (it cannot see
effects outside the hooks, such as caches the callback evicts). The goal lines call the goal met or
not met when both estimates agree; when the per-repeat ratios spread over more than twice the goal's
margin, the step times cannot resolve it and the hook time decides alone (the line says so).

The guard's per-step work (a gradient norm and the per-element check against Adam's second moment)
grows with the parameter count only, while a step grows with parameters x tokens per step. At
{BATCH_SIZE * BLOCK_SIZE:,} tokens a step these runs are close to a worst case for its share; expect a smaller share at
the batch sizes models are trained with.

## Method

- One process, interleaved: `for repeat: for model: for setup`, with the setup order rotated each
  repeat, so a machine that drifts or gets busy slows every setup alike. Every fit seeds everything
  with 0 and builds a fresh model, data loader and `Trainer(accelerator="cpu",
  enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)`.
- A step is the wall time between two consecutive `on_train_batch_start` calls of a timer callback
  placed first in `callbacks`: forward, backward, optimizer step, every callback hook and the fetch
  of the next batch. A run's `ms/step` is its median step, so a burst of work from another process
  does not move it; its `in-callback ms/step` is a mean, so work a callback does only on some steps
  counts in full: the guard writes its metrics on logging steps only, and the {settings.timed_steps}
  timed steps hold one of them at the Trainer's default `log_every_n_steps=50`.
- The timed window opens after {settings.warmup_steps} steps, later than the guard's `warmup=32`, so
  its per-element (SPAM) check runs in every timed step; Trainer setup and teardown fall outside it.
- `torch.set_num_threads` is set to the cores available to the process.
- `SpikeDetection` raises `TrainingSpikeException` on a spike, which would end the fit; it is given
  `rtol=1e9` (the loss would have to exceed its running mean by a billion times that mean) so that it
  cannot raise on these clean runs. Its per-step check (a torchmetrics running mean, a few host
  syncs, a barrier) runs in full. It watches the loss only; the guard also checks gradients.
- The runs are clean: no fault is injected, and the guard must not intervene (the goal lines say so
  if it did).

{rollback_section}
{spectral_section}"""


def render_rollback_section(settings: Settings, table: str, goals: list[str], recovery_table: str) -> str:
    goal_text = "\n".join(f"- {line}" for line in goals)
    return f"""## InMemoryRollback

What snapshots in host memory cost, next to Lightning's `ModelCheckpoint` writing to disk at the same
interval, and how fast a rollback recovers next to reloading a checkpoint. The project's goal:
snapshots every {rollback.EVERY} steps cost at most {round((rollback.GOAL_RATIO - 1) * 100)}% of step time.

### Step-time overhead

The same models and method as above, with these setups:

{chr(10).join(f"- **{s.name}**: {s.description}." for s in rollback.SETUPS)}

Each fit trains {settings.warmup_steps} untimed steps, then {settings.rollback_timed_steps} timed ones (so
two snapshots or checkpoints, at steps 100 and 200, fall in the window); every (model, setup) pair is
fitted {settings.rollback_repeats} times. The cost falls on one step in {rollback.EVERY}, so the figures are
means over the timed steps: `mean ms/step` (median over repeats), and `in-callback ms/step`, the time
inside the callback's hooks per step (for `InMemoryRollback`: the snapshots, the per-step bookkeeping
and the loss check; for `ModelCheckpoint`: the writes). `in-callback share` divides it by the
baseline's mean step: the direct estimate; `vs. no callbacks` is noisier, since one slow step moves a
mean.

{table}

{goal_text}

### Time to recover

A fit with a NaN written into a weight {settings.rollbacks} times (snapshots every 10 steps) times each
in-memory rollback: restore the snapshot in place, rewind the scheduler and the callbacks, record
and write the quarantine. The same state is then saved with `trainer.save_checkpoint` and reloaded
{settings.rollbacks} times: `reload from disk` is `torch.load` plus `load_state_dict` of the model, the
optimizer and the scheduler (the file is in the page cache after the first read, so this is a lower
bound); `restart from ckpt_path` is a new `Trainer` fitting from the checkpoint until its first batch
starts. A real restart adds a new process, imports (seconds for torch and Lightning), a new data
loader and, on a cluster, the time to be scheduled again. Medians over the repeats:

{recovery_table}
"""


def render_spectral_section(
    settings: Settings,
    table: str,
    lines: list[str],
    analysis: tuple[str, list[str]] | None,
    ww_version: str | None,
    efficacy: tuple[str, list[str]],
    rescue: tuple[int, int],
    reference: spectral.EfficacyRun | None,
    image: str | None,
) -> str:
    line_text = "\n".join(f"- {line}" for line in lines)
    monitor = SpectralMonitor()
    if monitor.warmup >= settings.warmup_steps + settings.timed_steps:
        armed = (
            f"The detections arm after `warmup={monitor.warmup}` steps, after the window: an unarmed "
            "check skips a few comparisons on the host, and the per-step work on the weights is the same."
        )
    else:
        armed = f"The detections arm after `warmup={monitor.warmup}` steps, so they run in the window."
    if analysis is None:
        analysis_text = (
            "WeightWatcher is not installed (`pip install -e \".[bench]\"`, or `make bench`), so this "
            "comparison was skipped."
        )
    else:
        analysis_table, analysis_notes = analysis
        options = ", ".join(f"{k}={v!r}" for k, v in spectral.WW_OPTIONS.items())
        candidates = inspect.signature(analyze_spectrum).parameters["max_candidates"].default
        min_tail = inspect.signature(fit_power_law).parameters["min_tail"].default
        models = "; ".join(
            f"`{m.name}`: width {m.d_model}, {m.n_layer} blocks" for m in settings.analysis_sizes
        )
        analysis_text = f"""`lightning_stability.analyze_model(model)` next to WeightWatcher {ww_version}'s
`WeightWatcher(model=model).analyze({options})`: every optional analysis (plots, randomised ESDs,
Marchenko-Pastur fits, eigenvectors, detX) off, which is also its default in 0.7, so that it computes
what `analyze_model` computes: each weight's eigenvalue spectrum, its power-law fit and the norm
metrics. `svdvals alone` is `torch.linalg.svdvals` of every weight and nothing else. All run on the
same seeded, untrained `TinyGPT`s ({models}). The three are interleaved, the order reversed every
other repeat; medians of {settings.analysis_repeats} repeats. The metrics both compute are compared
layer by layer, matched by module name: alpha (the power-law exponent), the stable rank, and
lambda_max = sigma_max^2 (what WeightWatcher calls `spectral_norm`).

{analysis_table}

{chr(10).join(f"- {line}" for line in analysis_notes)}

How they differ: `analyze_model` takes the eigenvalues of the smaller Gram matrix (`W W^T` or
`W^T W`) in float32 with `torch.linalg.eigvalsh`, and fits the power law for at most {candidates}
candidate x_min at once, each leaving at least {min_tail} eigenvalues in the tail, choosing by the
two-sided KS distance. WeightWatcher computes a full SVD in float64 (SciPy's, without CUDA) and tries
every eigenvalue as x_min in a Python loop, down to tails of 2, comparing the fit with the lower
steps of the empirical CDF only. The stable rank and lambda_max therefore agree closely (to float32
precision), while alpha agrees only where both searches pick the same x_min. The shortest tails, the
one-sided KS distance and, above {candidates} eigenvalues, the candidates left out can each make them
pick different ones, and a different x_min gives a different alpha. At initialisation a spectrum is
a Marchenko-Pastur bulk with no power-law tail, alpha is large and x_min is poorly determined: a hard
case for agreement. As for the time: WeightWatcher's is mostly its SVD (compare `svdvals alone`, the
same decomposition in float32), and `analyze_model`'s is mostly the Gram products and `eigvalsh`;
the power-law fits take little of either."""
    if image is None:
        figure = "(matplotlib is not installed, so the loss curves were not plotted.)"
    else:
        figure = f"![Training loss of the four runs per seed, and of the reference run]({image})"
    efficacy_table, verdicts = efficacy
    rescued, guarded = rescue
    healthy = (
        ""
        if reference is None
        else f" The healthy reference run's loss rises at most {reference.largest_rise:.2f}x above the "
        f"lowest loss before it, and ends at {reference.final / reference.best:.2f}x its lowest."
    )
    demo_lr = inspect.signature(TinyGPT.__init__).parameters["lr"].default
    seeds = ", ".join(map(str, settings.efficacy_seeds))
    reason = ""
    if rescued < guarded:
        reason = """
A likely reason cap and PSS do not hold: at this learning rate an AdamW step moves every entry of a
weight by about the LR, so a few steps undo a cap or a smoothing of the top singular values (the
monitor's `update_ratio` shows how far one step moves each spectral norm); and the loss starts to rise
before any top singular value grows out of line (compare `first spike at step` with `first at step`),
so the detections come after the damage. Bounding the spectral norm of every update from the start
acts on the cause instead, at the price of a Newton-Schulz iteration per weight and step.
"""
    return f"""## SpectralMonitor

What tracking the singular spectra of every weight costs per step, how fast the full-spectrum analysis
runs next to WeightWatcher's, and what the monitor's spectral interventions do to a run that blows up.
The goals: tracking every weight of the small GPTs on CPU every step costs at most
{round((spectral.GOAL_RATIO - 1) * 100)}% of step time, and the full-spectrum analysis is at least
{spectral.GOAL_SPEEDUP:.0f}x faster than WeightWatcher's.

### Step-time overhead

The same models and method as the first section, with these setups:

{chr(10).join(f"- **{s.name}**: {s.description}." for s in spectral.SETUPS)}

Each fit trains {settings.warmup_steps} untimed steps, then {settings.timed_steps} timed ones; every
(model, setup) pair is fitted {settings.spectral_repeats} times.

{table}

{line_text}

- `in-callback ms/step` is a mean over the timed steps, so it counts in full the work the monitor
  does on some steps only. With its defaults it checks every 50 steps (whatever the logging cadence): the window holds
  one check (the statistics copied to the host, more power iterations where an estimate has not
  converged, the metrics logged).
- The full-spectrum analysis (`full_every_n_steps={monitor.full_every_n_steps}`) does not run all at
  once: it goes round-robin, one layer at a time, through the period, so a {settings.timed_steps}-step
  window holds only a layer or two of it. The lines above time the analysis of every layer once, as
  the monitor does it, and spread it over the period: its amortised cost.
- {armed}
- The runs are clean; the monitor must not intervene (the lines say so if it did).

### Full-spectrum analysis next to WeightWatcher

{analysis_text}

### Does it stop a blow-up?

The tiny GPT `{spectral.EFFICACY_SIZE.name}` at a learning rate that makes it blow up: AdamW (betas
0.9/0.95, weight decay 0.1) warmed up linearly over {spectral.EFFICACY_WARMUP} steps to a peak LR of
{spectral.EFFICACY_LR:g}, {spectral.EFFICACY_LR / demo_lr:.0f}x the demo's, then the demo's cosine
schedule; batch {BATCH_SIZE} x {BLOCK_SIZE} characters, {settings.efficacy_steps} steps. Each seed
({seeds}) draws the initial weights; the data are the same. Four runs per seed: no callbacks,
`SpectralMonitor(ladder=("cap",), check_every_n_steps={settings.efficacy_check_every},
warmup={settings.efficacy_monitor_warmup})` (the top singular value of a flagged layer set back to its
last healthy value) and the same with `ladder=("pss",)` (parametric singularity smoothing of the top
singular values), and `SpectralUpdateClip(optimizer, c={spectral.UPDATE_CLIP_C:g})` on every weight matrix from
the first step (the soft spectral clipping of updates, `sigma -> sigma / sqrt(1 + sigma^2 / c^2)`,
used as a preventive, with no monitor). The two monitors check every {settings.efficacy_check_every} steps instead of every 50,
and arm their detections from step {settings.efficacy_monitor_warmup}, so that they have a history before
the blow-up and can act on it within {settings.efficacy_check_every} steps. The reference is the same
model at LR {spectral.REFERENCE_LR:g}, with no callbacks. The configuration comes from a sweep for
one where the unguarded run blows up from every seed (the comment above `EFFICACY_LR` in
`benchmarks/spectral.py` says what was tried).

{efficacy_table}

{chr(10).join(f"- {line}" for line in verdicts)}

{figure}

`lowest loss`: the lowest loss before the last {spectral.TAIL} steps; `first spike`: the first step whose
loss is at least {spectral.SPIKE_RISE:g}x the lowest loss before it; `final loss`: the mean of the last
{spectral.TAIL} losses; `diverged`: a NaN or an infinite loss, or a final loss more than
{spectral.DIVERGED_RISE:g}x the lowest.{healthy} `interventions` counts caps or smoothings, one per layer
and check; `loss worse after one`, the checks that found the mean loss worse after an intervention
than before it: the monitor then asks for a rollback, which no callback answers here.
{reason}"""


def render_softmax_section(settings: Settings, table: str, lines: list[str]) -> str:
    setups = "\n".join(f"- **{s.name}**: {s.description}." for s in softmax.SETUPS)
    goal_text = "\n".join(f"- {line}" for line in lines)
    return f"""
## SoftmaxSaturationMonitor

What measuring the output and attention softmaxes costs per step. The goals: at most
{round((softmax.GOAL_DEFAULT - 1) * 100)}% of step time at the default sampling, at most
{round((softmax.GOAL_EVERY_STEP - 1) * 100)}% sampling every step.

{setups}

Each fit trains {settings.warmup_steps} untimed steps, then {settings.timed_steps} timed ones; every
(model, setup) pair is fitted {settings.spectral_repeats} times. The columns read as in the first table.

{table}

{goal_text}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, print only (the CI smoke test)")
    parser.add_argument("--out", default="docs/benchmarks.md", help="the markdown file the full run rewrites")
    parser.add_argument("--record-time", action="store_true",
                        help="with --quick: write this run's time into the run-time section of --out")
    args = parser.parse_args(argv)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banners per fit
    settings = QUICK if args.quick else FULL
    threads = available_cores()
    torch.set_num_threads(threads)
    ww_version = _weightwatcher_version()
    machine = [
        f"CPU: {cpu_model()}, {threads} cores available (`torch.set_num_threads({threads})`)",
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"weightwatcher {ww_version or 'not installed'}",
        f"lightning_stability at commit `{source_version()}`",
    ]
    load_before = load_average()
    print("\n".join(machine), flush=True)
    print(
        f"{settings.repeats} repeats x {settings.warmup_steps} warm-up + {settings.timed_steps} timed steps per fit",
        flush=True,
    )

    def progress(line: str) -> None:
        print(line, flush=True)

    start = time.perf_counter()
    parts: dict[str, float] = {}
    mark = start

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        parts[name] = now - mark
        mark = now

    results = run_benchmark(settings.warmup_steps, settings.timed_steps, settings.repeats, progress=progress)
    lap("guard overhead")
    rb_results = rollback.overhead(
        settings.warmup_steps, settings.rollback_timed_steps, settings.rollback_repeats, progress=progress
    )
    rb_table, rb_goals = rollback.overhead_table(rb_results)
    recoveries = [rollback.recovery(size, settings.rollbacks, progress) for size in MODEL_SIZES]
    rec_table = rollback.recovery_table(recoveries)
    lap("rollback")

    sp_results = spectral.overhead(
        settings.warmup_steps, settings.timed_steps, settings.spectral_repeats, progress
    )
    sm_results = softmax.overhead(settings.warmup_steps, settings.timed_steps, settings.spectral_repeats, progress)
    sm_summaries = summarize(sm_results)
    sm_table = format_table(sm_summaries)
    sm_lines = softmax.overhead_lines(sm_summaries)
    lap("spectral and softmax overhead")
    amortised = [spectral.full_analysis_cost(size, settings.analysis_repeats) for size in MODEL_SIZES]
    sp_summaries = summarize(sp_results)
    sp_table = format_table(sp_summaries)
    sp_lines = spectral.overhead_lines(sp_summaries, amortised, settings.timed_steps)
    ww = spectral.import_weightwatcher()
    analysis = None
    if ww is None:
        progress("weightwatcher is not installed (pip install -e '.[bench]'): skipping the comparison with it")
    else:
        compared = [
            spectral.compare_analysis(ww, size, settings.analysis_repeats, progress)
            for size in settings.analysis_sizes
        ]
        analysis = spectral.analysis_table(compared)
    runs, reference = spectral.efficacy(
        settings.efficacy_seeds,
        settings.efficacy_steps,
        settings.efficacy_check_every,
        settings.efficacy_monitor_warmup,
        reference=not args.quick,
        progress=progress,
    )
    efficacy = spectral.efficacy_table(runs, reference)
    lap("spectral analysis and blow-up")
    precision_settings = precision.QUICK if args.quick else precision.FULL
    precision_parts = precision.run(precision_settings, progress)
    lap("precision")
    faults_settings = fault_efficacy.QUICK if args.quick else fault_efficacy.FULL
    faults_result = fault_efficacy.evaluate(faults_settings, progress)
    lap("fault efficacy")
    scaling_settings = scaling.QUICK if args.quick else scaling.FULL
    scaling_result = scaling.run(scaling_settings, progress)
    lap("overhead as the model grows")
    floor_settings = floor.QUICK if args.quick else floor.FULL
    floor_rows = floor.run(floor_settings, progress)
    lap("cost against the floor")
    instab_settings = instabilities.QUICK if args.quick else instabilities.FULL
    instab_result = instabilities.run(instab_settings, progress, blowup=runs)
    lap("reproduced instabilities")
    ddp_settings = ddp.QUICK if args.quick else ddp.FULL
    ddp_result = ddp.run(ddp_settings, progress)
    lap("DDP overhead")
    noisy_settings = noisy.QUICK if args.quick else noisy.FULL
    noisy_result = noisy.run(noisy_settings, progress)
    lap("noisy but training")
    minutes = (time.perf_counter() - start) / 60
    summaries = summarize(results)
    table = format_table(summaries)
    goals = goal_lines(summaries)
    machine.append(f"1-minute load average before / after the run: {load_before} / {load_average()}")
    machine.append(f"run on {datetime.date.today().isoformat()}")
    print()
    print(table)
    print()
    print("\n".join(goals))
    print()
    print(rb_table)
    print()
    print("\n".join(rb_goals))
    print()
    print(rec_table)
    print()
    print(sp_table)
    print()
    print("\n".join(sp_lines))
    print()
    print(sm_table)
    print()
    print("\n".join(sm_lines))
    if analysis is not None:
        print()
        print(analysis[0])
        print()
        print("\n".join(analysis[1]))
    print()
    print(efficacy[0])
    print()
    print("\n".join(efficacy[1]))
    precision_section = precision.render_section(
        precision_settings, precision_parts, parts["precision"], section_machine(threads))
    print(precision_section)
    faults_section = fault_efficacy.render_section(faults_settings, faults_result, parts["fault efficacy"],
                                                   section_machine(threads))
    print(faults_section)
    scaling_image = None if args.quick else scaling.figure(scaling_result, os.path.dirname(os.path.abspath(args.out)))
    scaling_section = scaling.render_section(scaling_settings, scaling_result, parts["overhead as the model grows"],
                                             section_machine(threads), scaling_image)
    print(scaling_section)
    floor_section = floor.render_section(floor_settings, floor_rows, parts["cost against the floor"],
                                         section_machine(threads))
    print(floor_section)
    instab_section = instabilities.render_section(instab_settings, instab_result, parts["reproduced instabilities"],
                                                  section_machine(threads))
    print(instab_section)
    ddp_section = ddp.render_section(ddp_settings, ddp_result, parts["DDP overhead"], section_machine(threads))
    print(ddp_section)
    noisy_section = noisy.render_section(noisy_settings, noisy_result, parts["noisy but training"],
                                         section_machine(threads))
    print(noisy_section)
    if args.quick:
        print(
            "(--quick: too few steps for the figures to mean anything; this run only checks that nothing crashes)"
        )
    print(f"\n{machine[-2]}; {minutes:.1f} minutes")
    print(", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in parts.items()) + " (minutes)")
    if args.quick and args.record_time:
        record_quick_time(args.out, minutes, section_machine(threads))
        print(f"wrote the --quick run time into {args.out}")

    if not args.quick:
        docs = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(docs, exist_ok=True)
        image: str | None = IMAGE
        if spectral.plot_efficacy(runs, reference, os.path.join(docs, IMAGE)):
            print(f"wrote {os.path.join(os.path.dirname(args.out), IMAGE)}")
        else:
            image = None
        quick_line = _quick_line(args.out)
        with open(args.out, "w") as f:
            rb_section = render_rollback_section(settings, rb_table, rb_goals, rec_table)
            sp_section = render_spectral_section(
                settings, sp_table, sp_lines, analysis, ww_version, efficacy, spectral.rescued([r for r in runs if r.arm != "update_clip"]),
                reference, image,
            )
            f.write(render_doc(settings, machine, table, goals, minutes, rb_section, sp_section))
            f.write(render_softmax_section(settings, sm_table, sm_lines))
            f.write(scaling_section)
            f.write(floor_section)
            f.write(precision_section)
            f.write(faults_section)
            f.write(instab_section)
            f.write(ddp_section)
            f.write(noisy_section)
            f.write(render_run_time(minutes, parts, quick_line))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
