"""How each stability callback's per-step cost grows with the model: ``python -m benchmarks.scaling [--quick]``.

Each monitor alone, and all four together, against no callbacks, on GPT-style models of growing width
and depth, with the method of ``overhead.py`` (one process, interleaved runs, the setup order rotated
each repeat, medians over repeats). The timed window is 100 steps long, so that it holds each
callback's periodic work exactly as often as training does: two logging steps (the guard's metrics,
the spectral check, a softmax sample at the default ``every_n_steps=50``) and one snapshot
(``InMemoryRollback(every_n_steps=100)``).
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lightning.pytorch.callbacks import Callback

from benchmarks.overhead import (
    BASELINE,
    BATCH_SIZE,
    BLOCK_SIZE,
    ModelSize,
    Setup,
    Summary,
    format_table,
    goal_verdict,
    parameter_count,
    run_benchmark,
    summarize,
)
from lightning_stability import (
    GradientSpikeGuard,
    InMemoryRollback,
    SoftmaxSaturationMonitor,
    SpectralMonitor,
)
from lightning_stability.demos import make_dataloader

SECTION = "## Overhead as the model grows"
GOAL_ALL = 1.08  # all monitors at their defaults: at most 8% of step time on the small GPT on CPU
GOAL_THREE = 1.10  # the guard, the spectral and the softmax monitors together, on d128-L4 at 1,024 tokens
GOAL_LARGE = 1.02  # all four at 16,384 tokens a step, closer to real training
IMAGE = "img/overhead_scaling.png"


def _all_monitors(root: str) -> list[Callback]:
    return [GradientSpikeGuard(), InMemoryRollback(), SpectralMonitor(), SoftmaxSaturationMonitor()]


def _three_monitors(root: str) -> list[Callback]:
    return [GradientSpikeGuard(), SpectralMonitor(), SoftmaxSaturationMonitor()]


SETUPS = (
    Setup("no callbacks", "the baseline", lambda root: []),
    Setup("GradientSpikeGuard", "`GradientSpikeGuard()`: all four detectors on", lambda root: [GradientSpikeGuard()]),
    Setup("InMemoryRollback", "`InMemoryRollback()`: a snapshot every 100 steps, the loss check every step",
          lambda root: [InMemoryRollback()]),
    Setup("SpectralMonitor", "`SpectralMonitor()`: every weight's power iteration every step, a check every 50 "
          "steps, the full-spectrum analysis round-robin", lambda root: [SpectralMonitor()]),
    Setup("SoftmaxSaturationMonitor", "`SoftmaxSaturationMonitor()`: output and attention softmax sampled every 50 "
          "steps", lambda root: [SoftmaxSaturationMonitor()]),
    Setup("three monitors", "`GradientSpikeGuard`, `SpectralMonitor` and `SoftmaxSaturationMonitor` together, at "
          "their defaults (no rollback)", _three_monitors),
    Setup("all four", "the four above together, each at its defaults", _all_monitors),
)
ALL = SETUPS[-1].name
THREE = SETUPS[-2].name
# the run at many tokens a step: the baseline and all four only (a step there is 16 times longer)
LARGE_SETUPS = (SETUPS[0], SETUPS[-1])


@dataclass(frozen=True)
class Settings:
    sizes: tuple[ModelSize, ...]
    warmup_steps: int
    timed_steps: int
    repeats: int
    large_batch: int = 256  # the second table's batch (sequences of BLOCK_SIZE characters)
    large_sizes: tuple[ModelSize, ...] = ()
    large_timed_steps: int = 50


# warmup 40: past the guard's warm-up (32), so its per-element check runs in every timed step.
FULL = Settings(
    sizes=(ModelSize("d64-L2", 64, 2), ModelSize("d128-L4", 128, 4), ModelSize("d256-L6", 256, 6)),
    warmup_steps=40, timed_steps=100, repeats=2,
    # 16,384 tokens a step; d256-L6 there takes about 3 s a step on 2 cores, too long for this run.
    # 50 timed steps hold one logging step, one spectral check and one softmax sample.
    large_batch=256, large_sizes=(ModelSize("d64-L2", 64, 2), ModelSize("d128-L4", 128, 4)), large_timed_steps=50,
)
QUICK = Settings(sizes=(ModelSize("d32-L1", 32, 1, n_head=2), ModelSize("d64-L2", 64, 2)),
                 warmup_steps=2, timed_steps=3, repeats=1, large_batch=32,
                 large_sizes=(ModelSize("d32-L1", 32, 1, n_head=2),), large_timed_steps=2)


@dataclass(frozen=True)
class Result:
    summaries: list[Summary]
    params: dict[str, int]  # model name -> parameter count
    large: list[Summary] = field(default_factory=list)  # at settings.large_batch sequences a step


def run(settings: Settings, progress: Callable[[str], None]) -> Result:
    results = run_benchmark(settings.warmup_steps, settings.timed_steps, settings.repeats, settings.sizes, SETUPS,
                            progress)
    large = run_benchmark(settings.warmup_steps, settings.large_timed_steps, 1, settings.large_sizes, LARGE_SETUPS,
                          lambda line: progress(f"[{settings.large_batch * BLOCK_SIZE} tokens] {line}"),
                          settings.large_batch)
    _, dataset = make_dataloader(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, n_samples=1)
    params = {s.name: parameter_count(s, len(dataset.vocab)) for s in (*settings.sizes, *settings.large_sizes)}
    return Result(summarize(results), params, summarize(large))


def goal_lines(summaries: Sequence[Summary]) -> list[str]:
    """The all-monitors goal per model size, and each monitor's share; the three monitors' goal on
    d128-L4; reports, never raises."""
    lines = []
    by_size: dict[str, dict[str, Summary]] = {}
    for s in summaries:
        by_size.setdefault(s.size, {})[s.setup] = s
    for size, setups in by_size.items():
        every = setups[ALL]
        alone = ", ".join(f"{name} {s.hook_share:.1%}" for name, s in setups.items()
                          if name not in (BASELINE, ALL, THREE))
        note = f" (the callbacks intervened {every.interventions} times: not a clean run)" if every.interventions else ""
        lines.append(
            f"{size}: all four take {every.ratio:.3f}x the step time of no callbacks (their hooks: "
            f"{every.hook_share:.1%} of a baseline step; alone: {alone}); goal <= {GOAL_ALL:.2f}x: "
            f"{goal_verdict(every, GOAL_ALL)}{note}."
        )
        three = setups.get(THREE)
        if size == "d128-L4" and three is not None:
            lines.append(
                f"{size}: the three monitors (no rollback) take {three.ratio:.3f}x the step time of no callbacks "
                f"(their hooks: {three.hook_share:.1%}); goal <= {GOAL_THREE:.2f}x: {goal_verdict(three, GOAL_THREE)}."
            )
    return lines


def large_lines(summaries: Sequence[Summary], tokens: int) -> list[str]:
    """All four's goal at many tokens a step, per model size."""
    return [
        f"{s.size} at {tokens:,} tokens a step: all four take {s.ratio:.3f}x the step time of no callbacks (their "
        f"hooks: {s.hook_share:.1%} of a baseline step); goal <= {GOAL_LARGE:.2f}x: {goal_verdict(s, GOAL_LARGE)}."
        for s in summaries if s.setup == ALL
    ]


