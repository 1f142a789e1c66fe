"""Run the benchmarks: ``python -m benchmarks [--quick] [--out docs/benchmarks.md]``.

The full run (``make bench``, a few minutes on a 2-core CPU) prints the tables and rewrites
``docs/benchmarks.md``. ``--quick`` is the CI smoke test: a few steps per fit, the table printed,
nothing written. It fails only if something crashes, never on timing.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import lightning
import torch

from benchmarks import rollback
from benchmarks.overhead import (
    BATCH_SIZE,
    BLOCK_SIZE,
    GOAL_RATIO,
    MODEL_SIZES,
    SETUPS,
    format_table,
    goal_lines,
    run_benchmark,
    summarize,
)


@dataclass(frozen=True)
class Settings:
    warmup_steps: int
    timed_steps: int
    repeats: int
    rollback_timed_steps: int  # two snapshots (every 100 steps) in the window
    rollback_repeats: int
    rollbacks: int  # rollbacks timed per model size


# warmup_steps > GradientSpikeGuard's default warmup (32): its spike detectors are armed when timing starts.
# timed_steps = Trainer's default log_every_n_steps (50): the window holds exactly one logging step.
FULL = Settings(warmup_steps=40, timed_steps=50, repeats=8, rollback_timed_steps=200, rollback_repeats=3, rollbacks=5)
QUICK = Settings(warmup_steps=2, timed_steps=3, repeats=1, rollback_timed_steps=3, rollback_repeats=1, rollbacks=1)


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


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def render_doc(
    settings: Settings,
    machine: list[str],
    table: str,
    goals: list[str],
    minutes: float,
    rollback_section: str,
) -> str:
    setups = "\n".join(f"- **{s.name}**: {s.description}." for s in SETUPS)
    machine_lines = "\n".join(f"- {line}" for line in machine)
    goal_text = "\n".join(f"- {line}" for line in goals)
    return f"""# Benchmarks

What the stability callbacks cost per training step. The project's goal: `GradientSpikeGuard` with
all its detectors on costs at most {round((GOAL_RATIO - 1) * 100)}% of step time.
The full benchmark run writes this file; do not edit it by hand.

```bash
python -m benchmarks           # or: make bench. Rewrites this file ({minutes:.1f} minutes for the run below)
python -m benchmarks --quick   # or: make bench-quick. The CI smoke test: a few steps, prints, writes nothing
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

{rollback_section}"""


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, print only (the CI smoke test)")
    parser.add_argument("--out", default="docs/benchmarks.md", help="the markdown file the full run rewrites")
    args = parser.parse_args(argv)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banners per fit
    settings = QUICK if args.quick else FULL
    threads = available_cores()
    torch.set_num_threads(threads)
    machine = [
        f"CPU: {cpu_model()}, {threads} cores available (`torch.set_num_threads({threads})`)",
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}",
        f"lightning_stability at commit `{source_version()}`",
    ]
    load_before = load_average()
    print("\n".join(machine), flush=True)
    print(
        f"{settings.repeats} repeats x {settings.warmup_steps} warm-up + {settings.timed_steps} timed steps per fit",
        flush=True,
    )

    start = time.perf_counter()
    results = run_benchmark(
        settings.warmup_steps,
        settings.timed_steps,
        settings.repeats,
        progress=lambda line: print(line, flush=True),
    )
    rb_results = rollback.overhead(
        settings.warmup_steps,
        settings.rollback_timed_steps,
        settings.rollback_repeats,
        progress=lambda line: print(line, flush=True),
    )
    rb_table, rb_goals = rollback.overhead_table(rb_results)
    recoveries = [rollback.recovery(size, settings.rollbacks, lambda line: print(line, flush=True)) for size in MODEL_SIZES]
    rec_table = rollback.recovery_table(recoveries)
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
    if args.quick:
        print(
            "(--quick: too few steps for the figures to mean anything; this run only checks that nothing crashes)"
        )
    print(f"\n{machine[-2]}; {minutes:.1f} minutes")

    if not args.quick:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            section = render_rollback_section(settings, rb_table, rb_goals, rec_table)
            f.write(render_doc(settings, machine, table, goals, minutes, section))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
