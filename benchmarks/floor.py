"""Each monitor's per-step cost against the memory floor of its work: ``python -m benchmarks.floor [--quick]``.

What a monitor must do each step bounds what it can cost: the guard reads every gradient and every
second moment once (its norm and SPAM's element screen need both), the spectral tracking reads every
tracked weight twice (one product with ``W`` and one with ``W^T`` per power-iteration step). The
floor is that reading done as cheaply as torch can: one ``torch._foreach_norm`` per pass, on the same
tensors, in the same fit, timed by a probe callback placed after the monitor.

A monitor's figure is the median over the timed steps of the time inside its hooks: the quiet step,
where the periodic work (a check every 50 steps, logging) does not fall. The mean, which spreads the
periodic work over every step, is printed beside it. Aten operator calls per step are counted over a
few steps after the timed ones (a ``TorchDispatchMode`` around the monitor's hooks only, so the
counting costs nothing in the timed steps). Fits are interleaved (every size and setup once per
repeat), as in ``overhead.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import override

from benchmarks.overhead import BATCH_SIZE, BLOCK_SIZE, ModelSize, StepTimer, parameter_count
from lightning_stability import GradientSpikeGuard, SpectralMonitor
from lightning_stability.demos import TinyGPT, make_dataloader
from lightning_stability.ops.optim_state import second_moments
from lightning_stability.ops.spectral_weights import find_weight_matrices

SECTION = "## Cost against the floor"
GOAL = 2.0  # each monitor's quiet-step hook time at most twice its floor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FloorProbe(Callback):
    """Times the floor of each monitor's work on the step's own tensors: one pass over every gradient
    and second moment (the guard's), two passes over every tracked weight (the spectral tracking's)."""

    def __init__(self, start_at: int, stop_at: int) -> None:
        self.start_at, self.stop_at = start_at, stop_at
        self.guard_s: list[float] = []
        self.spectral_s: list[float] = []
        self.weights: list[torch.Tensor] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracked, _ = find_weight_matrices(pl_module, None, ())
        self.weights = [w.param for w in tracked]

    def _timing(self, trainer: pl.Trainer) -> bool:
        return self.start_at <= trainer.global_step < self.stop_at

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        moments = [v for v in second_moments(optimizer, params) if v is not None]
        if not self._timing(trainer) or not moments:
            return
        grads = [p.grad for p in params]
        _sync(grads[0].device)
        start = time.perf_counter()
        torch._foreach_norm(grads)
        torch._foreach_norm(moments)
        _sync(grads[0].device)
        self.guard_s.append(time.perf_counter() - start)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._timing(trainer) or not self.weights:
            return
        _sync(self.weights[0].device)
        start = time.perf_counter()
        with torch.no_grad():
            torch._foreach_norm(self.weights)
            torch._foreach_norm(self.weights)
        _sync(self.weights[0].device)
        self.spectral_s.append(time.perf_counter() - start)


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


class CountingTimer(StepTimer):
    """A :class:`StepTimer` that, over ``count_steps`` steps after the timed ones, counts the aten
    operator calls inside the watched hooks."""

    def __init__(self, warmup_steps: int, timed_steps: int, count_steps: int, watched: Sequence[Callback]) -> None:
        self.count_from, self.count_to = warmup_steps + timed_steps + 1, warmup_steps + timed_steps + 1 + count_steps
        self.batch_idx = -1
        self.ops: dict[int, int] = {}
        super().__init__(warmup_steps, timed_steps, watched)

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        timed = super()._timed(hook)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if not self.count_from <= self.batch_idx < self.count_to:
                return timed(*args, **kwargs)
            with CountOps() as mode:
                out = hook(*args, **kwargs)
            self.ops[self.batch_idx] = self.ops.get(self.batch_idx, 0) + mode.calls
            return out

        return counted

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batch_idx = batch_idx
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


@dataclass(frozen=True)
class Setup:
    name: str
    floor: str  # "guard" or "spectral": which floor it is measured against
    make: Callable[[], Callback]


SETUPS = (
    Setup("GradientSpikeGuard", "guard", lambda: GradientSpikeGuard()),
    Setup("SpectralMonitor", "spectral", lambda: SpectralMonitor()),
)


@dataclass(frozen=True)
class Settings:
    sizes: tuple[ModelSize, ...]
    warmup_steps: int
    timed_steps: int
    count_steps: int
    repeats: int


# warmup 40: past the guard's warm-up (32), so its element screen runs in every timed step
FULL = Settings(sizes=(ModelSize("d64-L2", 64, 2), ModelSize("d128-L4", 128, 4), ModelSize("d256-L6", 256, 6)),
                warmup_steps=40, timed_steps=60, count_steps=5, repeats=2)
QUICK = Settings(sizes=(ModelSize("d32-L1", 32, 1, n_head=2),), warmup_steps=3, timed_steps=3, count_steps=2, repeats=1)


@dataclass(frozen=True)
class Run:
    size: str
    setup: str
    hook_ms: float  # median over the timed steps: a quiet step
    hook_mean_ms: float  # the mean: the periodic work spread over every step
    floor_ms: float  # median over the timed steps
    ops: float  # aten calls in the hooks per step, median over the counted steps
    tensors: int  # the tensors of the floor: parameters with a moment (guard), tracked weights (spectral)


def run_once(size: ModelSize, setup: Setup, settings: Settings) -> Run:
    total = settings.warmup_steps + settings.timed_steps + 1 + settings.count_steps
    pl.seed_everything(0, verbose=False)
    loader, dataset = make_dataloader(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, n_samples=BATCH_SIZE * total)
    model = TinyGPT(vocab_size=len(dataset.vocab), block_size=BLOCK_SIZE, d_model=size.d_model,
                    n_layer=size.n_layer, n_head=size.n_head, max_steps=total)
    monitor = setup.make()
    timer = CountingTimer(settings.warmup_steps, settings.timed_steps, settings.count_steps, [monitor])
    probe = FloorProbe(settings.warmup_steps, settings.warmup_steps + settings.timed_steps)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=total, callbacks=[timer, monitor, probe],
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False)
    trainer.fit(model, loader)
    _, hooks = timer.step_times()
    floor = probe.guard_s if setup.floor == "guard" else probe.spectral_s
    tensors = sum(1 for p in model.parameters() if p.dim() > 0) if setup.floor == "guard" else len(probe.weights)
    return Run(size.name, setup.name, statistics.median(hooks) * 1e3, statistics.fmean(hooks) * 1e3,
               statistics.median(floor) * 1e3, statistics.median(timer.ops.values()) if timer.ops else float("nan"),
               tensors)


@dataclass(frozen=True)
class Row:
    size: str
    setup: str
    hook_ms: float
    hook_mean_ms: float
    floor_ms: float
    ratio: float  # hook_ms / floor_ms, the median over repeats of each fit's own ratio
    ops: float
    tensors: int


def run(settings: Settings, progress: Callable[[str], None]) -> list[Row]:
    runs: list[Run] = []
    for repeat in range(settings.repeats):
        for size in settings.sizes:
            for setup in SETUPS[repeat % 2:] + SETUPS[:repeat % 2]:
                r = run_once(size, setup, settings)
                progress(f"repeat {repeat + 1}/{settings.repeats}  {size.name:8s} {setup.name:20s} hooks "
                         f"{r.hook_ms:.3f} ms, floor {r.floor_ms:.3f} ms, {r.ops:.0f} ops/step")
                runs.append(r)
    rows = []
    for size in settings.sizes:
        for setup in SETUPS:
            mine = [r for r in runs if r.size == size.name and r.setup == setup.name]
            rows.append(Row(size.name, setup.name, statistics.median(r.hook_ms for r in mine),
                            statistics.median(r.hook_mean_ms for r in mine), statistics.median(r.floor_ms for r in mine),
                            statistics.median(r.hook_ms / r.floor_ms for r in mine),
                            statistics.median(r.ops for r in mine), mine[0].tensors))
    return rows


def goal_lines(rows: Sequence[Row]) -> list[str]:
    return [f"{r.size}, {r.setup}: a quiet step's hooks take {r.ratio:.2f}x the floor ({r.hook_ms:.3f} ms against "
            f"{r.floor_ms:.3f} ms); goal <= {GOAL:.0f}x: {'met' if r.ratio <= GOAL else 'NOT met'}." for r in rows]


def render_section(settings: Settings, rows: list[Row], seconds: float, machine: str) -> str:
    _, dataset = make_dataloader(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, n_samples=1)
    params = {s.name: parameter_count(s, len(dataset.vocab)) / 1e6 for s in settings.sizes}
    table = ["| model | monitor | floor | tensors | floor ms | quiet-step hooks ms | vs. floor | mean hooks ms | aten ops/step |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        floor = "one pass over g and v" if r.setup == "GradientSpikeGuard" else "two passes over the weights"
        table.append(f"| {r.size} ({params[r.size]:.2f} M) | {r.setup} | {floor} | {r.tensors} | {r.floor_ms:.3f} | "
                     f"{r.hook_ms:.3f} | {r.ratio:.2f}x | {r.hook_mean_ms:.3f} | {r.ops:.0f} |")
    lines = "\n".join(f"- {line}" for line in goal_lines(rows))
    return f"""
{SECTION}