def plot(result: Result, path: str) -> bool:
    """Hook share and step-time ratio against the parameter count, one line per setup."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (share_ax, ratio_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for setup in SETUPS[1:]:
        if setup.name == THREE:
            continue
        rows = [s for s in result.summaries if s.setup == setup.name]
        x = [result.params[s.size] / 1e6 for s in rows]
        style = {"color": "black", "lw": 2.2} if setup.name == ALL else {"lw": 1.3}
        share_ax.plot(x, [100 * s.hook_share for s in rows], marker="o", label=setup.name, **style)
        ratio_ax.plot(x, [s.ratio for s in rows], marker="o", label=setup.name, **style)
        ratio_ax.fill_between(x, [s.ratio_low for s in rows], [s.ratio_high for s in rows], alpha=0.08,
                              color=style.get("color"))
    share_ax.axhline(100 * (GOAL_ALL - 1), color="grey", ls="--", lw=1, label="goal, all four")
    ratio_ax.axhline(GOAL_ALL, color="grey", ls="--", lw=1)
    ratio_ax.axhline(1.0, color="grey", lw=0.8)
    for ax in (share_ax, ratio_ax):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (millions)")
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted(p / 1e6 for p in result.params.values()))
        ax.set_xticklabels([f"{name}\n{p / 1e6:.2f} M" for name, p in sorted(result.params.items(), key=lambda i: i[1])],
                           fontsize=7)
        ax.minorticks_off()
    share_ax.set_ylabel("time in the callbacks' hooks\n(% of a baseline step)")
    ratio_ax.set_ylabel("step time vs. no callbacks\n(band: per-repeat range)")
    share_ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def growth_line(summaries: Sequence[Summary], sizes: Sequence[ModelSize]) -> str:
    """How the all-four hook time grows from the smallest to the largest model, next to the step."""
    first = {s.setup: s for s in summaries if s.size == sizes[0].name}
    last = {s.setup: s for s in summaries if s.size == sizes[-1].name}
    hook_growth = last[ALL].hook_ms / max(first[ALL].hook_ms, 1e-9)
    step_growth = last[BASELINE].step_ms / max(first[BASELINE].step_ms, 1e-9)
    return (f"From {sizes[0].name} to {sizes[-1].name} a baseline step grows {step_growth:.1f}x and the time in the "
            f"four callbacks' hooks {hook_growth:.1f}x ({first[ALL].hook_ms:.2f} to {last[ALL].hook_ms:.2f} ms a step)")


def render_section(settings: Settings, result: Result, seconds: float, machine: str, image: str | None = IMAGE) -> str:
    table = format_table(result.summaries, settings.sizes)
    lines = "\n".join(f"- {line}" for line in goal_lines(result.summaries))
    setups = "\n".join(f"- **{s.name}**: {s.description}." for s in SETUPS)
    sizes = ", ".join(f"`{s.name}` (width {s.d_model}, {s.n_layer} blocks, {result.params[s.name] / 1e6:.2f} M)"
                      for s in settings.sizes)
    figure = f"\n![In-callback share and step-time ratio against model size]({image})\n" if image else ""
    median_share = statistics.median(s.hook_share for s in result.summaries if s.setup == ALL)
    tokens = settings.large_batch * BLOCK_SIZE
    large_table = format_table(result.large, settings.large_sizes) if result.large else ""
    large = "\n".join(f"- {line}" for line in large_lines(result.large, tokens))
    return f"""
{SECTION}

```bash
python -m benchmarks.scaling   # rewrites this section only ({seconds / 60:.1f} minutes for the run below)
```

{machine}

Each monitor alone and all four together, at their defaults, on the tiny GPT at {len(settings.sizes)} sizes:
{sizes}; AdamW, batch {BATCH_SIZE} x {BLOCK_SIZE} characters. The goal: all monitors together within
{GOAL_ALL - 1:.0%} of step time on the small GPT on CPU.

{setups}

Each fit trains {settings.warmup_steps} untimed steps, then {settings.timed_steps} timed ones: the window
holds the periodic work as often as training does (two logging steps with the guard's metrics, the
spectral check and a softmax sample; one snapshot). Every (model, setup) pair is fitted
{settings.repeats} times, interleaved. The columns read as in the first table; with a window of
{settings.timed_steps} steps the in-callback time is a mean over it, so the periodic work counts in full.

{table}

{lines}
- {growth_line(result.summaries, settings.sizes)}; the median over sizes of the four callbacks' share is {median_share:.1%}.
{figure}
### At {tokens:,} tokens a step

The same fits with batch {settings.large_batch} x {BLOCK_SIZE} ({tokens:,} tokens a step, closer to real training),
no callbacks against all four, {settings.warmup_steps} untimed and {settings.large_timed_steps} timed steps, once
each (the window holds one logging step, one spectral check and one softmax sample, not the rollback's snapshot every 100 steps). Sizes: {", ".join(s.name for s in settings.large_sizes)};
`d256-L6` takes about 3 s a step there on this machine, too long for this run.

{large_table}

{large}

How a share moves with size depends on the work: the guard's norms and per-element check and the
power iteration's products grow with the parameter count, and a step with parameters x tokens (a
fixed batch here), so their shares stay roughly level as the model grows; fixed costs per hook call
and per tensor (Python and operator dispatch on tiny tensors) weigh most on the smallest model. A
larger batch shrinks every share. The step-time ratios carry the machine's noise (the per-repeat range
is drawn as a band); the in-callback share is the steadier estimate.
"""


def figure(result: Result, folder: str) -> str | None:
    """The plot drawn into ``folder`` (the benchmarks page's); its path relative to the page, or ``None``
    without matplotlib."""
    return IMAGE if plot(result, os.path.join(folder, IMAGE)) else None


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_section

    return run_section(argv, "python -m benchmarks.scaling", __doc__.splitlines()[0], SECTION, QUICK, FULL, run,
                       render_section, figure)


if __name__ == "__main__":
    sys.exit(main())