```bash
python -m benchmarks.floor   # rewrites this section only ({seconds / 60:.1f} minutes for the run below)
```

{machine}

What each monitor must read every step bounds what it can cost. `GradientSpikeGuard` reads every
gradient and every second moment once (the norm and SPAM's element screen need both); the
`SpectralMonitor`'s tracking reads every tracked weight twice (a product with `W` and one with `W^T`
per power-iteration step). The floor is that reading done as cheaply as torch can, one
`torch._foreach_norm` per pass over the same tensors, timed in the same fit by a probe callback. A
monitor's figure is the median time per step inside its hooks over {settings.timed_steps} timed steps
after {settings.warmup_steps} (a quiet step: the check every 50 steps and logging fall on few of them;
the mean, which spreads them over every step, is beside it). Aten operator calls inside the hooks
are counted over {settings.count_steps} steps after the timed ones. The tiny GPT, AdamW, batch
{BATCH_SIZE} x {BLOCK_SIZE}; each (model, monitor) fitted {settings.repeats} times, interleaved; the ratio is the
median of each fit's own ratio.

{chr(10).join(table)}

{lines}

On a CPU with tiny tensors a step's fixed costs (Python in the hooks, one dispatch per operator call)
weigh as much as the bytes read, so the ratio falls as the model grows; the operator count per step
is what a GPU would launch.
"""


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_section

    return run_section(argv, "python -m benchmarks.floor", __doc__.splitlines()[0], SECTION, QUICK, FULL, run,
                       render_section)


if __name__ == "__main__":
    sys.exit(main())
